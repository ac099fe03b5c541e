"""Placeholder agents: each cycles through its configured workload, one task at a time.

They stand in for LLM agents until inference arrives, and drive the pool, its accounting and the
economy with real burn/alloc/sleep/echo tasks through the same path later agents will use: every
task waits for the agent's CPU bucket and is charged in the ledger.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Literal

from runtime.config import AgentConfig
from runtime.economy import Economy
from runtime.pool import TaskFailed
from runtime.protocol import kind_of

AgentState = Literal["waiting", "running", "pausing", "stopped"]


class PlaceholderAgent:
    """One agent's loop over its workload."""

    def __init__(self, cfg: AgentConfig, economy: Economy) -> None:
        self.cfg = cfg
        self.economy = economy
        self.state: AgentState = "waiting"
        self.last = ""
        self.errors: dict[str, int] = {}

    @property
    def status(self) -> str:
        """``blocked`` while its bucket holds it back, else its own state."""
        return "blocked" if self.economy.buckets.blocked(self.id) else self.state

    @property
    def id(self) -> str:
        """The agent's id (also the key of its line in the pool's fair queue)."""
        return self.cfg.id

    async def run(self) -> None:
        """Submit tasks until cancelled."""
        pause = self.cfg.pause_ms / 1000
        try:
            for spec in itertools.cycle(self.cfg.workload):
                self.state = "running"
                try:
                    out = await self.economy.run(self.id, spec)
                    self.last = f"{kind_of(spec)} ok {out.usage.cpu_seconds * 1000:.0f} ms CPU"
                except TaskFailed as exc:
                    self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
                    self.last = f"{kind_of(spec)} failed: {exc.code}"
                    if exc.code in ("pool_failed", "pool_closed"):
                        return
                if pause:
                    self.state = "pausing"
                    await asyncio.sleep(pause)
        finally:
            self.state = "stopped"
