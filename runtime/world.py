"""The world as agents reach it: artifacts (read, write, delete, invoke) with permission checks.

Every agent-facing call takes the acting agent's id, checks what that agent may do, and goes to
HEAD of the store — never to history. Disk quota is the agent's ``disk_quota`` in the ledger.
Invoking a code artifact runs it confined on a worker (``workers.sandbox``); its CPU and memory are
charged to the invoker through the economy like any task, and the code reaches the world only
through ``serve``: reading artifacts the invoker may read, and transferring the invoker's scrip up to
the amount the invoker authorised. The owner is paid the artifact's price only when the invocation
succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import Struct

from runtime.economy import RATE_RIGHTS, Economy
from runtime.ledger import LedgerError, Receipt, Transfer
from runtime.pool import Outcome, TaskFailed
from runtime.protocol import Invoke, InvokeOutput
from runtime.store import Artifact, ArtifactInfo, Kind, Readable, Store, StoreError, WriteReceipt, check_id

log = logging.getLogger("runtime.world")

#: ``emit(kind, fields)``: where the world's events go (the supervisor's event log).
Emit = Callable[[str, dict[str, Any]], None]
_MAX_PARAMS = 64 << 10


class InvokeError(Exception):
    """An invocation that did not succeed; ``code`` says why, ``usage`` what it was charged."""

    def __init__(self, code: str, message: str, outcome: Outcome | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
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
    """Artifacts for agents, over a ``Store``, the ledger and the economy."""

    def __init__(self, store: Store, economy: Economy, emit: Emit | None = None) -> None:
        self.store = store
        self.economy = economy
        self.emit: Emit = emit or (lambda kind, fields: None)
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
        quota = self.economy.ledger.balance(agent, "disk_quota")
        # Through the store's queue: the loop is not blocked on the sync, and agents' writes share commits.
        receipt = await asyncio.wrap_future(
            self.store.submit_write(agent, aid, content, kind=kind, price=price, readable=readable, quota=quota)
        )
        self.emit("artifact_written", {"agent": agent, "id": aid, "size": receipt.size, "created": receipt.created})
        return receipt

    def read_artifact(self, agent: str, artifact_id: str | bytes) -> Artifact:
        """The artifact at HEAD, if the agent may read it."""
        return self.store.read(agent, check_id(artifact_id))

    async def delete_artifact(self, agent: str, artifact_id: str | bytes) -> None:
        """Delete an artifact the agent owns; its bytes go back to the agent's quota."""
        aid = check_id(artifact_id)
        await asyncio.wrap_future(self.store.submit_delete(agent, aid))
        self.emit("artifact_deleted", {"agent": agent, "id": aid})

    def list_artifacts(self, agent: str) -> list[ArtifactInfo]:
        """The artifacts the agent can see."""
        return self.store.list(agent)

    async def transfer(self, op: Transfer) -> Receipt:
        """Move an asset between accounts (a rate right re-rates both buckets); the recipient gets a
        ``transfer`` event addressed to it — news that may change what it decides."""
        receipt = await self.economy.transfer_right(op)
        if receipt.fresh:
            self.emit("transfer", {"agent": op.dst, "from": op.src, "asset": op.asset, "amount": op.amount})
            if op.asset in RATE_RIGHTS and op.dst not in self.economy.buckets.agents():
                # The recipient runs on another node: that node re-rates its buckets on this event.
                self.emit("rate_changed", {"agent": op.dst, "asset": op.asset, "op": op.id})
        return receipt

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
        art = self.store.read(agent, aid)
        if art.kind != "code":
            raise InvokeError("not_code", f"artifact `{aid}` is {art.kind}, not code")
        if max_transfer < 0:
            raise InvokeError("invalid", f"max_transfer must be >= 0, got {max_transfer}")
        scrip = self.economy.ledger.balance(agent, "scrip")
        if scrip < art.price + max_transfer:
            raise InvokeError(
                "insufficient_funds",
                f"`{agent}` has {scrip} scrip; invoking `{aid}` costs {art.price} plus up to {max_transfer} authorised",
            )
        try:
            encoded_args = json.dumps(args, allow_nan=False).encode()  # JSON has no NaN or Infinity
        except (TypeError, ValueError) as exc:
            raise InvokeError("invalid", f"args are not JSON: {exc}") from None
        memory = min(self.economy.ledger.balance(agent, "memory_quota"), 1 << 30) or (256 << 20)
        spec = Invoke(
            code=art.content.decode("utf-8", "replace"),
            args=encoded_args,
            cpu_seconds=cpu_seconds,
            wall_seconds=wall_seconds,
            memory_bytes=memory,
        )
        key = f"{self.economy.run_id}-i{next(self._n)}"
        transferred = 0

        async def serve(op: str, params_json: bytes) -> tuple[bool, bytes, str]:
            nonlocal transferred
            if len(params_json) > _MAX_PARAMS:
                return False, b"null", f"request too large ({len(params_json)} bytes)"
            try:
                params = json.loads(params_json)
                if not isinstance(params, dict):
                    raise ValueError("params must be an object")
            except ValueError as exc:
                return False, b"null", f"malformed request: {exc}"
            if op == "read_artifact":
                try:
                    other = self.store.read(agent, check_id(str(params.get("id", ""))))
                except StoreError as exc:
                    return False, b"null", str(exc)
                return True, json.dumps({"b64": base64.b64encode(other.content).decode()}).encode(), ""
            if op == "transfer":
                to, amount = params.get("to"), params.get("amount")
                if not isinstance(to, str) or not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
                    return False, b"null", "transfer needs {to: account, amount: positive integer}"
                if transferred + amount > max_transfer:
                    return (
                        False,
                        b"null",
                        (
                            f"transfer of {amount} would exceed the {max_transfer} scrip `{agent}` authorised "
                            f"({transferred} already transferred)"
                        ),
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
                except (LedgerError, ValueError) as exc:
                    return False, b"null", str(exc)
                transferred += amount
                return True, b"null", ""
            return False, b"null", f"unknown request `{op}` (read_artifact, transfer)"

        try:
            out = await self.economy.run(agent, spec, serve=serve)
        except TaskFailed as exc:
            self.emit("artifact_invoked", {"agent": art.owner, "by": agent, "id": aid, "ok": False, "error": exc.code})
            raise InvokeError(exc.code, exc.detail) from None
        result = msgspec.json.decode(out.output, type=InvokeOutput)
        if not result.ok:
            code = result.error_code or "code_error"
            self.emit("artifact_invoked", {"agent": art.owner, "by": agent, "id": aid, "ok": False, "error": code})
            raise InvokeError(code, result.error, out)
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
            except LedgerError as exc:
                raise InvokeError("insufficient_funds", f"could not pay the price of `{aid}`: {exc}", out) from None
        # Addressed to the owner: someone used (and maybe paid for) its artifact.
        self.emit("artifact_invoked", {"agent": art.owner, "by": agent, "id": aid, "ok": True, "paid": paid})
        return Invocation(
            value=msgspec.json.decode(result.value),
            stdout=result.stdout,
            cpu_seconds=out.usage.cpu_seconds,
            peak_memory_bytes=out.usage.peak_memory_bytes,
            paid=paid,
            transferred=transferred,
        )
