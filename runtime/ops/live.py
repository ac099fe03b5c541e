"""The live terminal view of a running supervisor: one row per agent, a footer for the pool and the container.

The view is built once per interval as a ``Frame`` (plain strings: the table's cells and the footer's
lines), and drawn three ways from it: on a terminal by ``rich``'s ``Live``, which owns the cursor
(it fits the frame to the terminal's width at every redraw: columns shrink, cells and long lines are
ellipsised, never wrapped, so its count of lines to redraw is always right); as plain text at a fixed
width for ``status.json`` and the last frame; and off a terminal as one summary line per interval.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, TextIO

from msgspec import Struct
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from runtime.economy.metering import SupervisorBooks
from runtime.host.limits import describe
from runtime.ops.stats import MEMORY_HIGH, THROTTLED_HIGH, Snapshot
from runtime.pool import WorkerPool
from runtime.pool.accounting import Reconciliation
from runtime.world.world import World

_MB = 1 << 20

#: The width of the plain-text frame in ``status.json`` and the last frame printed off a terminal: a
#: reader's terminal is unknown there, and 160 columns keep every column of a dozen agents unclipped.
TEXT_WIDTH = 160

#: The table's columns: (heading, right-aligned, rank). A terminal too narrow for them all drops the
#: columns of highest rank first; the free-text ``last`` takes whatever width is left, if any.
COLUMNS: tuple[tuple[str, bool, int], ...] = (
    ("agent", False, 0),
    ("state", False, 1),
    ("tasks", True, 4),
    ("fail", True, 10),
    ("cpu s", True, 5),
    ("cpu %", True, 2),
    ("act/s", True, 3),
    ("blk %", True, 6),
    ("tokens", True, 8),
    ("$ spent", True, 7),
    ("$ left", True, 9),
    ("bucket s", True, 11),
    ("debt s", True, 13),
    ("scrip", True, 12),
    ("disk KB", True, 15),
    ("mem MB", True, 14),
    ("last", False, 16),
)

#: The ``last`` column is shown only with at least this many characters: fewer say nothing.
_LAST_MIN = 8

#: An agent's id wider than this is ellipsised, so one long name cannot push every number off-screen.
_AGENT_MAX = 20


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


class Frame(Struct, frozen=True):
    """One interval's view: the table's rows (cells as text, in ``COLUMNS`` order), the footer's
    lines, and the one-line summary printed off a terminal."""

    rows: list[list[str]]
    footer: list[str]
    line: str


class Stored(Struct, frozen=True):
    """What a frame shows from the ledger and the store: every balance, and the disk each owner uses."""

    balances: dict[str, dict[str, int]]
    disk: dict[str, int]


def stored(world: World | None) -> Stored:
    """Read what a frame shows of the world's ledger and store (blocking: on a shared deployment these
    are round trips, which the supervisor makes on a thread, not on the agents' event loop)."""
    if world is None:
        return Stored({}, {})
    return Stored(world.economy.ledger.balances(), world.store.usage())


