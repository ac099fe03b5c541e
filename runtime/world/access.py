"""Access policies: who may read or invoke an artifact, and what it costs them to ask.

Each artifact has one policy (its ``readable`` field, ``runtime.world.store.READABLE_PATTERN``). Its
owner may always read and invoke it. For anyone else:

- ``public``: yes;
- ``owner``: the artifact does not exist for them (the store itself hides it: ``not_found``);
- ``allow:a+b``: the agents named, and no one else (``forbidden``);
- ``price:N``: anyone who pays the owner N scrip per read (invocations pay the artifact's own price);
- ``contract:C``: what the code artifact ``C`` answers, run confined with ``world.args`` =
  ``{"caller", "action" ("read" or "invoke"), "artifact", "owner"}``: it allows with ``world.result(True)``
  and denies with anything else, with an error, or by not answering within ``CONTRACT_WALL_S``. The
  check runs as the caller — charged to the caller like any task — and its answer is cached under the
  contract's version (a digest of its code), the caller, the action and the artifact: rewriting the
  contract asks it again. A contract whose answer does not depend on the caller says so with
  ``world.result({"allow": <bool>, "any_caller": True})``: that answer is cached for every caller.
  The contract is read as the artifact's owner sees it (so it may be the owner's private code), and
  while it runs it may read public artifacts only, and move nothing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
from typing import TYPE_CHECKING, Literal

import msgspec

from runtime import protocol as p
from runtime.errors import AecoError
from runtime.pool import TaskFailed
from runtime.world.store import Artifact, StoreError, check_id

if TYPE_CHECKING:
    from runtime.world.world import World

Action = Literal["read", "invoke"]

#: A contract's limits: an answer is a few lines of Python. Longer would let a contract spend its
#: callers' CPU; shorter would cut the interpreter's own start-up (tens of milliseconds).
CONTRACT_CPU_S = 0.5
CONTRACT_WALL_S = 2.0
CONTRACT_MEMORY_BYTES = 128 << 20
#: Cached answers kept (least recently used go first): a bound on the supervisor's memory.
CONTRACT_CACHE_SIZE = 10_000


class AccessDenied(StoreError):
    """The artifact's policy refuses this caller (``forbidden``)."""

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


class Access:
    """Enforces access policies for one ``World`` (see the module docstring)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._answers: collections.OrderedDict[tuple[str, ...], bool] = collections.OrderedDict()
        self._running: dict[tuple[str, ...], asyncio.Future[None]] = {}
        #: Contract runs, and answers served from the cache (for status and tests).
        self.contract_runs = 0
        self.cache_hits = 0

    async def admit(self, agent: str, art: Artifact, action: Action, key: str) -> None:
        """Let ``agent`` ``action`` ``art`` or raise (``AccessDenied``, or the ledger's refusal to pay
        a read price); ``key`` makes the payment's operation id unique."""
        if agent == art.owner:
            return
        kind, _, arg = art.readable.partition(":")
        if kind == "allow" and agent not in arg.split("+"):
            raise AccessDenied(f"`{art.id}` is readable by {arg.replace('+', ', ')} only")
        if kind == "price" and action == "read" and int(arg):
            await self.world.pay(agent, art.owner, int(arg), f"price:{key}", f"read {art.id}")
        if kind == "contract" and not await self.ask(arg, agent, action, art):
            raise AccessDenied(f"the contract `{arg}` of `{art.id}` denies {agent} to {action} it")

    async def ask(self, contract_id: str, agent: str, action: Action, art: Artifact) -> bool:
        """What contract ``contract_id`` answers for ``agent`` doing ``action`` to ``art`` (cached)."""
        try:
            contract = await self.world.store.read_async(art.owner, check_id(contract_id))
        except AecoError:
            return False  # a policy naming a missing contract admits no one
        if contract.kind != "code":
            return False
        version = hashlib.sha256(contract.content).hexdigest()
        mine, anyone = (contract_id, version, agent, action, art.id), (contract_id, version, "", action, art.id)
        # One run at a time per contract version and question: callers that arrive while it runs wait
        # for it, and use its answer when it holds for any caller (else they ask for themselves).
        while (running := self._running.get(anyone)) is not None:
            await asyncio.shield(running)
        for key in (mine, anyone):
            cached = self._answers.get(key)
            if cached is not None:
                self._answers.move_to_end(key)
                self.cache_hits += 1
                return cached
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running[anyone] = done
        try:
            allowed, any_caller = await self._run(contract, agent, action, art)
            self._answers[anyone if any_caller else mine] = allowed
            if len(self._answers) > CONTRACT_CACHE_SIZE:
                self._answers.popitem(last=False)
        finally:
            del self._running[anyone]
            done.set_result(None)
        return allowed

    async def _run(self, contract: Artifact, agent: str, action: Action, art: Artifact) -> tuple[bool, bool]:
        """Run the contract; its answer, and whether it holds for any caller."""
        self.contract_runs += 1
        args = {"caller": agent, "action": action, "artifact": art.id, "owner": art.owner}
        spec = p.Invoke(
            code=contract.content.decode("utf-8", "replace"),
            args=json.dumps(args).encode(),
            cpu_seconds=CONTRACT_CPU_S,
            wall_seconds=CONTRACT_WALL_S,
            memory_bytes=CONTRACT_MEMORY_BYTES,
        )
        store = self.world.store

        async def serve(call: p.WorldCall) -> p.WorldAnswer:
            if isinstance(call, p.ReadArtifactCall):
                try:
                    other = await store.read_async(agent, check_id(call.id))
                except AecoError as exc:
                    return p.RefusedAnswer(error=str(exc))
                if other.readable == "public":
                    return p.ArtifactAnswer(content=other.content)
            return p.RefusedAnswer(error="a contract may read public artifacts only, and move nothing")

        try:
            out = await self.world.economy.run(agent, spec, serve=serve)
        except TaskFailed:
            return False, False
        report = p.decode_invoke(out.output)
        if not report.ok or not report.value:
            return False, False
        answer = msgspec.json.decode(report.value)
        if isinstance(answer, dict):
            return answer.get("allow") is True, answer.get("any_caller") is True
        return answer is True, False
