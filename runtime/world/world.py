"""The world as agents reach it: artifacts (read, write, delete, invoke), transfers, memory, and
sleeping until news — every agent-facing call, with the acting agent's identity and its permissions.

Every artifact call goes to HEAD of the store — never to history. Disk quota is the agent's
``disk_quota`` in the ledger; remembered items count against the same number. Invoking a code artifact
runs it confined on a worker (``workers.sandbox``); its CPU and memory are charged to the invoker
through the economy like any task, and the code reaches the world only through ``serve``: reading
artifacts the invoker may read, and transferring the invoker's scrip up to the amount the invoker
authorised. The owner is paid the artifact's price only when the invocation succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Collection
from typing import Any, Literal

import msgspec
from msgspec import Struct

from runtime import protocol as p
from runtime.economy.charging import Economy
from runtime.economy.ledger import (
    ASSETS,
    AcceptOffer,
    Asset,
    CancelOffer,
    LedgerError,
    PostOffer,
    Receipt,
    Sponsor,
    SponsorUsed,
    Transfer,
)
from runtime.economy.ledger.rules import open_already
from runtime.economy.rights import RATE_RIGHTS
from runtime.errors import AecoError, ErrorCode
from runtime.pool import Outcome, TaskFailed
from runtime.world.access import Access
from runtime.world.events import Emit, Event, Events, emitter
from runtime.world.memory import MemoryItem, MemoryStore, MemoryStoreError, Recall
from runtime.world.store import Artifact, ArtifactInfo, Kind, Readable, Store, WriteReceipt, check_id
from runtime.world.tasks import Award, TaskError, TaskMint
from runtime.world.triggers import Trigger, Triggers

log = logging.getLogger("runtime.world")
#: How old ``World.agent_ids`` may be: a new agent shows up in others' contexts that much later at most.
AGENT_IDS_MAX_AGE_S = 1.0


class InvokeError(AecoError):
    """An invocation that did not succeed; ``code`` says why, ``outcome`` what it produced and cost."""

    def __init__(self, code: ErrorCode, message: str, outcome: Outcome | None = None) -> None:
        super().__init__(message, code=code)
        self.outcome = outcome


class Invocation(Struct, frozen=True):
    """A successful invocation: the code's result (JSON), what it printed, and what it cost."""

    value: Any
    stdout: str
    cpu_seconds: float
    peak_memory_bytes: int
    paid: int
    #: Scrip the code moved from the invoker, and any other asset it moved (by asset).
    transferred: int
    rights_transferred: dict[str, int] = {}


