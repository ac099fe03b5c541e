"""The worker pool: the I/O around the scheduler — a ZeroMQ ROUTER in the supervisor, one DEALER per
worker process, the kernel's counters of each, and the books.

``WorkerPool`` decides nothing itself: every event (a submit, a cancel, a frame, a worker's exit, a
timer) goes to the ``Scheduler``, whose commands it carries out (see ``runtime.pool``'s diagram).

Invariants (asserted where they can break):

- A worker runs at most one task at a time (``scheduler``): up to ``prefetch`` plain tasks may wait in
  a busy worker's socket; the worker takes them one after another, and each begins, as this loop sees
  it, when the one ahead of it answered. Submitting and cancelling may come from any thread: every
  entry point holds the pool's lock (``_locked``).
- Every task that reaches a worker is charged exactly once per attempt: from its ``Result`` when the
  worker answers, from the kernel (``wait4``) when it dies first (``lost``). Nothing else charges tasks.
- Every worker process is reaped (through its pidfd) and its child cgroups are removed (``process``).
- Only the workers this pool spawned are heard (``wire``): each gets a random identity and a secret
  through an inherited pipe, and nothing from a peer is read before its ``Hello`` proves the secret.
  What a worker reports is checked before it is charged (``_check_report``): a usage that cannot be
  true is refused and its task charged from the kernel's count instead, and CPU above the kernel's
  count of the worker since the task was sent is cut to that count.

Failures become clear errors rather than hangs: a worker that dies fails its task with
``worker_crashed`` (``WorkerCrashed``, also a ``BrokenProcessPool``; retried once if the task is
idempotent); a task over its deadline has its worker killed and fails with ``deadline_exceeded``; too
many crashes in a window and the pool fails every task with ``pool_failed`` instead of restarting
forever.

Holding a worker is paid for: each attempt's ``TaskUsage`` carries an occupancy surcharge of
``max(0, held × share - cpu)`` (``accounting.occupancy``), ``held`` being the time from dispatch to the
end as this loop sees it less the time the worker waited for a CPU (``RunDelay``), ``share`` the
container's CPUs over the pool's size (at most 1).

Cancelling stops the task (``RunningTask.stop``, ``run`` when its caller is cancelled): a ``think`` or an
``invoke`` is asked to stop (SIGUSR1: the worker ends the generation between tokens, or kills the
confined child) and answers ``cancelled`` with its measured usage, keeping its worker; any other task,
or one that has not answered within ``cancel_grace_s``, has its worker killed and is charged from the
kernel. Either way the task ends once, with ``cancelled``, and its worker is free (or replaced) at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Unpack

import msgspec
import zmq

from runtime import protocol as p
from runtime.config import PoolConfig
from runtime.errors import AecoError, ErrorCode
from runtime.host import cgroups as cg
from runtime.host.tally import TaskTally
from runtime.pool.accounting import (
    PROC_SLACK_S,
    Accounts,
    BadReport,
    TaskUsage,
    check_amounts,
    check_think,
    check_think_batch,
    check_usage,
    occupancy,
    proc_cpu_seconds,
    proc_tree_cpu_seconds,
)
from runtime.pool.inflight import InFlight, InflightLog, KernelCpu
from runtime.pool.lost import charge_lost, crash_story, lost_failure
from runtime.pool.process import Death, WorkerProcess
from runtime.pool.scheduler import (
    ArmDeadline,
    AskStop,
    Command,
    Fail,
    Kill,
    Lost,
    PoolFailed,
    Scheduler,
    Send,
    Shutdown,
    Spawn,
    Start,
    Worker,
)
from runtime.pool.task import (
    STOPS_WHEN_ASKED,
    Done,
    ForAgent,
    KernelReading,
    Outcome,
    PoolJob,
    Serve,
    TaskFailed,
    TaskOptions,
    WorkerCrashed,
    check_timeout,
)
from runtime.pool.wire import Wire, hand_keys, proves

__all__ = ["PoolStatus", "RunningTask", "WorkerPool", "resolve_size"]

log = logging.getLogger("runtime.pool")

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` holding the pool's lock: the pool's state is touched by its event loop and, for
    submitting and cancelling, by any thread (``WorkerPoolExecutor`` submits from its callers' threads)."""

    @functools.wraps(method)
    def locked(self: WorkerPool, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def _settle(fut: asyncio.Future[Outcome], out: Outcome | None, err: TaskFailed | None) -> None:
    """End ``fut`` as a task ended: with its ``Outcome``, else its failure."""
    if out is not None:
        fut.set_result(out)
    else:
        fut.set_exception(err or TaskFailed("task_error", "no outcome"))


@dataclass(slots=True, eq=False)
class RunningTask:
    """A task handed to the pool (``WorkerPool.begin``). ``ended`` resolves with its ``Outcome`` or fails
    with ``TaskFailed`` once, and the pool never cancels it: whoever charges the task reads it there."""

    pool: WorkerPool
    task_id: int
    ended: asyncio.Future[Outcome]

    async def stop(self) -> None:
        """Cancel the task and wait until it has ended (within the pool's ``cancel_grace_s`` and a
        kill): ``ended`` then says how, ``cancelled`` with what it used unless it finished first."""
        if not self.ended.done() and self.pool.cancel(self.task_id):
            await asyncio.wait([self.ended])
        if not self.ended.cancelled():
            self.ended.exception()  # looked at: asyncio does not warn of an exception never retrieved


@dataclass(slots=True, eq=False)
class _Worker:
    """A worker as the pool holds it: its scheduling state (``slot``), process, identity and books."""

    slot: Worker[PoolJob]
    ident: bytes
    #: What it must say in its ``Hello`` (handed to it through an inherited pipe, see ``WorkerKeys``).
    secret: bytes
    process: WorkerProcess
    counters: p.Counters | None = None
    memory_probe: str = "off"
    #: The kernel's CPU counter of the worker, opened at its hello.
    cpu_counter: KernelCpu | None = None
    #: Why its last report was refused (with ``kill_reason`` ``bad_report``).
    bad_report: str = ""
    #: How long it had waited for a CPU by the start of the task in hand.
    delay_at_start: float = 0.0
    #: Where the ``inflight`` record of a task that waited behind the last one to answer counts from:
    #: that one's baseline plus the CPU it was charged (None: it had no baseline).
    next_baseline: float | None = None
    #: While its answer is handled: the readings just taken of its run delay and of its kernel CPU counter
    #: (cgroup only), which the start of its next task and a task sent to it meanwhile reuse.
    answered_delay: float | None = None
    answered_cpu: KernelReading | None = None
    #: Tasks it answered: what its tally counts beyond these began there without an answer coming back.
    answered: int = 0
    # Copies of ``slot.wid`` and ``process.pid``, which never change: plain reads on the hot path.
    worker_id: int = field(init=False)
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.worker_id = self.slot.wid
        self.pid = self.process.pid

    @property
    def state(self) -> str:
        return self.slot.state

    @property
    def job(self) -> PoolJob | None:
        return self.slot.job

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """Its ``subprocess.Popen`` (ProcessPoolExecutor's view of a worker)."""
        return self.process.proc

    def held(self, delay: float | None = None) -> float:
        """Seconds the task in hand has held this worker, less those it waited for a CPU (``delay``: its
        run delay, if just read)."""
        if delay is None:
            delay = self.process.run_delay.read()
        return max(0.0, time.monotonic() - self.slot.job_started - (delay - self.delay_at_start))


class PoolStatus(msgspec.Struct):
    """A snapshot for status displays."""

    size: int
    live: int
    idle: int
    busy: int
    queued: int
    started: int
    crashed: int
    failed: str | None
    memory_probe: str
    cgroups: str
    cpu_capacity: float
    memory_limit: int | None
    workers: list[dict[str, Any]] = []


def resolve_size(cfg: PoolConfig, info: cg.CgroupInfo | None = None) -> int:
    """Number of workers: the configured count, or the container's CPU capacity for ``auto``."""
    if cfg.workers != "auto":
        return cfg.workers
    return max(1, int(cg.cpu_capacity(info or cg.discover())))


#: How far a worker's cgroup CPU counter may lag its own getrusage: both count the scheduler's
#: nanoseconds; this covers the last update of a running thread's figure.
_CGROUP_SLACK_S = 0.002
#: Processors that can run a worker: what bounds a report's CPU (``os.cpu_count`` reads /sys each call).
_CPUS = os.cpu_count() or 1
_HOST_MEMORY = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
#: The commands addressed to one worker (``_carry_out``).
_TO_A_WORKER = (Send, Start, Kill, AskStop, Shutdown)


class WorkerPool:
    """An asyncio pool of worker processes with per-task measurement. Use ``async with``."""

    def __init__(
        self,
        cfg: PoolConfig | None = None,
        *,
        size: int | None = None,
        run_dir: str | None = None,
        hide: Iterable[str] = (),
        inflight: InflightLog | None = None,
        worker_command: Sequence[str] = (),
        initializer: bytes = b"",
    ) -> None:
        self.cfg = cfg or PoolConfig()
        #: A pickled ``(fn, args)`` each worker calls before saying hello; if it raises, the pool fails
        #: (``initializer_error`` holds the worker's traceback), as ProcessPoolExecutor breaks.
        self.initializer = initializer
        self.initializer_error = ""
        #: Called with the reason when a worker dies unexpectedly or the pool fails (the executor
        #: breaks then, as ProcessPoolExecutor does; this pool itself restarts the worker).
        self.on_broken: Callable[[str], None] | None = None
        #: The program a worker runs (default ``python -m workers.worker``): any program that reads its
        #: ``WorkerBoot`` and ``WorkerKeys`` and speaks the protocol, e.g. the same under a profiler.
        self.worker_command = list(worker_command) or [sys.executable, "-m", "workers.worker"]
        #: Where tracked tasks are recorded while they run, for charging them after a supervisor crash.
        self.inflight = inflight
        #: Paths that confined code run by the workers must not see (the pool adds its socket directory).
        self.hide = [os.path.abspath(h) for h in hide]
        self.info = cg.discover() if self.cfg.cgroups == "auto" else cg.CgroupInfo("none", {}, {})
        self.size = size or resolve_size(self.cfg, self.info)
        check_timeout(self.cfg.task_timeout_s)  # a config built in code skips msgspec's validation
        #: The part of the container's CPU that one worker is: what holding it for a second costs.
        self.share = min(1.0, cg.cpu_capacity(self.info) / self.size)
        self.accounts = Accounts()
        #: Reports refused (``bad_report``) and reports whose CPU was cut to the kernel's count.
        self.refused_reports = 0
        self.capped_reports = 0
        #: Set by the economy: answering a task's calls to the world is then charged to its agent.
        self.for_agent: ForAgent | None = None
        self.started = 0
        self.cgroup_status = "cgroups off by configuration" if self.cfg.cgroups == "off" else ""
        self._sched: Scheduler[PoolJob] = Scheduler(self.cfg, self.size)
        self._own_run_dir = run_dir is None
        self._run_dir = run_dir or tempfile.mkdtemp(prefix="aeco-pool-")
        self._ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        #: Live workers by socket identity (what frames name) and by id (what the scheduler names).
        self._workers: dict[bytes, _Worker] = {}
        self._by_id: dict[int, _Worker] = {}
        self._wire: Wire | None = None
        self._all_exited: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._sampler: asyncio.TimerHandle | None = None
        #: Held by every entry point (``_locked``): the loop's callbacks and other threads' submits.
        self._mutex = threading.RLock()
        self._loop_thread: int | None = None
        #: Commands given and not yet carried out (``_do``), and whether ``_do`` is carrying them out.
        self._commands: collections.deque[Command[PoolJob]] = collections.deque()
        self._carrying_out = False
        #: Tasks given to each worker (by id) and not sent yet, with whether each is recorded in flight:
        #: sent in one frame once the commands are carried out, or, while frames are drained
        #: (``_holding``), once the drain is over: the results of a burst make one frame of tasks.
        self._outbox: dict[int, list[tuple[PoolJob, bool]]] = {}
        self._holding = False

    @property
    def failed(self) -> str | None:
        """Why the pool gave up (too many crashes, a failing initializer), or None."""
        return self._sched.failed

    @property
    def crashed(self) -> int:
        """Workers that died unexpectedly."""
        return self._sched.crashed

    @property
    def refused_frames(self) -> int:
        """Frames from peers that are not a worker this pool spawned and that proved it."""
        return self._wire.refused_frames if self._wire is not None else 0

    @property
    def malformed_frames(self) -> int:
        """Frames that were not one well-formed message."""
        return self._wire.malformed_frames if self._wire is not None else 0

    # ----------------------------------------------------------------------------------- lifecycle

    async def start(self) -> WorkerPool:
        """Bind the socket and start the workers; returns once all of them said hello. A pool starts
        once: ``AecoError`` (``pool_closed``) after ``close``, (``busy``) if it is already started."""
        if self._sched.closing:
            raise AecoError("this pool was closed; a closed pool cannot be started again", code="pool_closed")
        if self._loop is not None:
            raise AecoError("this pool is already started", code="busy")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._all_exited = asyncio.Event()
        self._ready = asyncio.Event()
        self._wire = Wire(self.cfg, self._run_dir)
        self._loop.add_reader(self._wire.fileno(), self._drain)
        if self.info.mode != "none":
            cg.sweep_stale(self.info)
        for _ in range(self.size):
            self._spawn()
        self._arm_monitor()
        if self.inflight is not None:
            self._sampler = self._loop.call_later(self.cfg.sample_s, self._sample_inflight)
        deadline = self.cfg.startup_timeout_s + 1
        try:
            await asyncio.wait_for(self._ready.wait(), deadline)
        except TimeoutError:
            await self.close()
            raise RuntimeError(f"workers did not start within {deadline:.0f} s") from None
        if self.failed:
            await self.close()
            raise RuntimeError(f"worker pool failed to start: {self.failed}")
        return self

    async def __aenter__(self) -> WorkerPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop every worker: finish in-flight tasks within ``grace_s``, then kill; reap all."""
        with self._mutex:
            if self._sched.closing or self._loop is None:
                return
            self._do(self._sched.close())
        assert self._all_exited is not None
        if self._workers:
            try:
                await asyncio.wait_for(self._all_exited.wait(), grace_s)
            except TimeoutError:
                with self._mutex:
                    self._do(self._sched.kill_all("pool_closed"))
                await asyncio.wait_for(self._all_exited.wait(), 5.0)
        with self._mutex:
            for timer in (self._monitor, self._deadline_timer, self._sampler):
                if timer is not None:
                    timer.cancel()
            if self._wire is not None:
                self._loop.remove_reader(self._wire.fileno())
                self._wire.close()
        if self._wire is not None:
            self._wire.term()
        if self._own_run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------ submitting

    @_locked
    def submit(
        self,
        spec: p.TaskSpec,
        done: Done,
        *,
        agent: str = "default",
        timeout_s: float | None = None,
        idempotent: bool = False,
        measure: bool = True,
        memory_limit: int = 0,
        claim: Callable[[], bool] | None = None,
        serve: Serve | None = None,
        track: str | None = None,
        sharers: tuple[str, ...] = (),
        prefer: int = 0,
        depth: int = 0,
    ) -> int:
        """Queue a task; ``done(outcome, error)`` is called on the pool's loop when it ends.

        ``prefer``: a worker's pid; when the task's turn comes and that worker is idle, it runs there
        (a hint: else on any idle worker). ``depth``: how many tasks may wait at a busy worker when this
        one is sent to wait there, if more than ``prefetch`` (a burst: they travel several per frame).

        ``track``: the ledger's id of the task, to record it in ``inflight`` from dispatch until the
        caller clears it (once its charge is durable); ``sharers``: the agents of a tracked ``think_batch``.
        ``claim``: called once just before the task is
        sent; False means it was cancelled meanwhile (it is then dropped, ``done`` not called). Returns
        the task id. ``InvalidTimeout`` (a ``ValueError``) for a ``timeout_s`` that is not a positive
        finite number.
        """
        timeout = check_timeout(timeout_s)
        stops_when_asked = isinstance(spec, STOPS_WHEN_ASKED)
        job = PoolJob(
            id=next(self._ids),
            agent=agent,
            timeout_s=timeout or self.cfg.task_timeout_s,
            idempotent=idempotent,
            plain=not stops_when_asked,
            stops_when_asked=stops_when_asked,
            claim=claim,
            spec=spec,
            measure=measure,
            memory_limit=memory_limit,
            done=done,
            serve=serve,
            track=track,
            sharers=sharers,
            prefer=next((w.worker_id for w in self._workers.values() if w.pid == prefer), 0) if prefer else 0,
            depth=depth,
        )
        self._do(self._sched.submit(job, time.monotonic()))
        return job.id

    def _future(self) -> asyncio.Future[Outcome]:
        if self._loop is None:
            raise AecoError("the pool is not started: await pool.start() (or use async with) first", code="closed")
        return self._loop.create_future()

    def begin(self, spec: p.TaskSpec, **options: Unpack[TaskOptions]) -> RunningTask:
        """Queue one task and return its handle: ``ended`` resolves with its ``Outcome`` or fails with
        ``TaskFailed``; ``stop()`` cancels it. Options as for ``run``. ``AecoError`` (``closed``) before
        ``start``."""
        ended = self._future()
        return RunningTask(self, self.submit(spec, functools.partial(_settle, ended), **options), ended)

    async def run(self, spec: p.TaskSpec, **options: Unpack[TaskOptions]) -> Outcome:
        """Run one task and return its ``Outcome``; raise ``TaskFailed`` if it did not succeed.

        Options (``TaskOptions``): ``agent`` it is charged to; ``timeout_s``, its deadline once it runs
        (a positive finite number; None: ``task_timeout_s``); ``idempotent`` (retried once after a
        worker crash); ``measure`` (False: no probes, benchmarks only); ``memory_limit``, bytes the
        task may add to its worker's memory (0: unlimited; over it the task fails with
        ``memory_exceeded`` and is charged what it used); ``serve``; ``track``, ``depth`` (see ``submit``).
        Cancelling the caller stops the task (see ``RunningTask.stop``) before the cancellation goes on.
        """
        # Not ``shield(begin(...).ended)``: the caller waits on a future of its own, settled in the same call
        # as ``ended``, so that its cancel leaves ``ended`` alone without the two loop turns a shield adds.
        ended, waiter = self._future(), self._future()

        def done(out: Outcome | None, err: TaskFailed | None) -> None:
            _settle(ended, out, err)
            if not waiter.cancelled():
                _settle(waiter, out, err)
                if err is not None:
                    ended.exception()  # the caller gets it from ``waiter``; asyncio must not warn of ``ended``

        task = RunningTask(self, self.submit(spec, done, **options), ended)
        try:
            return await waiter
        except asyncio.CancelledError:
            await task.stop()
            raise

    @_locked
    def cancel(self, task_id: int) -> bool:
        """Stop task ``task_id``, which then ends ``cancelled``: a queued one at once (charged what
        earlier attempts used, if any), a running one once its worker stopped it (see the module's
        docstring). False if no such task is queued or running."""
        found, cmds = self._sched.cancel(task_id, time.monotonic())
        self._do(cmds)
        return found

    @_locked
    def stop_think(self, task_id: int, index: int) -> bool:
        """Stop think ``index`` of the running ``think_batch`` ``task_id`` (``StopThink``): its sequence
        ends between two decode steps with a ``cancelled`` report, the others finish. False if that
        batch is not running (queued, ended) or has no such think."""
        for sw in self._sched.workers.values():
            job = sw.job if sw.state == "busy" else None
            if job is not None and job.id == task_id and isinstance(job.spec, p.ThinkBatch):
                w = self._by_id.get(sw.wid)
                if w is None or not 0 <= index < len(job.spec.thinks):
                    return False
                return self._send(w, p.StopThink(task_id=task_id, index=index))
        return False

    # ---------------------------------------------------------------------- carrying out commands

    def _do(self, cmds: list[Command[PoolJob]]) -> None:
        """Carry out the scheduler's commands in the order it gave them. Carrying one out may call back
        into the pool (a task's ``done`` submits another): the commands that produces wait behind the
        ones given before, or a worker could be sent a task that waits before the one it runs."""
        if not cmds and not self._commands and not self._outbox:
            return  # the common "nothing to do" (a report, the end of a drain), without the loop below
        self._commands.extend(cmds)
        if self._carrying_out:
            return
        self._carrying_out = True
        try:
            while self._commands or (self._outbox and not self._holding):
                while self._commands:
                    self._carry_out(self._commands.popleft())
                if not self._holding:
                    for wid in list(self._outbox):
                        self._flush(wid)  # a send that fails gives commands: carried out in this loop
        finally:
            self._carrying_out = False

    def _carry_out(self, cmd: Command[PoolJob]) -> None:
        if isinstance(cmd, _TO_A_WORKER):
            w = self._by_id.get(cmd.wid)
            if w is None:
                return  # reaped since (a callback raised before this command was reached): nothing to do
            if isinstance(cmd, Send):
                self._send_task(w, cmd.job, cmd.runs_now)
            elif isinstance(cmd, Start):
                self._begun(w)
            elif isinstance(cmd, Kill):
                w.process.kill()
            elif isinstance(cmd, AskStop):
                w.process.ask_stop()
            else:
                self._send(w, p.Shutdown())
        elif isinstance(cmd, Fail):
            failure = WorkerCrashed if cmd.code == "worker_crashed" else TaskFailed  # a BrokenProcessPool too
            cmd.job.done(None, failure(cmd.code, cmd.message, cmd.job.prior))
        elif isinstance(cmd, ArmDeadline):
            self._arm_deadline(cmd.when)
        elif isinstance(cmd, Spawn):
            if cmd.delay:
                assert self._loop is not None
                self._loop.call_later(cmd.delay, self._restart)
            else:
                self._spawn()
        elif isinstance(cmd, PoolFailed):
            if self.on_broken is not None:
                self.on_broken(cmd.reason)
            if self._ready is not None:
                self._ready.set()

    def _begun(self, w: _Worker) -> None:
        """``w`` now runs its task: its held time counts from here, and a tracked task that waited there
        behind the one that just answered is recorded in flight."""
        delay = w.answered_delay
        w.delay_at_start = delay if delay is not None else w.process.run_delay.read()
        job = w.job
        if job is None or job.sent_to != w.worker_id or job.track is None or self.inflight is None:
            return  # sent to an idle worker: recorded as it is sent (``_send_task``)
        # Its CPU counts from where the measured CPU of the task ahead ended: the two records together
        # charge the worker's count once, with no gap.
        assert w.cpu_counter is not None, "opened at hello"
        self._record(w, job, w.next_baseline if w.next_baseline is not None else w.cpu_counter.read())

    def _send_task(self, w: _Worker, job: PoolJob, runs_now: bool) -> None:
        """Send ``job`` to ``w``: it runs at once (``runs_now``), else it waits behind its tasks."""
        if job.measure:
            reading = w.answered_cpu
            job.kernel_start = reading if reading is not None else self._kernel_reading(w, job)
        # A task sent to wait is recorded when its turn comes (``Start``): until then its worker's CPU
        # is the running task's, and a crash charges it so.
        recorded = runs_now and job.track is not None and self.inflight is not None
        if recorded:
            self._record(w, job)  # before sending: a kill may come any time
        job.sent_to = w.worker_id
        self._outbox.setdefault(w.worker_id, []).append((job, recorded))

    def _flush(self, wid: int) -> None:
        """Send worker ``wid`` the tasks given to it since the last flush: one frame carries them all."""
        given = self._outbox.pop(wid, None)
        w = self._by_id.get(wid)
        if not given or w is None:
            return  # reaped since: its death settled them as tasks of that worker
        for at in range(0, len(given), p.MAX_TASKS_PER_FRAME):
            part = given[at : at + p.MAX_TASKS_PER_FRAME]
            tasks = [p.Task(id=j.id, spec=j.spec, measure=j.measure, memory_limit=j.memory_limit) for j, _ in part]
            if self._send(w, tasks[0] if len(tasks) == 1 else p.Tasks(tasks=tasks)):
                continue
            # The worker is gone before it saw them (and is killed): the tasks go back untouched, the
            # first at the head of its agent's line.
            for job, recorded in reversed(given[at:]):
                if recorded and job.track is not None and self.inflight is not None:
                    self.inflight.clear(job.track)
                self._do(self._sched.unsent(wid, job, time.monotonic()))
            return

    def _record(self, w: _Worker, job: PoolJob, baseline: float | None = None) -> None:
        """Record ``job`` in flight on ``w``, its CPU counted from ``baseline`` (None: from its sending)."""
        assert w.cpu_counter is not None and job.track is not None and self.inflight is not None, "opened at hello"
        if baseline is None:
            # In cgroup mode the reading just taken for the report's bound is the same counter, read again.
            start = job.kernel_start
            baseline = start.cpu if start is not None and w.cpu_counter.probe == "cgroup" else w.cpu_counter.read()
        job.baseline = baseline
        now = time.time()
        self.inflight.begin(
            InFlight(
                task_id=job.track,
                agent=job.agent,
                kind=p.kind_of(job.spec),
                worker_id=w.worker_id,
                worker_pid=w.pid,
                started_at=now,
                cpu_probe=w.cpu_counter.probe,
                baseline_cpu=baseline or 0.0,
                prior_cpu=job.prior.cpu_seconds if job.prior is not None else 0.0,
                baseline_memory=w.counters.memory_bytes if w.counters else 0,
                cgroups=w.process.cgroups,
                sampled_cpu=baseline or 0.0,
                sampled_at=now,
                share=self.share,
                sharers=list(job.sharers),
            )
        )

    @_locked
    def _sample_inflight(self) -> None:
        """Write down the kernel's CPU counter of every worker running a tracked task."""
        assert self._loop is not None and self.inflight is not None
        readings = [
            (job.track, cpu)
            for w in self._workers.values()
            if w.state == "busy" and (job := w.job) is not None and job.track is not None
            if w.cpu_counter is not None and (cpu := w.cpu_counter.read()) is not None
        ]
        self.inflight.sample(readings)  # also commits what finished or was charged since the last commit
        if not self._sched.closing:
            self._sampler = self._loop.call_later(self.cfg.sample_s, self._sample_inflight)

    def _send(self, w: _Worker, msg: p.Message) -> bool:
        """Send ``msg`` to ``w``; False (and ``w`` killed) if it is unreachable."""
        wire = self._wire
        assert wire is not None
        if w.worker_id in self._outbox and not isinstance(msg, p.Task | p.Tasks):
            self._flush(w.worker_id)  # the tasks given to it before go first
        try:
            wire.send(w.ident, msg)
        except zmq.ZMQError as exc:
            log.warning("worker %d unreachable (%s); killing it", w.worker_id, exc)
            self._do(self._sched.kill(w.worker_id, "unreachable"))
            return False
        finally:
            # Sending can consume the edge that signals pending input; look again.
            if self._loop is not None and wire.has_input():
                self._soon(self._drain)
        return True

    # --------------------------------------------------------------------------------- receiving

    @_locked
    def _drain(self) -> None:
        wire = self._wire
        if wire is None:
            return
        # The tasks the frames give workers (the next ones of a burst) are held until all are read.
        self._holding = True
        try:
            while wire.has_input():
                frames = wire.recv()
                try:
                    self._handle(frames)
                except Exception:  # a bug in one message's handling must not stop the pool
                    log.exception("error while handling a frame")
        finally:
            self._holding = False
            self._do([])  # sends them

    def _handle(self, frames: list[bytes]) -> None:
        wire = self._wire
        assert wire is not None
        if len(frames) != 2:
            return wire.drop(f"{len(frames)} parts, expected identity + message")
        w = self._workers.get(frames[0])
        if w is None:
            return wire.refuse(frames[0], "not a worker this pool spawned")
        msg = wire.decode(frames[1], f"worker {w.worker_id}")
        if msg is None:
            return None
        if w.state == "starting" and not isinstance(msg, p.Hello):
            return wire.refuse(frames[0], f"{type(msg).__name__} before its hello")
        self._sched.seen(w.worker_id, time.monotonic())
        if isinstance(msg, p.Result):
            self._on_result(w, msg)
        elif isinstance(msg, p.Heartbeat):
            try:
                self._note_counters(w, msg.counters)
            except BadReport as exc:
                return self._refuse_report(w, exc)
        elif isinstance(msg, p.Request):
            self._on_request(w, msg)
        elif isinstance(msg, p.Hello):
            self._on_hello(w, msg)
        else:
            wire.drop(f"unexpected {type(msg).__name__} from worker {w.worker_id}")
        return None

    def _on_request(self, w: _Worker, msg: p.Request) -> None:
        job = w.job
        if w.state != "busy" or job is None or msg.task_id != job.id:
            assert self._wire is not None
            return self._wire.drop(f"request for task {msg.task_id} not running on worker {w.worker_id}")
        if job.serve is None:
            self._send(
                w, p.Reply(task_id=job.id, seq=msg.seq, answer=p.RefusedAnswer(error="this task has no channel"))
            )
            return None
        assert self._loop is not None
        answering = self._answer(w, job, job.serve, msg)
        self._loop.create_task(answering if self.for_agent is None else self.for_agent(job.agent, answering))
        return None

    async def _answer(self, w: _Worker, job: PoolJob, serve: Serve, msg: p.Request) -> None:
        answer: p.WorldAnswer
        try:
            answer = await serve(msg.call)
        except Exception as exc:  # a failing handler is the request's error, not the pool's
            what = p.kind_of(msg.call)
            log.exception("serving %s for task %d", what, job.id)
            answer = p.RefusedAnswer(error=f"internal error serving {what}: {type(exc).__name__}")
        with self._mutex:
            if w.job is job and w.state == "busy":  # the task may have ended (or its worker died) meanwhile
                self._send(w, p.Reply(task_id=job.id, seq=msg.seq, answer=answer))

    def _note_counters(self, w: _Worker, c: p.Counters) -> None:
        """Keep a worker's books; ``BadReport`` (and nothing kept) if a figure is not finite and >= 0:
        status displays read them, the scheduler recycles on them, and a dying worker's task is
        charged what the kernel counted beyond them."""
        check_amounts(c, p.Counters.__struct_fields__, lambda: f"worker {w.worker_id}'s counters")
        w.counters = c
        acct = self.accounts.workers.get(w.pid)
        if acct is not None:
            acct.counters = c
        self._do(self._sched.report(w.worker_id, c.tasks_done, c.memory_bytes))

    def _on_hello(self, w: _Worker, msg: p.Hello) -> None:
        assert self._wire is not None
        if not proves(msg, w.secret):
            # The worker we spawned does not have this slot: whoever holds its identity is not it.
            self._wire.refuse(w.ident, f"hello of worker {w.worker_id} without its secret")
            if w.state == "starting" and w.slot.kill_reason is None:
                self._do(self._sched.kill(w.worker_id, "refused_hello"))
            return None
        if w.state != "starting" or msg.pid != w.pid or msg.worker_id != w.worker_id:
            return self._wire.drop(f"hello from worker {w.worker_id} in state {w.state}")
        if msg.init_error:
            if not self.failed:
                self.initializer_error = msg.init_error
                self._do(self._sched.fail_pool(f"the initializer failed in worker {w.worker_id}"))
            return None
        if not w.process.in_cgroups():
            log.warning("worker %d is not in its cgroups; measuring it through /proc", w.worker_id)
            w.process.leave_cgroups()
            self.accounts.workers[w.pid].cpu_probe = "/proc"
        try:
            self._note_counters(w, msg.counters)
        except BadReport as exc:
            return self._refuse_report(w, exc)
        w.cpu_counter = KernelCpu(w.pid, w.process.cgroups)
        w.memory_probe = msg.memory_probe
        cmds = self._sched.hello(w.worker_id, msg.counters.memory_bytes, time.monotonic())
        if self._ready is not None and self._sched.ready():
            self._ready.set()
        self._do(cmds)
        return None

    def _on_result(self, w: _Worker, msg: p.Result) -> None:
        job = w.job
        if w.state != "busy" or job is None or msg.task_id != job.id:
            assert self._wire is not None
            return self._wire.drop(f"result for task {msg.task_id} not running on worker {w.worker_id}")
        try:
            cpu = self._check_report(w, job, msg.usage)
            if msg.ok and isinstance(job.spec, p.Think):  # its tokens are charged from its output
                check_think(job.spec, msg.output, f"worker {w.worker_id}'s report of task {job.id}")
            if msg.ok and isinstance(job.spec, p.ThinkBatch):  # its CPU is split by its output
                check_think_batch(job.spec, msg.output, f"worker {w.worker_id}'s report of task {job.id}")
            # Last: the counters of a refused report must not lower what its task is charged.
            self._note_counters(w, msg.counters)
        except BadReport as exc:
            w.answered_cpu = None
            return self._refuse_report(w, exc)
        self._sched.answered(w.worker_id)
        w.answered += 1
        w.next_baseline = None if job.baseline is None else job.baseline + cpu
        # The readings taken now are reused for the task that starts here and one sent here meanwhile.
        w.answered_delay = w.process.run_delay.read()
        try:
            held = w.held(w.answered_delay)
            if msg.usage is not None:
                u = msg.usage
                usage = TaskUsage(
                    cpu,
                    u.peak_memory_bytes,
                    u.baseline_memory_bytes,
                    u.wall_seconds,
                    w.pid,
                    w.memory_probe,
                    occupancy_seconds=occupancy(held, self.share, cpu),
                )
            else:  # unmeasured (benchmark) task
                wall = time.monotonic() - w.slot.job_started
                usage = TaskUsage(0.0, 0, 0, wall, w.pid, "off", occupancy_seconds=occupancy(held, self.share, 0.0))
            self.accounts.charge(job.agent, usage, msg.ok, w.pid, usage.cpu_seconds)
            if job.prior is not None:
                usage = job.prior.plus(usage)
            if job.track is not None and self.inflight is not None:
                self.inflight.finish(job.track, usage)
            if msg.ok:
                job.done(Outcome(job.id, job.agent, msg.output, usage), None)
            else:
                code: ErrorCode = msg.error_code or "task_error"
                job.done(None, TaskFailed(code, msg.error or "failed", usage, msg.output))
            self._do(self._sched.resume(w.worker_id, time.monotonic()))
        finally:
            w.answered_delay = w.answered_cpu = None
        return None

    def _kernel_reading(self, w: _Worker, job: PoolJob) -> KernelReading | None:
        """The kernel's CPU count of ``w`` (what a report of ``job`` is bounded by), and its slack.

        The worker's cgroup counts it and everything it starts, to the nanosecond. Without one,
        ``/proc``: the worker with its reaped children, and for confined code (whose processes the
        sandbox's zygote reaps, not the worker) the worker's whole process tree.
        """
        counter = w.cpu_counter
        if counter is None:
            return None
        if counter.probe == "cgroup":
            cpu = counter.read()
            return None if cpu is None else KernelReading(cpu, _CGROUP_SLACK_S)
        if isinstance(job.spec, p.Invoke):
            tree = proc_tree_cpu_seconds(w.pid)
            return None if tree is None else KernelReading(tree[0], tree[1] * PROC_SLACK_S)
        cpu = counter.read(children=True)
        return None if cpu is None else KernelReading(cpu, PROC_SLACK_S)

    def _check_report(self, w: _Worker, job: PoolJob, usage: p.Usage | None) -> float:
        """The CPU to charge for a report of ``job``: the reported figure, cut to what the kernel saw
        the worker use since the task was sent. ``BadReport`` if the report cannot be true: a
        measured task without usage, a figure not finite or negative, more CPU than the host's
        processors had in the task's time, more memory than the host has."""
        if usage is None:
            if job.measure:
                raise BadReport(f"worker {w.worker_id} sent no usage for measured task {job.id}")
            return 0.0
        check_usage(usage, lambda: f"worker {w.worker_id}'s report of task {job.id}")
        if max(usage.peak_memory_bytes, usage.baseline_memory_bytes) > _HOST_MEMORY:
            raise BadReport(
                f"worker {w.worker_id}'s report of task {job.id}: peak_memory_bytes {usage.peak_memory_bytes} "
                f"is more than the host's {_HOST_MEMORY} bytes"
            )
        span = time.monotonic() - job.sent_at  # a waiting task may have begun before its turn was seen here
        most = span * _CPUS + _CGROUP_SLACK_S + PROC_SLACK_S
        if usage.cpu_seconds > most:
            raise BadReport(
                f"worker {w.worker_id}'s report of task {job.id}: cpu_seconds {usage.cpu_seconds:g} is more "
                f"than {_CPUS} processors give in its {span:.3f} s"
            )
        start = job.kernel_start
        end = self._kernel_reading(w, job) if start is not None else None
        if end is not None and w.cpu_counter is not None and w.cpu_counter.probe == "cgroup":
            w.answered_cpu = end  # the same counter for whatever task is sent to it next
        if start is None or end is None:
            return usage.cpu_seconds
        seen = max(0.0, end.cpu - start.cpu)
        if usage.cpu_seconds <= seen + start.slack + end.slack:
            return usage.cpu_seconds
        self.capped_reports += 1
        log.warning(
            "worker %d reported %.6f CPU-s for task %d, the kernel saw %.6f: charging the kernel's count",
            w.worker_id,
            usage.cpu_seconds,
            job.id,
            seen,
        )
        return seen

    def _refuse_report(self, w: _Worker, exc: BadReport) -> None:
        """A worker that reports what cannot be true is not trusted again: kill it; its task, if it
        has one, is then settled as its death settles it, charged from the kernel's count
        (``runtime.pool.lost``)."""
        self.refused_reports += 1
        log.warning("refused a report: %s; killing worker %d", exc, w.worker_id)
        if w.slot.kill_reason is None:
            w.bad_report = str(exc)
            self._do(self._sched.kill(w.worker_id, "bad_report"))

    # ----------------------------------------------------------------------------- worker lives

    def _spawn(self) -> None:
        assert self._loop is not None and self._wire is not None
        wid = next(self._worker_ids)
        keys_fd, keys = hand_keys(wid)
        tally = TaskTally()
        cgroups, status = (None, self.cgroup_status)
        if self.info.mode != "none":
            cgroups, status = cg.WorkerCgroups.create(self.info, cg.child_name(os.getpid(), wid, 0))
        self.cgroup_status = status
        boot = p.WorkerBoot(
            worker_id=wid,
            endpoint=self._wire.endpoint,
            parent_pid=os.getpid(),
            heartbeat_s=self.cfg.heartbeat_s,
            memory_cgroup=(cgroups.memory_dir, cgroups.memory_version)
            if cgroups and cgroups.memory_dir and cgroups.memory_version
            else None,
            cgroup_dirs=dict(cgroups.controllers) if cgroups else {},
            sandbox_hide=[*self.hide, self._run_dir],
            keys_fd=keys_fd,
            tally_fd=tally.handed_fd,
            initializer=self.initializer,
        )
        env = dict(os.environ)
        # A worker is one CPU's share, single-threaded as llama.cpp and the embedder in it are: the first
        # call that imports numpy would otherwise start OpenBLAS's thread pool, whose threads spin on
        # after that call returns and are charged to the next task on the worker (measured: 18-64 ms on
        # a 0.2 s sleep). One thread, unless the operator set it.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env["AECO_WORKER_BOOT"] = msgspec.json.encode(boot).decode()
        process = WorkerProcess.spawn(self.worker_command, env, keys_fd, cgroups, tally)
        self._sched.add(wid, time.monotonic())
        w = _Worker(self._sched.workers[wid], keys.identity, keys.secret, process)
        self._workers[keys.identity] = self._by_id[wid] = w
        self.started += 1
        cpu_probe = "cgroup" if cgroups is not None and cgroups.cpu_file else "/proc"
        self.accounts.open_worker(process.pid, wid, cpu_probe)
        self._loop.add_reader(process.pidfd, self._on_exit, w)

    def _soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the pool's loop soon; from another thread this wakes the loop, so it is kept
        for what is rare there (a result arriving while a submitter sends, the first deadline)."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(fn)
        else:
            with contextlib.suppress(RuntimeError):  # the loop has ended: the pool is closed
                self._loop.call_soon_threadsafe(fn)

    def _arm_deadline(self, when: float) -> None:
        # One timer for the earliest deadline, not one per task: dispatching stays a comparison. A timer
        # armed for an earlier deadline re-arms itself for the next (``check_deadlines``), so a steady
        # stream of tasks arms none: submitting from another thread does not wake the loop for it.
        assert self._loop is not None
        if threading.get_ident() != self._loop_thread:
            self._soon(functools.partial(self._rearm_deadline, when))
            return
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_timer = self._loop.call_at(when, self._check_deadlines)

    @_locked
    def _rearm_deadline(self, when: float) -> None:
        if when == self._sched.deadline_when:  # not superseded by an earlier one meanwhile
            self._arm_deadline(when)

    @_locked
    def _check_deadlines(self) -> None:
        self._deadline_timer = None
        self._do(self._sched.check_deadlines(time.monotonic()))

    @_locked
    def _on_exit(self, w: _Worker) -> None:
        """Worker ``w``'s pidfd is readable: reap it, settle its task, replace it (as the scheduler says)."""
        assert self._loop is not None
        # What it sent before it died is read first: a task it answered is charged from its answer, not
        # as lost; of those it did not answer, its tally says how many it began (``runtime.host.tally``).
        self._drain()
        held = w.held() if w.job is not None else 0.0  # while /proc still has the zombie's schedstat
        death = w.process.reap()
        if death is None:
            return  # not yet a zombie
        begun = w.process.tally.read() - w.answered
        self._loop.remove_reader(w.process.pidfd)
        w.process.close()
        if w.cpu_counter is not None:
            w.cpu_counter.close()
        del self._workers[w.ident], self._by_id[w.worker_id]
        tail = self.accounts.unreported(w.pid, death.cpu_seconds)
        job = w.job
        over_memory = death.oom_killed and job is not None and bool(job.memory_limit)
        lost = self._sched.died(w.worker_id, time.monotonic(), begun=begun, over_memory=over_memory)
        unbegun = lost.unbegun
        if unbegun is not None and unbegun.track is not None and self.inflight is not None:
            self.inflight.clear(unbegun.track)  # it never began: nothing of it to charge after a crash
        if lost.crash:
            why = lost.reason or f"exit status {death.returncode}"
            log.warning("worker %d (pid %d) died in state %s: %s", w.worker_id, w.pid, lost.state, why)
            # Before its task is failed: whoever sees that failure then sees the executor broken.
            if self.on_broken is not None:
                self.on_broken(f"worker {w.worker_id} (pid {w.pid}) died: {why}")
        self._do(lost.first)
        if lost.job is not None:
            self._settle_lost(w, lost, death, tail, held)
        self.accounts.close_worker(
            w.pid,
            death.cpu_seconds,
            exit_overhead=0.0 if lost.job is not None else tail,
            cgroup_total=death.cgroup_cpu,
        )
        if not self._workers and self._sched.closing and self._all_exited is not None:
            self._all_exited.set()
        self._do(self._sched.replace(lost, time.monotonic()))

    def _settle_lost(self, w: _Worker, lost: Lost[PoolJob], death: Death, cpu: float, held: float) -> None:
        """Charge the task ``w`` died under from the kernel's count, then retry it or fail it."""
        job = lost.job
        assert job is not None
        total = charge_lost(
            self.accounts,
            self.inflight,
            job,
            death,
            cpu=cpu,
            baseline_memory=w.counters.memory_bytes if w.counters else 0,
            memory_probe=w.memory_probe,
            wall=time.monotonic() - w.slot.job_started,
            held=held,
            share=self.share,
        )
        story = crash_story(w.worker_id, death, job.id)
        if self._sched.retry(lost):
            log.info("%s; retrying it once (idempotent)", story)
            job.prior = total  # before it is sent again (``replace`` dispatches it)
            return
        job.done(None, lost_failure(job, lost.reason, total, story, w.bad_report))

    @_locked
    def _restart(self) -> None:
        if not self._sched.closing and not self.failed:
            self._spawn()

    def _arm_monitor(self) -> None:
        assert self._loop is not None
        self._monitor = self._loop.call_later(self.cfg.heartbeat_s, self._check_liveness)

    @_locked
    def _check_liveness(self) -> None:
        self._do(self._sched.check_liveness(time.monotonic()))
        if not self._sched.closing:
            self._arm_monitor()

    # ------------------------------------------------------------------------------------ status

    @_locked
    def kernel_cpu(self) -> dict[int, float]:
        """CPU of each live worker from the kernel: its cgroup counter, else /proc/<pid>/stat."""
        out: dict[int, float] = {}
        for w in self._workers.values():
            c = w.process.cgroups
            v = c.cpu_seconds() if c else None
            if v is None:
                v = proc_cpu_seconds(w.pid)
            if v is not None:
                out[w.pid] = v
        return out

    @_locked
    def status(self) -> PoolStatus:
        """A snapshot of the pool for live views and summaries."""
        ws = list(self._workers.values())
        probes = sorted({w.memory_probe for w in ws if w.state != "starting"}) or ["(starting)"]
        return PoolStatus(
            size=self.size,
            live=len(ws),
            idle=sum(w.state == "idle" for w in ws),
            busy=sum(w.state == "busy" for w in ws),
            queued=len(self._sched.queue),
            started=self.started,
            crashed=self.crashed,
            failed=self.failed,
            memory_probe=",".join(probes),
            cgroups=self.cgroup_status or f"no cgroups ({self.info.mode})",
            cpu_capacity=cg.cpu_capacity(self.info),
            memory_limit=cg.memory_limit_bytes(self.info),
            workers=[
                {
                    "id": w.worker_id,
                    "pid": w.pid,
                    "state": w.state,
                    "tasks": w.counters.tasks_done if w.counters else 0,
                    "waiting": len(w.slot.waiting),
                    # By its own tally (``runtime.host.tally``): more begun than answered while it
                    # is idle would mean a count forged or an answer lost.
                    "begun": w.process.tally.read(),
                    "answered": w.answered,
                }
                for w in ws
            ],
        )

    @property
    def endpoint(self) -> str:
        """The address workers connect to (``ipc://…`` or ``tcp://…``)."""
        return self._wire.endpoint if self._wire is not None else ""

    @_locked
    def pids(self) -> list[int]:
        """Pids of the live worker processes."""
        return [w.pid for w in self._workers.values()]
