"""The run's dollar cap (``budget.max_usd``): what paid (remote) models may cost in all, never exceeded.

    think on a paid model ── reserve(worst case) ──► the call ──► spend(what the server charged)
                                  │ does not fit                      └─► release(the reservation)
                                  ▼
              wait while other reservations may free room; none left: ``RunBudgetSpent``

Fail closed: before each paid call the worst case it could cost is reserved — every prompt byte a token
(plus the chat template's own), every one of ``max_tokens`` generated — and a call whose worst case
does not fit beside what is spent and reserved does not start. So the sum of what was spent can only
pass the cap if a server reports more tokens than it can have used. Alerts are events at 50, 80 and
95% of the cap spent (each once), and ``budget_paused`` when a paid think finds the cap reached: paid
thinking pauses (the agent sleeps on ``RunBudgetSpent``), while everything else — local models,
scripted agents, confined code — runs on.

"The run" is the data directory's life: at start the cap counts what the ledger's usage records say paid
models already cost, so a restart does not grant the cap again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from runtime.errors import AecoError, ErrorCode
from runtime.protocol import Think

#: Tokens a chat template adds around the system and user messages (role names, special tokens). Real
#: templates add a few dozen; more reserves more per call and pauses sooner, never overspends.
TEMPLATE_TOKENS = 64
#: Fractions of the cap spent at which a ``budget_alert`` event is emitted (each once per run).
ALERTS: tuple[int, ...] = (50, 80, 95)


class RunBudgetSpent(AecoError):
    """The run's dollar cap leaves no room for a paid think (``budget_spent``)."""

    default_code: ErrorCode = "budget_spent"


def worst_case_microusd(spec: Think) -> int:
    """The most ``spec`` can cost, in micro-dollars: every prompt byte a token, every completion token used."""
    prompt = len(spec.system.encode()) + len(spec.prompt.encode()) + TEMPLATE_TOKENS
    usd = (prompt * spec.price_prompt_per_1k + spec.max_tokens * spec.price_completion_per_1k) / 1000
    return int(usd * 1e6) + 1  # rounded up: the charge rounds to the nearest micro-dollar


class DollarCap:
    """Reservations and spending against ``max_usd`` for one supervisor (see the module docstring).

    ``emit(kind, fields)`` announces alerts; ``spent_microusd`` is what was spent before this start."""

    def __init__(self, max_usd: float, emit: Callable[[str, dict[str, Any]], None], spent_microusd: int = 0) -> None:
        self.limit = round(max_usd * 1e6)
        self.spent = spent_microusd
        self.reserved = 0
        self.emit = emit
        self._alerted = {pct for pct in ALERTS if self.spent * 100 >= pct * self.limit}
        self._paused = False
        self._room = asyncio.Condition()

    async def reserve(self, agent: str, amount: int) -> None:
        """Hold ``amount`` micro-dollars for one call of ``agent``; wait while reservations in flight may
        free room, and raise ``RunBudgetSpent`` when none can."""
        async with self._room:
            while self.spent + self.reserved + amount > self.limit:
                if not self.reserved:
                    if not self._paused:
                        self._paused = True
                        self.emit("budget_paused", self._figures())
                    raise RunBudgetSpent(
                        f"the run's dollar cap (${self.limit / 1e6:g}) leaves no room: ${self.spent / 1e6:.6f} spent, "
                        f"and {agent}'s next paid think could cost up to ${amount / 1e6:.6f}"
                    )
                await self._room.wait()
            self.reserved += amount

    async def settle(self, reserved: int, spent: int) -> None:
        """A call that held ``reserved`` is over and cost ``spent``: count it, free the rest, alert."""
        async with self._room:
            self.reserved -= reserved
            self.spent += spent
            for pct in ALERTS:
                if pct not in self._alerted and self.spent * 100 >= pct * self.limit:
                    self._alerted.add(pct)
                    self.emit("budget_alert", {"percent": pct, **self._figures()})
            self._room.notify_all()

    def _figures(self) -> dict[str, Any]:
        return {"spent_usd": self.spent / 1e6, "max_usd": self.limit / 1e6, "reserved_usd": self.reserved / 1e6}