class World:
    """Everything agents reach: a ``Store``, the economy (ledger and pool), the event log, and a memory
    store when there is one. Events the world makes go to ``events`` without waiting for them."""

    def __init__(
        self, store: Store, economy: Economy, events: Events | None = None, memory: MemoryStore | None = None
    ) -> None:
        self.store = store
        self.economy = economy
        self.events = events
        self.memory = memory
        self.emit: Emit = emitter(events) if events is not None else (lambda kind, fields: None)
        self._n = itertools.count(1)
        #: Per agent: held while its disk use grows (a write) or its disk quota shrinks (a trade), so a
        #: trade cannot give away bytes a concurrent write is about to use. (One node: each agent's
        #: writes and trades are its own node's.)
        self._disk_locks: dict[str, asyncio.Lock] = {}
        self.access = Access(self)
        #: The operator's tasks (``runtime.world.tasks``), when the runtime posts any.
        self.mint: TaskMint | None = None
        self.triggers = Triggers(self)
        #: (owner, artifact) -> CPU-seconds the owner still pays for others' invocations (``charge_to``),
        #: less what runs in progress hold; the ledger keeps what is left once they settle (``Sponsor``).
        self.sponsored: dict[tuple[str, str], float] = {}
        #: The first agent accounts by id, and when (loop time) they were looked up (``agent_ids``).
        self._agent_ids: tuple[float, int, list[str]] = (-math.inf, 0, [])

    async def agent_ids(self, limit: int) -> list[str]:
        """The first ``limit`` agent accounts by id. Accounts change rarely and every agent's context names
        a few: the ledger (all its accounts) is read at most every ``AGENT_IDS_MAX_AGE_S`` for all of them."""
        now = asyncio.get_running_loop().time()
        at, n, ids = self._agent_ids
        if now - at >= AGENT_IDS_MAX_AGE_S or n < limit:
            accounts = await self.economy.ledger.accounts_async()
            ids = sorted(a for a, kind in accounts.items() if kind == "agent")[:limit]
            self._agent_ids = (now, limit, ids)
        return ids[:limit]

    def _disk_lock(self, agent: str) -> asyncio.Lock:
        lock = self._disk_locks.get(agent)
        if lock is None:
            lock = self._disk_locks[agent] = asyncio.Lock()
        return lock

    async def write_artifact(
        self,
        agent: str,
        artifact_id: str | bytes,
        content: bytes,
        *,
        kind: Kind = "data",
        price: int = 0,
        readable: Readable = "public",
    ) -> WriteReceipt:
        """Create or overwrite an artifact the agent owns, within its disk quota."""
        aid = check_id(artifact_id)
        async with self._disk_lock(agent):
            quota = await self.economy.ledger.balance_async(agent, "disk_quota")
            # Through the store's queue: the loop is not blocked on the sync, and agents' writes share commits.
            receipt = await asyncio.wrap_future(
                self.store.submit_write(agent, aid, content, kind=kind, price=price, readable=readable, quota=quota)
            )
        self.emit("artifact_written", {"agent": agent, "id": aid, "size": receipt.size, "created": receipt.created})
        return receipt

    async def read_artifact(self, agent: str, artifact_id: str | bytes) -> Artifact:
        """The artifact at HEAD, if its access policy lets the agent read it (``runtime.world.access``:
        a read price is paid, a contract asked, at the agent's expense)."""
        art = await self.store.read_async(agent, check_id(artifact_id))
        await self.access.admit(agent, art, "read", self._op_id(agent, "r"))
        return art

    async def delete_artifact(self, agent: str, artifact_id: str | bytes) -> None:
        """Delete an artifact the agent owns; its bytes go back to the agent's quota."""
        aid = check_id(artifact_id)
        await asyncio.wrap_future(self.store.submit_delete(agent, aid))
        self.emit("artifact_deleted", {"agent": agent, "id": aid})

    async def list_artifacts(self, agent: str, limit: int | None = None) -> list[ArtifactInfo]:
        """The artifacts the agent can see, by id (the first ``limit`` of them)."""
        return await self.store.list_async(agent, limit)

    async def disk_in_use(self, agent: str) -> int:
        """The bytes of ``agent``'s disk quota in use: its artifacts at HEAD and its memories are each
        held to the quota, so the larger of the two."""
        owned = await asyncio.to_thread(self.store.owned_bytes, agent)
        remembered = await asyncio.to_thread(self.memory.used_bytes, agent) if self.memory is not None else 0
        return max(owned, remembered)

    async def _check_disk_kept(self, agent: str, giving: int) -> None:
        """Refuse to move ``giving`` bytes of ``agent``'s disk quota away when it uses them."""
        quota = await self.economy.ledger.balance_async(agent, "disk_quota", fresh=True)
        used = await self.disk_in_use(agent)
        if quota - giving < used:
            raise LedgerError(
                "quota_exceeded",
                f"`{agent}` uses {used} of its {quota} bytes of disk_quota; it can give away at most "
                f"{max(quota - used, 0)}, not {giving} (delete artifacts first)",
            )

    @contextlib.asynccontextmanager
    async def _quota_kept(self, agent: str, asset: Asset, giving: int) -> AsyncIterator[None]:
        """Around moving ``giving`` of ``agent``'s ``asset`` away: a quota moves only as far as it is not in
        use — disk (``disk_in_use``: its artifacts, its memories) or memory (``Economy.memory_in_use``:
        the limits of its tasks not yet ended) — and its use cannot grow until the move is done."""
        if asset == "disk_quota":
            async with self._disk_lock(agent):
                await self._check_disk_kept(agent, giving)
                yield
        elif asset == "memory_quota":
            async with self.economy.memory_kept(agent, giving):
                yield
        else:
            yield

    async def transfer(self, op: Transfer) -> Receipt:
        """Move an asset between accounts (a rate right re-rates both buckets; quota in use stays);
        the recipient gets a ``transfer`` event addressed to it — news that may change what it decides."""
        async with self._quota_kept(op.src, op.asset, op.amount):
            receipt = await self.economy.transfer_right(op)
        return await self._transferred(op, receipt)

    async def _transferred(self, op: Transfer, receipt: Receipt) -> Receipt:
        if receipt.fresh:
            # ``ledger_seq`` lets another node add this credit to its cached holdings exactly once.
            fields = {
                "agent": op.dst,
                "from": op.src,
                "asset": op.asset,
                "amount": op.amount,
                "ledger_seq": receipt.seq,
            }
            self.emit("transfer", fields)
            self._announce_rate(op.dst, op.asset, op.id)
        return receipt

    def _announce_rate(self, agent: str, asset: Asset, op_id: str) -> None:
        if asset in RATE_RIGHTS and agent not in self.economy.buckets.agents():
            # The agent runs on another node: that node re-rates its buckets on this event.
            self.emit("rate_changed", {"agent": agent, "asset": asset, "op": op_id})

    async def transfer_scrip(self, agent: str, to: str, amount: int) -> Receipt:
        """``agent`` gives ``amount`` scrip to ``to`` (an operation id unique to this run)."""
        return await self.give(agent, to, "scrip", amount)

    async def pay(self, agent: str, to: str, amount: int, op_id: str, memo: str) -> Receipt:
        """``agent`` pays ``to`` ``amount`` scrip under the operation id ``op_id`` (a price, a fee)."""
        return await self.transfer(Transfer(id=op_id, src=agent, dst=to, asset="scrip", amount=amount, memo=memo))

    async def give(self, agent: str, to: str, asset: Asset, amount: int) -> Receipt:
        """``agent`` gives ``amount`` of any asset to ``to`` (an operation id unique to this run)."""
        op = Transfer(id=self._op_id(agent, "t"), src=agent, dst=to, asset=asset, amount=amount)
        return await self.transfer(op)

    def _op_id(self, agent: str, what: str) -> str:
        return f"{self.economy.run_id}:{agent}:{what}{next(self._n)}"

    # ------------------------------------------------------------------------------------ offers

    async def post_offer(self, agent: str, asset: Asset, amount: int, price: int, name: str | None = None) -> PostOffer:
        """``agent`` offers ``amount`` of ``asset`` for ``price`` scrip; nothing moves until someone
        accepts (an ``offer_posted`` event to the seller; others see it in their context). The offer's id
        is ``<agent>.<name>`` (refused while another open offer has it), or one made up."""
        offer = PostOffer(
            id=self._op_id(agent, "p"),
            offer=f"{agent}.{name}" if name else f"{agent}.{self.economy.run_id}.{next(self._n)}",
            seller=agent,
            asset=asset,
            amount=amount,
            price=price,
        )
        if name and await self.economy.ledger.offer_async(offer.offer) is not None:
            # Refused now, as the ledger would refuse it after a durable commit (a turn's wait for one):
            # the offer is open as of this read, and a refused post writes nothing, so refusing it here
            # is the ledger's own answer at this point. An agent that reposts an offer not yet taken
            # meets this every time.
            raise open_already(offer.offer)
        receipt = await self.economy.ledger.submit_async(offer)
        if receipt.fresh:
            # Addressed to the seller, not broadcast: agents see the open offers in their context, and a
            # broadcast would be in every agent's news scan. Observers get every event either way.
            fields = {"agent": agent, "offer": offer.offer, "asset": asset, "amount": amount, "price": price}
            self.emit("offer_posted", fields)
        return offer

    async def offers(self) -> list[PostOffer]:
        """Every open offer."""
        return await self.economy.ledger.offers_async()

    async def accept_offer(self, agent: str, offer_id: str) -> PostOffer:
        """``agent`` buys the whole of an open offer, atomically (one ledger operation: the asset to
        ``agent``, the scrip to the seller, the offer closed); a rate right re-rates both buckets, and
        quota the seller uses cannot be sold."""
        offer = await self.economy.ledger.offer_async(offer_id)
        if offer is None:
            raise LedgerError("not_found", f"no open offer `{offer_id}`")
        op = AcceptOffer(
            id=self._op_id(agent, "a"),
            offer=offer_id,
            buyer=agent,
            asset=offer.asset,
            amount=offer.amount,
            price=offer.price,
        )
        async with self._quota_kept(offer.seller, offer.asset, offer.amount):
            receipt = await self.economy.ledger.submit_async(op)
        if receipt.fresh:
            await self.economy.rerate_parties(offer.asset, (offer.seller, agent), op.id)
            # To the seller, without a ledger seq: the acceptance also debited it, which another node's
            # cache of its holdings cannot apply as a credit, so that node forgets them instead.
            fields = {"from": agent, "asset": "scrip", "amount": offer.price, "offer": offer_id, "sold": offer.asset}
            self.emit("transfer", {"agent": offer.seller, **fields})
            self.emit("offer_closed", {"agent": offer.seller, "offer": offer_id, "buyer": agent})
            self._announce_rate(offer.seller, offer.asset, op.id)
        return offer

    async def cancel_offer(self, agent: str, offer_id: str) -> None:
        """``agent`` withdraws its own open offer."""
        op = CancelOffer(id=self._op_id(agent, "c"), offer=offer_id, seller=agent)
        if (await self.economy.ledger.submit_async(op)).fresh:
            self.emit("offer_closed", {"agent": agent, "offer": offer_id, "buyer": None})

    async def invoke_artifact(
        self,
        agent: str,
        artifact_id: str | bytes,
        args: Any = None,
        *,
        max_transfer: int = 0,
        max_rights: dict[str, int] | None = None,
        cpu_seconds: float = 5.0,
        wall_seconds: float = 10.0,
        charge_to: Literal["invoker", "owner"] = "invoker",
    ) -> Invocation:
        """Run a code artifact confined, as ``agent``; raise ``InvokeError`` (after charging) on failure.

        The code may move up to ``max_transfer`` scrip of the invoker's, and up to ``max_rights[asset]`` of
        any other asset (nothing else). Its CPU and memory are charged to the invoker, or with
        ``charge_to="owner"`` to the artifact's owner, within what the owner still sponsors (``sponsor``):
        the run's CPU limit is cut to that, so the owner never pays more than it set."""
        aid = check_id(artifact_id)
        art = await self.store.read_async(agent, aid)
        await self.access.admit(agent, art, "invoke", self._op_id(agent, "i"))
        if art.kind != "code":
            raise InvokeError("not_code", f"artifact `{aid}` is {art.kind}, not code")
        if max_transfer < 0:
            raise InvokeError("invalid", f"max_transfer must be >= 0, got {max_transfer}")
        scrip = await self.economy.ledger.balance_async(agent, "scrip")
        if scrip < art.price + max_transfer:
            raise InvokeError(
                "insufficient_funds",
                f"`{agent}` has {scrip} scrip; invoking `{aid}` costs {art.price} plus up to {max_transfer} authorised",
            )
        try:
            encoded_args = json.dumps(args, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise InvokeError("invalid", f"args are not JSON: {exc}") from None
        payer, held = agent, 0.0
        if charge_to == "owner" and art.owner != agent:
            payer, held = art.owner, self._hold_sponsored(art.owner, aid, cpu_seconds)
            cpu_seconds = held
        memory = min(await self.economy.memory_available(payer), 1 << 30)
        if memory <= 0:
            raise InvokeError(
                "quota_exceeded",
                f"`{payer}` holds no memory_quota (traded away or leaving in a trade): invoking `{aid}` needs some",
            )
        spec = p.Invoke(
            code=art.content.decode("utf-8", "replace"),
            args=encoded_args,
            cpu_seconds=cpu_seconds,
            wall_seconds=wall_seconds,
            memory_bytes=memory,
        )
        key = f"{self.economy.run_id}-i{next(self._n)}"
        allowed: dict[str, int] = {**(max_rights or {}), "scrip": max_transfer}
        moved: dict[str, int] = {}

        async def serve(call: p.WorldCall) -> p.WorldAnswer:
            match call:
                case p.ReadArtifactCall(id=wanted):
                    try:
                        other = await self.read_artifact(agent, wanted)
                    except AecoError as exc:
                        return p.RefusedAnswer(error=str(exc))
                    return p.ArtifactAnswer(content=other.content)
                case p.TransferCall(to=to, amount=amount, asset=asset):
                    done, limit = moved.get(asset, 0), allowed.get(asset, 0)
                    if asset not in ASSETS:
                        return p.RefusedAnswer(error=f"unknown asset `{asset}`; assets are {', '.join(ASSETS)}")
                    if done + amount > limit:
                        return p.RefusedAnswer(
                            error=f"transfer of {amount} {asset} would exceed the {limit} `{agent}` authorised "
                            f"({done} already transferred)"
                        )
                    try:
                        await self.transfer(
                            Transfer(
                                id=f"invoke:{key}:{asset}:{done}:{to}:{amount}",
                                src=agent,
                                dst=to,
                                asset=asset,
                                amount=amount,
                                memo=f"from code {aid}",
                            )
                        )
                    except AecoError as exc:
                        return p.RefusedAnswer(error=str(exc))
                    moved[asset] = done + amount
                    return p.DoneAnswer()

        try:
            out = await self.economy.run(payer, spec, serve=serve)
        except TaskFailed as exc:
            await self._settle_sponsored(art.owner, aid, held, exc.usage.cpu_seconds if exc.usage else held, key)
            self.emit("artifact_invoked", {"agent": art.owner, "by": agent, "id": aid, "ok": False, "error": exc.code})
            raise InvokeError(exc.code, exc.message) from None
        await self._settle_sponsored(art.owner, aid, held, out.usage.cpu_seconds, key)
        report = p.decode_invoke(out.output)
        if not report.ok:
            self.emit(
                "artifact_invoked",
                {"agent": art.owner, "by": agent, "id": aid, "ok": False, "error": report.error_code},
            )
            raise InvokeError(report.error_code or "code_error", report.error, out)
        paid = 0
        if art.price and art.owner != agent:
            try:
                await self.pay(agent, art.owner, art.price, f"price:{key}", f"invoked {aid}")
                paid = art.price
            except AecoError as exc:
                raise InvokeError("insufficient_funds", f"could not pay the price of `{aid}`: {exc}", out) from None
        # Addressed to the owner: someone used (and maybe paid for) its artifact.
        self.emit("artifact_invoked", {"agent": art.owner, "by": agent, "id": aid, "ok": True, "paid": paid})
        return Invocation(
            value=msgspec.json.decode(report.value) if report.value else None,
            stdout=report.stdout,
            cpu_seconds=out.usage.cpu_seconds,
            peak_memory_bytes=out.usage.peak_memory_bytes,
            paid=paid,
            transferred=moved.get("scrip", 0),
            rights_transferred={a: n for a, n in moved.items() if a != "scrip"},
        )

    async def submit_task(self, agent: str, task_id: str, artifact_id: str) -> Award:
        """Submit ``agent``'s code artifact for an operator's task (``runtime.world.tasks``)."""
        if self.mint is None:
            raise TaskError("not_found", "this runtime posts no tasks")
        return await self.mint.submit(agent, task_id, artifact_id)

    async def subscribe(
        self, agent: str, artifact_id: str, kind: str, actor: str | None = None, about: str | None = None
    ) -> Trigger:
        """Invoke ``agent``'s pick of code artifact on every event matching the filter, charged to ``agent``
        (``runtime.world.triggers``). The artifact must be code the agent may see now."""
        art = await self.store.read_async(agent, check_id(artifact_id))
        if art.kind != "code":
            raise InvokeError("not_code", f"artifact `{art.id}` is {art.kind}, not code")
        return await self.triggers.subscribe(agent, art.id, kind, actor, about)

    async def unsubscribe(self, agent: str, trigger_id: str) -> None:
        """``agent`` ends one of its own triggers for good (an ``EndTrigger`` op); ``not_found`` if it has
        no such trigger standing."""
        await self.triggers.cancel(agent, trigger_id)

    async def sponsor(self, agent: str, artifact_id: str, cpu_seconds: float) -> None:
        """``agent`` pays, from now on, up to ``cpu_seconds`` of CPU in all for others' invocations of its
        artifact that ask to be charged to the owner (replacing what was left; 0 stops). A ledger
        ``Sponsor`` op: it outlives the supervisor (``restore``)."""
        art = await self.store.read_async(agent, check_id(artifact_id))
        if art.owner != agent:
            raise InvokeError("forbidden", f"`{art.id}` is {art.owner}'s: only its owner pays for it")
        left = max(cpu_seconds, 0.0)
        op = Sponsor(id=self._op_id(agent, "sp"), owner=agent, artifact=art.id, cpu_seconds=left)
        await self.economy.ledger.submit_async(op)
        self.sponsored[(agent, art.id)] = left

    def restore(self, agents: Collection[str]) -> None:
        """Take up what stands in the ledger from an earlier run: the sponsorships (any agent may invoke
        a sponsored artifact) and the triggers of ``agents`` (this node's), started again. On the loop."""
        for record in self.economy.ledger.standing():
            if isinstance(record, Sponsor):
                self.sponsored[(record.owner, record.artifact)] = record.cpu_seconds
        self.triggers.restore(agents)

    def _hold_sponsored(self, owner: str, aid: str, want: float) -> float:
        """Take up to ``want`` CPU-seconds of what ``owner`` sponsors for ``aid``, before the run (so
        concurrent runs cannot overspend it); ``insufficient_funds`` when nothing is left."""
        left = self.sponsored.get((owner, aid), 0.0)
        if left < _MIN_SPONSORED_S:
            raise InvokeError("insufficient_funds", f"{owner} does not pay for invocations of `{aid}` (any more)")
        held = min(want, left)
        self.sponsored[(owner, aid)] = left - held
        return held

    async def _settle_sponsored(self, owner: str, aid: str, held: float, used: float, run: str) -> None:
        if held:
            key = (owner, aid)
            self.sponsored[key] = self.sponsored.get(key, 0.0) + max(held - used, 0.0)
            spent = min(used, held)
            op = SponsorUsed(id=f"sponsored:{run}", owner=owner, artifact=aid, cpu_seconds=spent)
            await self.economy.ledger.submit_async(op)

    # ------------------------------------------------------------------------------------ memory

    async def remember(self, agent: str, text: str) -> MemoryItem:
        """Embed ``text`` on a worker (charged to ``agent``) and keep it in the agent's memory, within its
        disk quota."""
        memory = self._memory()
        vector = await self.embed(agent, text)
        quota = await self.economy.ledger.balance_async(agent, "disk_quota")
        # Local Qdrant works in the supervisor: the thread's CPU is the agent's to pay.
        return await self.economy.meter.to_thread(agent, memory.remember, agent, text, vector, quota_bytes=quota)

    async def recall(self, agent: str, query: str, k: int = 5) -> list[Recall]:
        """The agent's own memories nearest ``query`` (embedded on a worker, charged to ``agent``)."""
        memory = self._memory()
        return await self.economy.meter.to_thread(agent, memory.recall, agent, await self.embed(agent, query), k)

    async def embed(self, agent: str, text: str) -> list[float]:
        """One text's vector, computed on a worker and charged to ``agent``."""
        out = await self.economy.run(agent, p.Embed(texts=[text]))
        vectors = msgspec.msgpack.decode(out.output, type=list[list[float]])
        return vectors[0]

    def _memory(self) -> MemoryStore:
        if self.memory is None:
            raise MemoryStoreError("unavailable", "this runtime has no memory store")
        return self.memory

    # ------------------------------------------------------------------------------------ events

    async def sleep(self, agent: str, seconds: float, until: str | None = None) -> Event | None:
        """Sleep ``seconds`` or until an event of kind ``until`` concerns ``agent``; the event that woke it."""
        if self.events is None:
            await asyncio.sleep(seconds)
            return None
        kinds = {until} if until else None
        woken = await self.events.wait(agent, kinds=kinds, since=await self.events.last_seq_async(), timeout=seconds)
        return woken[0] if woken else None

    async def follow_rates(self, agent: str) -> None:
        """Re-rate ``agent``'s buckets whenever another node trades it a rate right (the ``rate_changed``
        events ``transfer`` addresses to a recipient this node does not run), until the log closes.

        Trades made while this node was down need no event: the buckets are built from the ledger's
        holdings when the node starts.
        """
        events = self.events
        assert events is not None, "following rates needs the event log"
        since = await events.last_seq_async()
        while news := await events.wait(agent, kinds={"rate_changed"}, since=since):
            since = news[-1].seq
            for e in news:
                asset, op_id = e.fields.get("asset"), e.fields.get("op")
                if asset in RATE_RIGHTS and isinstance(op_id, str):
                    await self.economy.rerate(agent, asset, op_id)


#: The least sponsored CPU an invocation may run on: less would not start the interpreter.
_MIN_SPONSORED_S = 0.05
