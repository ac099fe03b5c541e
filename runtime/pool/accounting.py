"""Who used what: per-task usage, per-agent totals, per-worker overhead, and reconciliation.

The pool charges every finished task (successful, failed, cancelled or killed) to its agent: its CPU,
and the occupancy of the worker it held (``TaskUsage.occupancy_seconds``, see ``occupancy``). Every CPU-second a
worker burns that is not a task's is named overhead: ``startup``, ``idle`` (waiting and messaging),
``measurement`` (the probes), ``exit`` (after the worker's last report, for workers that stopped
between tasks). ``reconcile`` compares the sum of charges and overhead with what the kernel says each
worker used (its cgroup's CPU counter, else ``/proc/<pid>/stat``), which the workers cannot influence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from msgspec import Struct, field

from runtime.errors import AecoError, ErrorCode
from runtime.protocol import (
    Counters,
    ProtocolError,
    Think,
    ThinkBatch,
    ThinkReport,
    decode_think,
    decode_think_batch,
)

_TICK = os.sysconf("SC_CLK_TCK")


class TaskUsage(Struct, frozen=True):
    """What a task cost, as charged to its agent."""

    cpu_seconds: float
    #: Highest memory use of the worker while the task ran (absolute, bytes).
    peak_memory_bytes: int
    #: Memory use of the worker when the task started.
    baseline_memory_bytes: int
    wall_seconds: float
    worker_pid: int
    #: How the memory was measured: ``cgroup-v1``, ``cgroup-v2``, ``vmhwm`` (or ``rusage`` for a
    #: worker that died, when only its lifetime maximum RSS is known).
    memory_probe: str
    attempts: int = 1
    #: What holding the worker cost beyond the CPU used (see ``occupancy``): charged from the CPU
    #: bucket with ``cpu_seconds``, but not a CPU measurement, so the books against the kernel leave it out.
    occupancy_seconds: float = 0.0

    @property
    def charged_seconds(self) -> float:
        """What the agent's CPU bucket pays: the CPU plus the occupancy surcharge."""
        return self.cpu_seconds + self.occupancy_seconds

    @property
    def task_memory_bytes(self) -> int:
        """Memory the task added on top of what the worker already used."""
        return max(0, self.peak_memory_bytes - self.baseline_memory_bytes)

    def plus(self, later: TaskUsage) -> TaskUsage:
        """This attempt's usage followed by a retry's: CPU and wall add up, peaks take the max."""
        bigger = self if self.task_memory_bytes >= later.task_memory_bytes else later
        return TaskUsage(
            self.cpu_seconds + later.cpu_seconds,
            bigger.peak_memory_bytes,
            bigger.baseline_memory_bytes,
            self.wall_seconds + later.wall_seconds,
            later.worker_pid,
            later.memory_probe,
            self.attempts + later.attempts,
            self.occupancy_seconds + later.occupancy_seconds,
        )


def occupancy(held_seconds: float, share: float, cpu_seconds: float) -> float:
    """The occupancy surcharge of a task that held a worker ``held_seconds`` and used ``cpu_seconds``.

    A worker held is a ``share`` of the container's CPU (its CPUs over the pool's size, at most 1)
    that nobody else can use meanwhile, whether the task computes or sleeps: the task pays
    ``max(cpu, held × share)`` in all, so the surcharge is what that adds to its CPU. A task that
    computes the whole time it holds its worker pays nothing more. ``held_seconds`` leaves out the
    time the worker waited, runnable, for a CPU (``RunDelay``): the host's load, not the task's doing.
    """
    return max(0.0, held_seconds * share - cpu_seconds)


