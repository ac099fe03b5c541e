"""The live terminal view of a running supervisor: one row per agent, one footer for the pool."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from runtime.agents.placeholder import PlaceholderAgent
from runtime.pool import WorkerPool

_MB = 1 << 20


def render(pool: WorkerPool, agents: Sequence[PlaceholderAgent], elapsed_s: float) -> str:
    """The table as text."""
    rows = [
        f"{'agent':<12} {'state':<9} {'tasks':>7} {'failed':>6} {'cpu s':>8} {'peak MB':>8} "
        f"{'wall s':>8}  last"
    ]
    for a in agents:
        t = pool.accounts.agents.get(a.id)
        tasks, failed = (t.tasks, t.failed) if t else (0, 0)
        cpu, wall = (t.cpu_seconds, t.wall_seconds) if t else (0.0, 0.0)
        peak = t.max_task_memory_bytes / _MB if t else 0.0
        rows.append(
            f"{a.id:<12} {a.state:<9} {tasks:>7} {failed:>6} {cpu:>8.2f} {peak:>8.1f} {wall:>8.2f}  {a.last}"
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
        f"limits: {st.cpu_capacity:g} CPUs, memory {limit}{probe_note}; {st.cgroups}",
        "overhead: " + ", ".join(f"{k} {v:.2f} s" for k, v in over.items()),
        f"books vs kernel: charged + overhead {rec.accounted:.2f} s, kernel {rec.kernel:.2f} s "
        f"({rec.kernel - rec.accounted:+.2f} s not yet reported by busy workers)"
        if st.busy
        else f"books vs kernel: charged + overhead {rec.accounted:.2f} s, kernel {rec.kernel:.2f} s "
        f"({rec.relative_error:.2%} apart)",
        f"elapsed {elapsed_s:.0f} s" + (" — Ctrl-C to stop" if st.live else ""),
    ]
    return "\n".join(rows)


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
