"""Placeholder agents: each cycles through its configured workload, one task at a time.

They stand in for LLM agents until inference arrives, and drive the pool, its accounting and the
economy with real burn/alloc/sleep/echo tasks through the same path later agents will use: every
task waits for the agent's CPU bucket and is charged in the ledger.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Literal

from runtime.actions import Action, perform
from runtime.config import AgentConfig
from runtime.errors import AecoError
from runtime.protocol import InstrumentSpec, kind_of
from runtime.world.world import World

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
                except AecoError as exc:
                    self._failed(kind_of(step), exc.code)
                    if exc.code in ("pool_failed", "pool_closed"):
                        return
                if pause:
                    self.state = "pausing"
                    await asyncio.sleep(pause)
        finally:
            self.state = "stopped"

    def _failed(self, kind: str, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        self.last = f"{kind} failed: {code}"

    async def _do(self, step: InstrumentSpec | Action) -> str:
        if isinstance(step, Action):
            return (await perform(self.world, self.id, step)).text
        out = await self.world.economy.run(self.id, step)
        return f"{kind_of(step)} ok {out.usage.cpu_seconds * 1000:.0f} ms CPU"