class RunDelay:
    """How long a worker's main thread has waited, runnable, for a CPU, as the kernel counts it (the
    second field of ``/proc/<pid>/schedstat``, ns); still readable while it is a zombie, not once
    reaped. 0 where the kernel does not keep it. Opened once, read with one ``pread``."""

    def __init__(self, pid: int) -> None:
        try:
            self._fd = os.open(f"/proc/{pid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = -1

    def read(self) -> float:
        """Seconds waited so far (0.0 when unknown: the task is then charged its whole hold)."""
        if self._fd < 0:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class AgentTotals(Struct):
    """Running totals for one agent."""

    tasks: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    #: Occupancy surcharges charged on top of ``cpu_seconds`` (see ``occupancy``).
    occupancy_seconds: float = 0.0
    #: The largest memory a single task of this agent added.
    max_task_memory_bytes: int = 0


class WorkerAccount(Struct):
    """The CPU of one worker process, split into charges and named overhead."""

    pid: int
    worker_id: int
    charged: float = 0.0
    counters: Counters | None = None
    #: CPU used after the last report by a worker that stopped (or died) with no task in flight.
    exit: float = 0.0
    #: Kernel CPU total of the process once it has been reaped (``wait4``).
    final_kernel: float | None = None
    cpu_probe: str = "/proc"

    def overhead(self) -> dict[str, float]:
        """Named overhead reported so far."""
        c = self.counters
        if c is None:
            return {"startup": 0.0, "idle": 0.0, "measurement": 0.0, "exit": self.exit}
        return {"startup": c.startup, "idle": c.idle, "measurement": c.measurement, "exit": self.exit}


class Reconciliation(Struct, frozen=True):
    """Charges plus overhead against the kernel's count, over a set of workers."""

    charged: float
    overhead: dict[str, float]
    kernel: float
    workers: int

    @property
    def accounted(self) -> float:
        """Charged plus every named overhead."""
        return self.charged + sum(self.overhead.values())

    @property
    def relative_error(self) -> float:
        """``|accounted - kernel| / kernel`` (0 when nothing ran)."""
        return abs(self.accounted - self.kernel) / self.kernel if self.kernel else 0.0


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process (all threads, reaped children excluded) from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return proc_stat_cpu_seconds(text)


def proc_stat_cpu_seconds(text: str, children: bool = False) -> float:
    """User + system CPU in the text of a ``/proc/<pid>/stat`` file (after the command, which may
    contain spaces and parentheses); with ``children``, plus that of its reaped children."""
    fields = text.rpartition(")")[2].split()
    own = int(fields[11]) + int(fields[12])
    return (own + int(fields[13]) + int(fields[14]) if children else own) / _TICK


#: How far one process's ``/proc`` CPU reading may lag the exact figure: user, system and the two
#: reaped-children counters are each cut down to a whole tick.
PROC_SLACK_S = 4 / _TICK


def proc_tree_cpu_seconds(pid: int) -> tuple[float, int] | None:
    """CPU of a live process and of all its descendants, their reaped children included, from
    ``/proc``; and how many processes were read (each may lag by ``PROC_SLACK_S``). None if ``pid``
    is gone.

    One pass over ``/proc`` (a millisecond or two on a busy host): meant for tasks that start
    processes of their own, not for every task. A descendant reaped between the reading of its
    parent and its own is missed; one reaped after both is counted twice: a reading to bound what a
    worker may claim, not to charge by.
    """
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, CPU with reaped children)
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            stats[int(entry.name)] = (int(text.rpartition(")")[2].split()[1]), proc_stat_cpu_seconds(text, True))
    if pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    total, count, todo = 0.0, 0, [pid]
    while todo:
        p = todo.pop()
        total += stats[p][1]
        count += 1
        todo.extend(children.get(p, ()))
    return total, count


class BadReport(AecoError, ValueError):
    """A usage that cannot be true (not finite, negative, more than the machine has); the message
    names the field."""

    default_code: ErrorCode = "bad_report"


#: Larger than any true amount (30 million CPU-years, a petabyte), small enough that sums of a few
#: stay exact to far below a microsecond or a byte where it matters.
MAX_AMOUNT = 1e15


#: The figures of every record of a task's usage (``Usage``, ``TaskUsage``, the in-flight log's).
USAGE_FIGURES = ("cpu_seconds", "peak_memory_bytes", "baseline_memory_bytes", "wall_seconds")


def check_amounts(record: object, names: Iterable[str], where: str | Callable[[], str]) -> None:
    """Raise ``BadReport`` naming the first of the attributes ``names`` of ``record`` (from ``where``, a
    text or what makes it: only a refusal formats it) that is not a finite amount >= 0 (and at most
    ``MAX_AMOUNT``).

    Amounts come from workers and from the in-flight log: neither may put a NaN, an infinity or a
    negative amount into a charge, a bucket, a live table or a record read at the next start.
    """
    for name in names:
        value = getattr(record, name)
        if not 0 <= value <= MAX_AMOUNT:  # false for a NaN too (every comparison with one is), and for infinities
            place = where if isinstance(where, str) else where()
            raise BadReport(f"{place}: {name} must be finite, >= 0 and <= {MAX_AMOUNT:g}, got {value!r}")