def frame(
    pool: WorkerPool,
    agents: Sequence[LiveAgent],
    elapsed_s: float,
    world: World | None = None,
    events: EventCounts | None = None,
    snapshot: Snapshot | None = None,
    read: Stored | None = None,
) -> Frame:
    """The view now; with a ``snapshot``, CPU % and memory per agent and the container's limits (and
    where they were found) and usage. ``read`` is ``stored(world)`` if the caller read it already."""
    rows: list[list[str]] = []
    per_agent = {s.id: s for s in snapshot.agents} if snapshot else {}
    economy = world.economy if world else None
    read = read if read is not None else stored(world)
    balances, disk = read.balances, read.disk
    tasks_total = 0
    for a in agents:
        t = pool.accounts.agents.get(a.id)
        tasks, failed = (t.tasks, t.failed) if t else (0, 0)
        tasks_total += tasks
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
            [
                a.id,
                a.status,
                str(tasks),
                str(failed),
                f"{cpu:.2f}",
                percent,
                f"{stats.actions_per_s:.1f}" if stats else "-",
                f"{100 * stats.blocked_share:.0f}" if stats else "-",
                str(tokens),
                _usd(stats.spent_usd) if stats else "-",
                _usd(stats.budget_left_usd) if stats else "-",
                bucket,
                debt,
                str(scrip),
                f"{disk.get(a.id, 0) / 1024:.1f}",
                mem,
                a.last,
            ]
        )
    st = pool.status()
    over = pool.accounts.overhead()
    rec = pool.accounts.reconcile(pool.kernel_cpu(), retired=True)
    limit = f"{st.memory_limit / _MB:.0f} MB" if st.memory_limit else "none"
    probe_note = f"; memory probe {st.memory_probe}" if st.live else ""
    failure_note = f", FAILED: {st.failed}" if st.failed else ""
    books = f"books vs kernel: workers charged + overhead {rec.accounted:.2f} s, kernel {rec.kernel:.2f} s "
    footer = [
        f"pool: {st.live}/{st.size} workers ({st.busy} busy, {st.idle} idle), {st.queued} queued, "
        f"{st.started} started, {st.crashed} crashed{failure_note}",
        *(
            [*_limits_lines(snapshot), *_container_lines(snapshot), f"measuring: {st.cgroups}{probe_note}"]
            if snapshot
            else [f"limits: {st.cpu_capacity:g} CPUs, memory {limit}{probe_note}; {st.cgroups}"]
        ),
        "overhead: " + ", ".join(f"{k} {v:.2f} s" for k, v in over.items()),
        *([economy.thinking.line()] if economy is not None and economy.thinking.any() else []),
        *(
            ["events: " + (", ".join(f"{k} {v}" for k, v in sorted(events.counts.items())) or "none")]
            if events is not None
            else []
        ),
        books + f"({rec.kernel - rec.accounted:+.2f} s not yet reported by busy workers)"
        if st.busy
        else books + f"({rec.relative_error:.2%} apart)",
        *(_supervisor_lines(rec, economy.meter.books()) if economy is not None and economy.meter.enabled else []),
        f"elapsed {elapsed_s:.0f} s" + (" — Ctrl-C to stop" if st.live else ""),
    ]
    busy = sum(1 for a in agents if a.status != "blocked")
    container = ""
    if snapshot is not None:
        c = snapshot.container
        cpu_now = f"{c.cpu_percent:.0f}%" if c.cpu_percent is not None else "-"
        used = f"{c.memory_bytes / _MB:.0f} MB" if c.memory_bytes is not None else "-"
        tot = snapshot.totals
        container = (
            f"; {tot.actions_per_s:.1f} actions/s, ${tot.spent_usd:.4f} spent; container CPU {cpu_now}, memory {used}"
        )
    thinking = sum(1 for a in agents if a.status == "thinking")
    line = (
        f"[{elapsed_s:.0f} s] {len(agents)} agents ({busy} not blocked, {thinking} thinking), {tasks_total} tasks; "
        f"pool {st.busy}/{st.live} busy, {st.queued} queued, {st.crashed} crashed{failure_note}{container}"
    )
    return Frame(rows=rows, footer=footer, line=line)


def _usd(dollars: float) -> str:
    return f"{dollars:.4f}" if dollars < 100 else f"{dollars:.0f}"


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
    """The container's limits with their sources, what was sized from them, and its CPU and memory now
    (memory as a share of the limit, marked when over ``MEMORY_HIGH``)."""
    c = snap.container
    cpu_now = f"{c.cpu_percent:.0f}%" if c.cpu_percent is not None else "-"
    total = f"{c.cpu_seconds:.1f} CPU-s in all" if c.cpu_seconds is not None else "no counter"
    used = f"{c.memory_bytes / _MB:.0f} MB" if c.memory_bytes is not None else "-"
    limit = f"{c.memory_limit_bytes / _MB:.0f} MB" if c.memory_limit_bytes is not None else "no limit"
    share = ""
    if c.memory_share is not None:
        mark = f" — OVER {MEMORY_HIGH:.0%}" if c.memory_high else f", under {MEMORY_HIGH:.0%}"
        share = f" ({c.memory_share:.0%}{mark})"
    return [
        *describe(snap.limits, snap.sizing),
        # The figures first, where a narrow terminal still shows them; the long sources after.
        f"container: CPU {cpu_now} of {c.cpu_capacity:g} CPUs, memory {used} / {limit}{share}; {total} "
        f"({c.cpu_source}; {c.memory_source})",
    ]


