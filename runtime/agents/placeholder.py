"""Placeholder agents: each cycles through its configured workload, one task at a time.

They stand in for LLM agents until inference arrives, and drive the pool, its accounting and the
economy with real burn/alloc/sleep/echo tasks through the same path later agents will use: every
task waits for the agent's CPU bucket and is charged in the ledger.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Literal

from runtime.actions import Action, DeleteArtifact, InvokeArtifact, ReadArtifact, WriteArtifact
from runtime.config import AgentConfig
from runtime.pool import TaskFailed
from runtime.protocol import InstrumentSpec, kind_of
from runtime.store import StoreError
from runtime.world import InvokeError, World

AgentState = Literal["waiting", "running", "pausing", "stopped"]


class PlaceholderAgent:
    """One agent's loop over its workload."""

    def __init__(self, cfg: AgentConfig, world: World) -> None:
        self.cfg = cfg
        self.world = world
        self.state: AgentState = "waiting"
        self.last = ""
        self.errors: dict[str, int] = {}

    @property
    def status(self) -> str:
        """``blocked`` while its bucket holds it back, else its own state."""
        return "blocked" if self.world.economy.buckets.blocked(self.id) else self.state

    @property
    def id(self) -> str:
        """The agent's id (also the key of its line in the pool's fair queue)."""
        return self.cfg.id

    async def run(self) -> None:
        """Work through the workload until cancelled."""
        pause = self.cfg.pause_ms / 1000
        try:
            for step in itertools.cycle(self.cfg.workload):
                self.state = "running"
                try:
                    self.last = await self._do(step)
                except TaskFailed as exc:
                    self._failed(kind_of(step), exc.code)
                    if exc.code in ("pool_failed", "pool_closed"):
                        return
                except (StoreError, InvokeError) as exc:
                    self._failed(kind_of(step), exc.code)
                if pause:
                    self.state = "pausing"
                    await asyncio.sleep(pause)
        finally:
            self.state = "stopped"

    def _failed(self, kind: str, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        self.last = f"{kind} failed: {code}"

    async def _do(self, step: InstrumentSpec | Action) -> str:
        if isinstance(step, WriteArtifact):
            r = await self.world.write_artifact(
                self.id,
                step.id,
                step.content.encode(),
                kind=step.artifact_kind,
                price=step.price,
                readable=step.readable,
            )
            return f"wrote {step.id} ({r.size} B, {r.owned_bytes} B owned)"
        if isinstance(step, ReadArtifact):
            return f"read {step.id} ({self.world.read_artifact(self.id, step.id).size} B)"
        if isinstance(step, DeleteArtifact):
            await self.world.delete_artifact(self.id, step.id)
            return f"deleted {step.id}"
        if isinstance(step, InvokeArtifact):
            inv = await self.world.invoke_artifact(self.id, step.id, step.args, max_transfer=step.max_transfer)
            return f"invoked {step.id} -> {json.dumps(inv.value)[:40]} (paid {inv.paid})"
        out = await self.world.economy.run(self.id, step)
        return f"{kind_of(step)} ok {out.usage.cpu_seconds * 1000:.0f} ms CPU"
