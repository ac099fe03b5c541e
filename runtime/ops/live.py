"""The live terminal view of a running supervisor: one row per agent, one footer for the pool."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol, TextIO

from runtime.economy.metering import SupervisorBooks
from runtime.host.limits import describe
from runtime.ops.stats import Snapshot
from runtime.pool import WorkerPool
from runtime.pool.accounting import Reconciliation
from runtime.world.world import World

_MB = 1 << 20


class EventCounts(Protocol):
    """Anything that counts events by kind."""

    counts: dict[str, int]


class LiveAgent(Protocol):
    """What the table shows of an agent (placeholder or thinking)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def last(self) -> str: ...


def render(
    pool: WorkerPool,
    agents: Sequence[LiveAgent],
    elapsed_s: float,
    world: World | None = None,
    events: EventCounts | None = None,
    snapshot: Snapshot | None = None,
) -> str:
    """The table as text; with a ``snapshot``, CPU % and memory per agent and the container's limits
    (and where they were found) and usage."""
    rows = [
        f"{'agent':<12} {'state':<8} {'tasks':>6} {'fail':>4} {'cpu s':>7} {'cpu %':>5} {'tokens':>7} "
        f"{'bucket s':>11} {'debt s':>6} {'scrip':>6} {'disk KB':>7} {'mem MB':>11}  last"
    ]
    per_agent = {s.id: s for s in snapshot.agents} if snapshot else {}
    economy = world.economy if world else None
    balances = economy.ledger.balances() if economy else {}
    disk = world.store.usage() if world else {}
    for a in agents:
        t = pool.accounts.agents.get(a.id)
        tasks, failed = (t.tasks, t.failed) if t else (0, 0)
        cpu = t.cpu_seconds if t else 0.0
        peak = t.max_task_memory_bytes / _MB if t else 0.0
        bucket = debt = "-"
        tokens = 0
        if economy is not None:
            b = economy.buckets.get(a.id, "cpu")
            level = economy.buckets.level(a.id, "cpu")
            bucket = f"{max(level, 0):.2f}/{b.capacity:.1f}"
            debt = f"{-level:.2f}" if level < 0 else "0"
            tokens = economy.tokens.get(a.id, 0)
        scrip = balances.get(a.id, {}).get("scrip", 0)
        stats = per_agent.get(a.id)
        percent = f"{stats.cpu_percent:.0f}" if stats else "-"
        mem = f"{peak:.0f}/{stats.memory_quota_bytes / _MB:.0f}" if stats else f"{peak:.1f}"
        rows.append(
            f"{a.id:<12} {a.status:<8} {tasks:>6} {failed:>4} {cpu:>7.2f} {percent:>5} {tokens:>7} {bucket:>11} "
            f"{debt:>6} {scrip:>6} {disk.get(a.id, 0) / 1024:>7.1f} {mem:>11}  {a.last[:60]}"
        )
    st = pool.status()
    over = pool.accounts.overhead()
    rec = pool.accounts.reconcile(pool.kernel_cpu(), retired=True)
    limit = f"{st.memory_limit / _MB:.0f} MB" if st.memory_limit else "none"
    probe_note = f"; memory probe {st.memory_probe}" if st.live else ""
    failure_note = f", FAILED: {st.failed}" if st.failed else ""
    rows += [
        "",
        f"pool: {st.live}/{st.size} workers ({st.busy} busy, {st.idle} idle), {st.queued} queued, "
        f"{st.started} started, {st.crashed} crashed{failure_note}",
        *(
            [*_limits_lines(snapshot), f"measuring: {st.cgroups}{probe_note}"]
            if snapshot
            else [f"limits: {st.cpu_capacity:g} CPUs, memory {limit}{probe_note}; {st.cgroups}"]
        ),
        "overhead: " + ", ".join(f"{k} {v:.2f} s" for k, v in over.items()),
        "events: " + (", ".join(f"{k} {v}" for k, v in sorted(events.counts.items())) or "none")
        if events is not None
        else "",
        f"books vs kernel: workers charged + overhead {rec.accounted:.2f} s, kernel {rec.kernel:.2f} s "
        f"({rec.kernel - rec.accounted:+.2f} s not yet reported by busy workers)"
        if st.busy
        else f"books vs kernel: workers charged + overhead {rec.accounted:.2f} s, kernel {rec.kernel:.2f} s "
        f"({rec.relative_error:.2%} apart)",
        *(_supervisor_lines(rec, economy.meter.books()) if economy is not None and economy.meter.enabled else []),
        f"elapsed {elapsed_s:.0f} s" + (" — Ctrl-C to stop" if st.live else ""),
    ]
    return "\n".join(rows)


def _supervisor_lines(workers: Reconciliation, sup: SupervisorBooks) -> list[str]:
    """The supervisor's books (agents + named overhead) against its ``RUSAGE_SELF``, then both sides
    of the pool together."""
    over = sorted(sup.overhead_ns.items(), key=lambda kv: -kv[1])
    together = workers.accounted + sup.accounted_ns / 1e9
    kernel = workers.kernel + sup.kernel_ns / 1e9
    apart = abs(kernel - together) / kernel if kernel else 0.0
    return [
        f"supervisor: agents {sup.agents_ns / 1e9:.2f} s + overhead "
        + ", ".join(f"{k} {v / 1e9:.2f} s" for k, v in over[:6])
        + f"; kernel {sup.kernel_ns / 1e9:.2f} s ({sup.unattributed_ns / 1e9:+.2f} s unattributed)",
        f"books vs kernel, supervisor and workers together: {together:.2f} s vs {kernel:.2f} s ({apart:.2%} apart)",
    ]


def _limits_lines(snap: Snapshot) -> list[str]:
    """The container's limits with their sources, what was sized from them, and its usage now."""
    c = snap.container
    cpu_now = f"{c.cpu_percent:.0f}%" if c.cpu_percent is not None else "-"
    total = f"{c.cpu_seconds:.1f} CPU-s in all" if c.cpu_seconds is not None else "no counter"
    used = f"{c.memory_bytes / _MB:.0f} MB" if c.memory_bytes is not None else "-"
    limit = f"{c.memory_limit_bytes / _MB:.0f} MB" if c.memory_limit_bytes is not None else "no limit"
    return [
        *describe(snap.limits, snap.sizing),
        f"container: CPU {cpu_now} of {c.cpu_capacity:g} CPUs ({total}; {c.cpu_source}), memory {used} / {limit} "
        f"({c.memory_source})",
    ]


class LiveView:
    """Redraws the table in place on a terminal; prints it now and then when not on one."""

    def __init__(self, out: TextIO = sys.stdout, every_s: float = 10.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self._last_print = -every_s
        self._lines = 0

    def show(self, text: str, elapsed_s: float) -> None:
        """Show one frame (on a non-terminal, at most one every ``every_s`` seconds)."""
        if self.tty:
            up = f"\x1b[{self._lines}F" if self._lines else ""
            self.out.write(up + "".join(line + "\x1b[K\n" for line in text.splitlines()) + "\x1b[J")
            self._lines = text.count("\n") + 1
        elif elapsed_s - self._last_print >= self.every_s:
            self.out.write(text + "\n\n")
            self._last_print = elapsed_s
        self.out.flush()