def _volume_line(snap: Snapshot) -> list[str]:
    """The data volume: free of its size, what the data directory holds, the store's history bytes."""
    v = snap.volume
    if v is None:
        return []
    history = sum(a.history_bytes for a in snap.agents)
    return [
        f"data volume: {v.free_bytes / _MB:,.0f} MB free of {v.total_bytes / _MB:,.0f} MB; data dir "
        f"{v.data_bytes / _MB:,.1f} MB, of it store history {history / _MB:,.1f} MB ({v.source})"
    ]


def _container_lines(snap: Snapshot) -> list[str]:
    """Throttling, pressure, network, the data volume and the agents' totals."""
    c, t = snap.container, snap.totals
    lines = _volume_line(snap)
    if (thr := c.throttling) is not None:
        now = f", {c.throttled_share:.0%} of the last interval's" if c.throttled_share is not None else ""
        over = (
            f" — OVER {THROTTLED_HIGH:.0%}"
            if c.throttled_share is not None and c.throttled_share > THROTTLED_HIGH
            else ""
        )
        lines.append(
            f"throttling: {thr.throttled}/{thr.periods} periods throttled{now}{over}, "
            f"{thr.throttled_seconds:.2f} s in all ({thr.source})"
        )
    else:
        lines.append("throttling: no cpu.stat to read")
    if c.pressure:
        psi = ", ".join(f"{r} {p.some_avg10:.1f}%/{p.full_avg10:.1f}%" for r, p in c.pressure.items())
        lines.append(f"pressure (some/full, 10 s): {psi} ({c.pressure_source})")
    if (net := c.network) is not None:
        rate = (
            f" ({net.bytes_in_per_s / 1024:.1f}/{net.bytes_out_per_s / 1024:.1f} KB/s)"
            if net.bytes_in_per_s is not None and net.bytes_out_per_s is not None
            else ""
        )
        e, lo = net.external, net.loopback
        lines.append(
            f"network in/out: {e.bytes_in / _MB:.1f}/{e.bytes_out / _MB:.1f} MB, {e.packets_in}/{e.packets_out} packets"
            f"{rate}; loopback {lo.bytes_in / _MB:.1f}/{lo.bytes_out / _MB:.1f} MB ({net.source})"
        )
    lines.append(
        f"totals: {t.agents} agents ({t.blocked} blocked), {t.tasks} tasks, {t.actions} actions "
        f"({t.rejected} refused), {t.actions_per_s:.1f} actions/s, {t.cpu_seconds:.2f} CPU-s, {t.tokens} tokens, "
        f"${t.spent_usd:.4f} spent, ${t.budget_left_usd:.4f} left"
    )
    return lines


def renderable(f: Frame) -> FrameView:
    """The frame for ``rich``, laid out for the width and height it is drawn at."""
    return FrameView(f)