def check_usage(usage: object, where: str | Callable[[], str]) -> None:
    """``check_amounts`` for every figure of a task's usage (``USAGE_FIGURES``)."""
    check_amounts(usage, USAGE_FIGURES, where)


#: Tokens a chat template may add around a think's system text and prompt (a tokenizer makes at most
#: one token of each byte of them).
TEMPLATE_TOKENS = 4096
#: How far past ``max_tokens`` an honest count may go: llama-cpp-python counts tokens it generates to
#: finish a character cut in the middle (6 for ``max_tokens`` 2 with the tiny test model). A bound
#: against claims that would drain a bucket, not an exact one.
EXTRA_COMPLETION_TOKENS = 16


def check_think(spec: Think, output: bytes, where: str) -> None:
    """Raise ``BadReport`` if a think's ``ThinkReport`` does not decode or claims what cannot be:
    far more completion tokens than ``max_tokens``, more prompt tokens than the prompt's bytes plus a
    template, a cost above what its tokens come to at the task's prices."""
    try:
        report = decode_think(output)
    except ProtocolError as exc:
        raise BadReport(f"{where}: {exc}") from None
    _check_think_report(spec, report, where)


def _check_think_report(spec: Think, report: ThinkReport, where: str) -> None:
    prompt_bytes = len(spec.system.encode()) + len(spec.prompt.encode())
    if report.completion_tokens > 2 * spec.max_tokens + EXTRA_COMPLETION_TOKENS:
        raise BadReport(f"{where}: {report.completion_tokens} completion tokens, max_tokens is {spec.max_tokens}")
    if report.prompt_tokens > prompt_bytes + TEMPLATE_TOKENS:
        raise BadReport(f"{where}: {report.prompt_tokens} prompt tokens for {prompt_bytes} bytes of prompt")
    price = report.prompt_tokens * spec.price_prompt_per_1k + report.completion_tokens * spec.price_completion_per_1k
    if report.cost_usd > price / 1000 * (1 + 1e-9) + 1e-12:
        raise BadReport(f"{where}: cost_usd {report.cost_usd!r} is more than its tokens cost at the task's prices")


def check_think_batch(spec: ThinkBatch, output: bytes, where: str) -> None:
    """Raise ``BadReport`` if a ``think_batch``'s report does not decode, has not one report and one
    work count per think, or claims what cannot be: a think's report as ``check_think`` judges it, or
    work beyond its prompt and ``max_tokens`` (the work decides how the batch's CPU is split)."""
    try:
        report = decode_think_batch(output)
    except ProtocolError as exc:
        raise BadReport(f"{where}: {exc}") from None
    n = len(spec.thinks)
    if len(report.reports) != n or len(report.work) != n:
        raise BadReport(f"{where}: {len(report.reports)} reports and {len(report.work)} work counts for {n} thinks")
    for i, (think, one, work) in enumerate(zip(spec.thinks, report.reports, report.work, strict=True)):
        _check_think_report(think, one, f"{where}, think {i}")
        prompt = len(think.system.encode()) + len(think.prompt.encode()) + TEMPLATE_TOKENS
        if work.own_tokens + work.shared_tokens + work.kept_tokens > prompt:
            raise BadReport(f"{where}, think {i}: more prompt tokens of work than {prompt}")
        if work.decode_steps + work.forced_tokens > 2 * think.max_tokens + EXTRA_COMPLETION_TOKENS:
            raise BadReport(
                f"{where}, think {i}: {work.decode_steps} decode steps and {work.forced_tokens} forced tokens, "
                f"max_tokens is {think.max_tokens}"
            )


