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
import itertools
import json
import logging
from typing import Any

import msgspec
from msgspec import Struct

from runtime import protocol as p
from runtime.economy.charging import Economy
from runtime.economy.ledger import Receipt, Transfer
from runtime.economy.rights import RATE_RIGHTS
from runtime.errors import AecoError, ErrorCode
from runtime.pool import Outcome, TaskFailed
from runtime.world.events import Emit, Event, Events, emitter
from runtime.world.memory import MemoryItem, MemoryStore, MemoryStoreError, Recall
from runtime.world.store import Artifact, ArtifactInfo, Kind, Readable, Store, WriteReceipt, check_id

log = logging.getLogger("runtime.world")


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
    transferred: int


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
        quota = await self.economy.ledger.balance_async(agent, "disk_quota")
        # Through the store's queue: the loop is not blocked on the sync, and agents' writes share commits.
        receipt = await asyncio.wrap_future(
            self.store.submit_write(agent, aid, content, kind=kind, price=price, readable=readable, quota=quota)
        )
        self.emit("artifact_written", {"agent": agent, "id": aid, "size": receipt.size, "created": receipt.created})
        return receipt

    async def read_artifact(self, agent: str, artifact_id: str | bytes) -> Artifact:
        """The artifact at HEAD, if the agent may read it."""
        return await self.store.read_async(agent, check_id(artifact_id))

    async def delete_artifact(self, agent: str, artifact_id: str | bytes) -> None:
        """Delete an artifact the agent owns; its bytes go back to the agent's quota."""
        aid = check_id(artifact_id)
        await asyncio.wrap_future(self.store.submit_delete(agent, aid))
        self.emit("artifact_deleted", {"agent": agent, "id": aid})

    async def list_artifacts(self, agent: str, limit: int | None = None) -> list[ArtifactInfo]:
        """The artifacts the agent can see, by id (the first ``limit`` of them)."""
        return await self.store.list_async(agent, limit)

    async def transfer(self, op: Transfer) -> Receipt:
        """Move an asset between accounts (a rate right re-rates both buckets); the recipient gets a
        ``transfer`` event addressed to it — news that may change what it decides."""
        receipt = await self.economy.transfer_right(op)
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
            if op.asset in RATE_RIGHTS and op.dst not in self.economy.buckets.agents():
                # The recipient runs on another node: that node re-rates its buckets on this event.
                self.emit("rate_changed", {"agent": op.dst, "asset": op.asset, "op": op.id})
        return receipt

    async def transfer_scrip(self, agent: str, to: str, amount: int) -> Receipt:
        """``agent`` gives ``amount`` scrip to ``to`` (an operation id unique to this run)."""
        op = Transfer(
            id=f"{self.economy.run_id}:{agent}:t{next(self._n)}", src=agent, dst=to, asset="scrip", amount=amount
        )
        return await self.transfer(op)

    async def invoke_artifact(
        self,
        agent: str,
        artifact_id: str | bytes,
        args: Any = None,
        *,
        max_transfer: int = 0,
        cpu_seconds: float = 5.0,
        wall_seconds: float = 10.0,
    ) -> Invocation:
        """Run a code artifact confined, as ``agent``; raise ``InvokeError`` (after charging) on failure."""
        aid = check_id(artifact_id)
        art = await self.store.read_async(agent, aid)
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
        memory = min(await self.economy.ledger.balance_async(agent, "memory_quota"), 1 << 30) or (256 << 20)
        spec = p.Invoke(
            code=art.content.decode("utf-8", "replace"),
            args=encoded_args,
            cpu_seconds=cpu_seconds,
            wall_seconds=wall_seconds,
            memory_bytes=memory,
        )
        key = f"{self.economy.run_id}-i{next(self._n)}"
        transferred = 0

        async def serve(call: p.WorldCall) -> p.WorldAnswer:
            nonlocal transferred
            match call:
                case p.ReadArtifactCall(id=wanted):
                    try:
                        other = await self.store.read_async(agent, check_id(wanted))
                    except AecoError as exc:
                        return p.RefusedAnswer(error=str(exc))
                    return p.ArtifactAnswer(content=other.content)
                case p.TransferCall(to=to, amount=amount):
                    if transferred + amount > max_transfer:
                        return p.RefusedAnswer(
                            error=f"transfer of {amount} would exceed the {max_transfer} scrip `{agent}` authorised "
                            f"({transferred} already transferred)"
                        )
                    try:
                        await self.transfer(
                            Transfer(
                                id=f"invoke:{key}:{transferred}:{to}:{amount}",
                                src=agent,
                                dst=to,
                                asset="scrip",
                                amount=amount,
                                memo=f"from code {aid}",
                            )
                        )
                    except AecoError as exc:
                        return p.RefusedAnswer(error=str(exc))
                    transferred += amount
                    return p.DoneAnswer()

        try:
            out = await self.economy.run(agent, spec, serve=serve)
        except TaskFailed as exc:
            self.emit("artifact_invoked", {"agent": art.owner, "by": agent, "id": aid, "ok": False, "error": exc.code})
            raise InvokeError(exc.code, exc.message) from None
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
                await self.transfer(
                    Transfer(
                        id=f"price:{key}",
                        src=agent,
                        dst=art.owner,
                        asset="scrip",
                        amount=art.price,
                        memo=f"invoked {aid}",
                    )
                )
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
            transferred=transferred,
        )

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