def lines(f: Frame, width: int, max_rows: int | None = None, cut: bool = True) -> list[str]:
    """The frame as lines: the table at most ``width`` wide (the columns that fit, dropped by rank, each
    cell cut with an ellipsis to its column), the footer's lines cut at the edge too unless not ``cut``;
    at most ``max_rows`` agents' rows (then one line saying how many more). Plain string work: a frame
    of 1,000 agents is a few milliseconds, where a ``rich`` table of them takes more than a second."""
    rows = f.rows
    natural = [max([len(heading), *(len(r[i]) for r in rows)]) for i, (heading, _, _) in enumerate(COLUMNS[:-1])]
    natural[0] = min(natural[0], _AGENT_MAX)
    shown = list(range(len(natural)))
    # One space between columns: n columns take their widths plus n - 1.
    while len(shown) > 1 and sum(natural[i] for i in shown) + len(shown) - 1 > width:
        shown.remove(max(shown, key=lambda i: COLUMNS[i][2]))
    widths = {i: min(natural[i], width) for i in shown}
    left = width - sum(widths.values()) - len(shown)
    if left >= _LAST_MIN:
        widths[len(COLUMNS) - 1] = left
        shown.append(len(COLUMNS) - 1)

    def line(cells: Sequence[str]) -> str:
        out = []
        for i in shown:
            w, text = widths[i], cells[i]
            text = text if len(text) <= w else text[: w - 1] + "…"
            out.append(text.rjust(w) if COLUMNS[i][1] else text.ljust(w))
        return " ".join(out).rstrip()

    body = rows if max_rows is None or len(rows) <= max_rows else rows[: max(max_rows - 1, 0)]
    out = [line([heading for heading, _, _ in COLUMNS]), *(line(r) for r in body)]
    if len(body) < len(rows):
        out.append(f"… and {len(rows) - len(body)} more agents (python -m runtime.status shows all)")
    out.append("")
    out += [text if len(text) <= width or not cut else text[: width - 1] + "…" for text in f.footer]
    return out


class FrameView:
    """A frame laid out for the console it is drawn on (``lines``): never wider than it, so nothing
    wraps, and never taller, so ``Live`` redraws exactly what it drew."""

    def __init__(self, f: Frame) -> None:
        self.frame = f

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The frame at ``options.max_width`` and, on a terminal, ``options.max_height``."""
        # Header, blank line and footer are fixed; the agents' rows get what height is left.
        room = options.max_height - len(self.frame.footer) - 2 if console.is_terminal else None
        for i, text in enumerate(lines(self.frame, options.max_width, room)):
            yield Text(text, style="bold" if i == 0 else "", no_wrap=True, overflow="ellipsis")


def plain(f: Frame, width: int = TEXT_WIDTH) -> str:
    """The frame as plain text: the table ``width`` columns wide with every agent in it, the footer's
    lines whole (for ``status.json`` and the last frame, where a reader wants every source named)."""
    return "\n".join(lines(f, width, cut=False))


class LiveView:
    """Redraws the frame in place on a terminal (``rich.live.Live``); off one, prints its summary line
    at most once every ``every_s`` seconds. A context manager: leaving it leaves the last frame drawn."""

    def __init__(self, out: TextIO = sys.stdout, every_s: float = 10.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self._last_print = -every_s
        self._live: Live | None = None
        self._handlers: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []

    def __enter__(self) -> LiveView:
        if self.tty:
            console = Console(file=self.out)
            self._live = Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            self._route_logging(console)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _route_logging(self, console: Console) -> None:
        """Log records written straight to the terminal would move the cursor under ``Live``'s feet:
        send them through its console, which prints them above the frame and redraws it below."""
        terminal = {sys.__stdout__, sys.__stderr__, self.out}
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in terminal:
                self._handlers.append((handler, handler.stream))
                handler.setStream(_ConsoleWriter(console))

    def show(self, f: Frame, elapsed_s: float) -> None:
        """Show one frame (off a terminal, its summary line at most once every ``every_s`` seconds)."""
        if self._live is not None:
            self._live.update(renderable(f), refresh=True)
            return
        if elapsed_s - self._last_print >= self.every_s:
            self.out.write(f.line + "\n")
            self.out.flush()
            self._last_print = elapsed_s


class _ConsoleWriter(io.TextIOBase):
    """A text stream whose complete lines are printed through a ``rich`` console (above a live frame)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._partial = ""

    def write(self, s: str) -> int:
        """Print each complete line; keep an unfinished one for the next write."""
        *done, self._partial = (self._partial + s).split("\n")
        for line in done:
            self._console.print(Text(line), soft_wrap=True, highlight=False, markup=False)
        return len(s)


__all__ = ["COLUMNS", "TEXT_WIDTH", "Frame", "LiveView", "frame", "plain", "renderable"]