class Accounts:
    """Per-agent totals and per-worker CPU books for one pool."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentTotals] = {}
        self.workers: dict[int, WorkerAccount] = {}
        self.retired: list[WorkerAccount] = []

    def charge(self, agent: str, usage: TaskUsage, ok: bool, worker_pid: int, cpu: float) -> None:
        """Charge one task attempt: ``cpu`` is this attempt's CPU, booked to the worker that ran it (the
        kernel's books); its occupancy surcharge goes to the agent's totals only."""
        t = self.agents.get(agent)
        if t is None:
            t = self.agents[agent] = AgentTotals()
        t.tasks += 1
        t.failed += 0 if ok else 1
        t.cpu_seconds += cpu
        t.wall_seconds += usage.wall_seconds
        t.occupancy_seconds += usage.occupancy_seconds
        t.max_task_memory_bytes = max(t.max_task_memory_bytes, usage.task_memory_bytes)
        w = self.workers.get(worker_pid)
        if w is not None:
            w.charged += cpu

    def share(self, queued_as: str, usage: TaskUsage, shares: Sequence[tuple[str, TaskUsage]], ok: bool) -> None:
        """A task several agents shared (a ``think_batch``), charged to ``queued_as`` by ``charge``, now
        in each agent's totals as its share instead (the workers' books, which count the task once,
        are unchanged): one task each, their CPU, occupancy and memory summing to ``usage``."""
        t = self.agents.get(queued_as)
        if t is not None and t.tasks:
            t.tasks -= 1
            t.failed -= 0 if ok else 1
            t.cpu_seconds -= usage.cpu_seconds
            t.wall_seconds -= usage.wall_seconds
            t.occupancy_seconds -= usage.occupancy_seconds
        for agent, part in shares:
            a = self.agents.get(agent)
            if a is None:
                a = self.agents[agent] = AgentTotals()
            a.tasks += 1
            a.failed += 0 if ok else 1
            a.cpu_seconds += part.cpu_seconds
            a.wall_seconds += part.wall_seconds
            a.occupancy_seconds += part.occupancy_seconds
            a.max_task_memory_bytes = max(a.max_task_memory_bytes, part.task_memory_bytes)

    def open_worker(self, pid: int, worker_id: int, cpu_probe: str) -> WorkerAccount:
        """Start the books of a new worker process."""
        acct = self.workers[pid] = WorkerAccount(pid, worker_id, cpu_probe=cpu_probe)
        return acct

    def unreported(self, pid: int, kernel_total: float) -> float:
        """CPU a worker used after its last report, given the kernel's total for it."""
        c = self.workers[pid].counters
        return max(0.0, kernel_total - (c.cpu_total if c else 0.0))

    def close_worker(
        self, pid: int, kernel_total: float, exit_overhead: float, cgroup_total: float | None = None
    ) -> None:
        """Close a reaped worker's books. ``exit_overhead`` is its unreported CPU when no task
        was in flight to pay for it (zero otherwise: the task was charged that CPU).

        ``kernel_total`` is ``wait4``'s count; ``cgroup_total`` the worker's cgroup counter, which
        is kept for reconciliation because it does not go through the worker's reports at all."""
        acct = self.workers.pop(pid)
        acct.exit = exit_overhead
        acct.final_kernel = cgroup_total if cgroup_total is not None else kernel_total
        self.retired.append(acct)

    def overhead(self) -> dict[str, float]:
        """Named overhead over every worker, live and retired."""
        out = {"startup": 0.0, "idle": 0.0, "measurement": 0.0, "exit": 0.0}
        for acct in [*self.workers.values(), *self.retired]:
            for k, v in acct.overhead().items():
                out[k] += v
        return out

    def charged(self) -> float:
        """CPU charged to tasks so far."""
        return sum(a.charged for a in [*self.workers.values(), *self.retired])

    def reconcile(self, kernel_cpu: dict[int, float], retired: bool = False) -> Reconciliation:
        """Compare books with kernel readings: the live workers given (pid -> CPU seconds), and
        with ``retired`` also every reaped worker (its cgroup counter or ``wait4`` total)."""
        pairs = [(self.workers[pid], cpu) for pid, cpu in kernel_cpu.items()]
        if retired:
            pairs += [(a, a.final_kernel or 0.0) for a in self.retired]
        charged = 0.0
        overhead = {"startup": 0.0, "idle": 0.0, "measurement": 0.0, "exit": 0.0}
        kernel = 0.0
        for acct, cpu in pairs:
            charged += acct.charged
            for k, v in acct.overhead().items():
                overhead[k] += v
            kernel += cpu
        return Reconciliation(charged, overhead, kernel, len(pairs))


class UsageSummary(Struct):
    """The JSON summary written when the supervisor exits."""

    agents: dict[str, AgentTotals]
    charged_cpu_seconds: float
    overhead_cpu_seconds: dict[str, float]
    supervisor_cpu_seconds: float
    workers_started: int
    workers_crashed: int
    memory_probe: str
    cgroups: str
    #: Every worker's books against its kernel count (live ones and reaped ones).
    reconciliation: Reconciliation | None = None
    container: dict[str, float | int | None] = field(default_factory=dict)
