"""One agent's bill, from the ledger's usage records: what its tasks used, by resource and task kind.

Every finished task's charge is one ``RecordUsage`` operation in the journal (``runtime.economy.charging``),
stamped with the time it was applied, so a bill over a period is a fold over the journal: nothing is
estimated and nothing is counted twice (a replayed charge is one journal entry).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable

from msgspec import Struct

from runtime.economy.ledger import JournalEntry, RecordUsage


class BillLine(Struct):
    """What a set of tasks used: CPU-seconds, wall time, memory (the largest one task added, and
    byte-seconds: what each added for as long as it ran), LLM tokens and dollars."""

    tasks: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    memory_peak_bytes: int = 0
    memory_byte_seconds: float = 0.0
    llm_tokens: int = 0
    llm_cost_usd: float = 0.0

    def add(self, r: RecordUsage) -> None:
        """Count one task's usage record."""
        self.tasks += 1
        self.failed += 0 if r.ok else 1
        self.cpu_seconds += r.cpu_seconds
        self.wall_seconds += r.wall_seconds
        self.memory_peak_bytes = max(self.memory_peak_bytes, r.memory_bytes)
        self.memory_byte_seconds += r.memory_bytes * r.wall_seconds
        self.llm_tokens += r.llm_tokens
        self.llm_cost_usd += r.llm_cost_microusd / 1e6


class Bill(Struct):
    """An agent's usage since ``since`` (a Unix time; 0: since the ledger began), by task kind and in all."""

    agent: str
    since: float
    by_kind: dict[str, BillLine]
    total: BillLine


def bill(agent: str, journal: Iterable[JournalEntry], since: float = 0.0) -> Bill:
    """Fold the usage records of ``agent`` applied at or after ``since`` into its bill."""
    by_kind: dict[str, BillLine] = {}
    total = BillLine()
    for entry in journal:
        op = entry.op
        if isinstance(op, RecordUsage) and op.agent == agent and entry.at >= since:
            by_kind.setdefault(op.kind, BillLine()).add(op)
            total.add(op)
    return Bill(agent, since, dict(sorted(by_kind.items())), total)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float, flag: str = "--since") -> float:
    """``--since``: a duration back from ``now`` (``90s``, ``15m``, ``2h``, ``1d``) or a UTC time
    (``2026-12-06T06:00`` or ``2026-12-06T06:00:30``, optionally with a ``Z``); a Unix time.
    ``ValueError`` naming the forms it accepts otherwise."""
    if m := _DURATION.match(text.strip()):
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    stamp = text.strip().removesuffix("Z")
    for form in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(stamp, form)))
        except ValueError:
            continue
    raise ValueError(
        f"{flag} {text!r}: expected a duration such as 90s, 15m, 2h or 1d, or a UTC time such as 2026-12-06T06:00"
    )


def render(b: Bill) -> str:
    """The bill as a table: one row per task kind, then the total."""
    since = "the start" if not b.since else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(b.since))
    rows = [
        f"bill of {b.agent} since {since}",
        f"{'kind':<14} {'tasks':>7} {'failed':>6} {'CPU s':>10} {'wall s':>10} {'peak MB':>8} {'MB·s':>10} "
        f"{'tokens':>9} {'$':>10}",
    ]
    for kind, line in [*b.by_kind.items(), ("total", b.total)]:
        rows.append(
            f"{kind:<14} {line.tasks:>7} {line.failed:>6} {line.cpu_seconds:>10.3f} {line.wall_seconds:>10.3f} "
            f"{line.memory_peak_bytes / (1 << 20):>8.1f} {line.memory_byte_seconds / (1 << 20):>10.1f} "
            f"{line.llm_tokens:>9} {line.llm_cost_usd:>10.6f}"
        )
    return "\n".join(rows)


__all__ = ["Bill", "BillLine", "bill", "parse_since", "render"]
