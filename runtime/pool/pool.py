"""The worker pool: a ZeroMQ ROUTER in the supervisor, one DEALER per worker process.

Invariants (asserted where they can break):

- A worker runs at most one task at a time: a task runs on a worker in ``idle`` state, which then
  becomes ``busy`` until its ``Result`` arrives or it dies. Up to ``prefetch`` plain tasks may wait in a
  busy worker's socket (``_prefetch``); the worker takes them one after another, and each begins, as
  this loop sees it, when the one ahead of it answered (``_start``). Submitting and cancelling may come
  from any thread: every entry point holds the pool's lock (``_locked``).
- Every task that reaches a worker is charged exactly once per attempt: from its ``Result`` when the
  worker answers, from the kernel (``wait4``) when it dies first. Nothing else charges tasks.
- Every worker process is reaped (through its pidfd) and its child cgroups are removed.
- Only the workers this pool spawned are heard: each gets a random identity and a secret through an
  inherited pipe (``hand_keys``), and nothing from a peer is read before its ``Hello`` proves the
  secret (``_refuse``). What a worker reports is checked before it is charged (``_check_report``):
  a usage that cannot be true is refused and its task charged from the kernel's count instead, and
  CPU above the kernel's count of the worker since the task was sent is cut to that count.

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
import concurrent.futures as cf
import contextlib
import functools
import hmac
import itertools
import logging
import os
import pickle
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from concurrent.futures.process import (
    BrokenProcessPool,
    _chain_from_iterable_of_lists,
    _get_chunks,
    _process_chunk,
    _RemoteTraceback,
)
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, TypeVar, Unpack

import msgspec
import zmq

from runtime import protocol as p
from runtime.config import PoolConfig
from runtime.errors import AecoError, ErrorCode
from runtime.host import cgroups as cg
from runtime.pool.accounting import (
    PROC_SLACK_S,
    Accounts,
    BadReport,
    RunDelay,
    TaskUsage,
    check_amounts,
    check_think,
    check_think_batch,
    check_usage,
    occupancy,
    proc_cpu_seconds,
    proc_tree_cpu_seconds,
)
from runtime.pool.fairqueue import FairQueue
from runtime.pool.inflight import InFlight, InflightLog, KernelCpu

log = logging.getLogger("runtime.pool")
_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)  # plain ints: no enum lookups per frame
_JOIN_AND_EXEC = """IFS='
'
for f in $AECO_CGROUP_PROCS; do echo $$ 2>/dev/null > "$f"; done
unset AECO_CGROUP_PROCS
exec "$@"
"""
#: Tasks a worker stops by itself when asked (SIGUSR1), keeping its process: a generation between two
#: tokens, an invocation by killing its confined child. Any other task is stopped by killing its worker.
_STOPS_WHEN_ASKED = (p.Think, p.ThinkBatch, p.Invoke)

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` holding the pool's lock: the pool's state is touched by its event loop and, for
    submitting and cancelling, by any thread (``WorkerPoolExecutor`` submits from its callers' threads)."""

    @functools.wraps(method)
    def locked(self: WorkerPool, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class TaskFailed(AecoError):
    """A task did not produce a result. ``code`` says why (``task_error``, ``memory_exceeded``,
    ``worker_crashed``, ``deadline_exceeded``, ``pool_failed``, ``pool_closed``, ``cancelled``);
    ``usage`` is what it was charged."""

    def __init__(self, code: ErrorCode, message: str, usage: TaskUsage | None = None, payload: bytes = b"") -> None:
        super().__init__(message, code=code)
        self.usage = usage
        #: For ``task_error`` on a ``call`` task: the pickled exception raised by the callable.
        self.payload = payload


class WorkerCrashed(TaskFailed, BrokenProcessPool):
    """A worker died while running the task (``worker_crashed``): also a ``BrokenProcessPool``, so code
    written for ``ProcessPoolExecutor`` catches it. ``code`` and ``usage`` as for ``TaskFailed``."""


class InvalidTimeout(AecoError, ValueError):
    """A task deadline that is not a positive finite number of seconds."""

    default_code: ErrorCode = "invalid"


def check_timeout(timeout_s: object) -> float | None:
    """``timeout_s`` as a deadline in seconds (None: the pool's default); ``InvalidTimeout`` unless it
    is a positive finite number (0 is not "no deadline", a bool is not a number of seconds)."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 < timeout_s < float("inf"):
        raise InvalidTimeout(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


class Outcome(msgspec.Struct, frozen=True):
    """A finished task: its output and what it cost."""

    task_id: int
    agent: str
    output: bytes
    usage: TaskUsage


Done = Callable[[Outcome | None, TaskFailed | None], None]
#: Serves a confined task's calls to the world, as its invoker.
Serve = Callable[[p.WorldCall], Awaitable[p.WorldAnswer]]
#: Runs the coroutine that answers a task's call as work done for the task's agent (the economy's meter).
ForAgent = Callable[[str, Coroutine[Any, Any, None]], Coroutine[Any, Any, None]]


class TaskOptions(TypedDict, total=False):
    """How ``WorkerPool.run`` and ``WorkerPool.begin`` run a task (the keywords of ``submit``)."""

    agent: str
    timeout_s: float | None
    idempotent: bool
    measure: bool
    memory_limit: int
    serve: Serve | None
    track: str | None


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
class _Job:
    id: int
    agent: str
    spec: p.TaskSpec
    timeout_s: float
    idempotent: bool
    measure: bool
    memory_limit: int
    done: Done
    #: Called once when the job is about to be sent; False means it was cancelled meanwhile.
    claim: Callable[[], bool] | None = None
    #: Answers the task's ``Request`` messages (confined code reaching the world), if it may send any.
    serve: Serve | None = None
    attempts: int = 0
    prior: TaskUsage | None = None
    #: The ledger's id of the task: recorded in ``WorkerPool.inflight`` while it runs.
    track: str | None = None
    #: The worker's kernel CPU counter when the task was sent (None: unmeasured, or unreadable).
    kernel_start: KernelReading | None = None
    #: Asked to stop (``WorkerPool.cancel``): it ends as ``cancelled``, whatever stops it.
    cancelled: bool = False
    #: Asked to stop while it waited at a worker (prefetched): stopped as soon as it starts.
    cancel_at_start: bool = False
    #: When it was last sent to a worker (the span a report of its CPU is bounded by).
    sent_at: float = 0.0


class KernelReading(msgspec.Struct, frozen=True, array_like=True):
    """A worker's CPU as the kernel counted it, and how far that count may lag the exact figure."""

    cpu: float
    slack: float


WorkerState = Literal["starting", "idle", "busy", "stopping", "dead"]


@dataclass(slots=True, eq=False)
class _Worker:
    worker_id: int
    ident: bytes
    #: What it must say in its ``Hello`` (handed to it through an inherited pipe, see ``WorkerKeys``).
    secret: bytes
    proc: subprocess.Popen[bytes]
    pidfd: int
    cgroups: cg.WorkerCgroups | None
    started_at: float
    state: WorkerState = "starting"
    #: The task it runs (the first one sent and not yet answered).
    job: _Job | None = None
    #: Tasks sent after it that wait in the worker's socket (``PoolConfig.prefetch``), in order.
    waiting: collections.deque[_Job] = field(default_factory=collections.deque)
    #: When ``job`` began as this loop sees it: when it was sent, or when the task ahead of it answered.
    job_started: float = 0.0
    #: When the task in flight must be over (event-loop clock); 0 when idle.
    deadline_at: float = 0.0
    kill_reason: str | None = None
    last_seen: float = 0.0
    counters: p.Counters | None = None
    baseline_memory: int = 0
    memory_probe: str = "off"
    #: The kernel's CPU counter of the worker, opened at its hello.
    cpu_counter: KernelCpu | None = None
    #: Why its last report was refused (with ``kill_reason`` ``bad_report``).
    bad_report: str = ""
    #: How long it waited for a CPU (opened at spawn), and how long by the start of the task in hand.
    run_delay: RunDelay | None = None
    delay_at_start: float = 0.0

    def held(self) -> float:
        """Seconds the task in hand has held this worker, less those it waited for a CPU."""
        waited = self.run_delay.read() - self.delay_at_start if self.run_delay is not None else 0.0
        return max(0.0, time.monotonic() - self.job_started - waited)

    @property
    def pid(self) -> int:
        return self.proc.pid


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
_HOST_MEMORY = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Spawner:
    """Starts worker processes from one thread that lives as long as the supervisor's process. A
    worker's parent-death signal (``PR_SET_PDEATHSIG``) fires when the *thread* that forked it ends:
    forked from a pool's event-loop thread, workers would die with that thread (an executor's), not
    with the process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[cf.Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]]
        self._requests = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(argv, **kwargs)``, forked from the spawner's thread."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="aeco-spawner", daemon=True)
                self._thread.start()
        done: cf.Future[subprocess.Popen[bytes]] = cf.Future()
        self._requests.put((done, argv, kwargs))
        return done.result()

    def _serve(self) -> None:
        while True:
            done, argv, kwargs = self._requests.get()
            try:
                done.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:  # the caller raises it
                done.set_exception(exc)


_spawner = _Spawner()


def hand_keys(worker_id: int) -> tuple[int, p.WorkerKeys]:
    """A new worker's identity and secret, and the read end of a pipe that holds them for it to
    inherit (see ``WorkerKeys``). The identity's random part is what makes it unguessable; its
    number only makes logs readable."""
    keys = p.WorkerKeys(identity=f"w{worker_id}-{secrets.token_hex(16)}".encode(), secret=secrets.token_bytes(32))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, msgspec.msgpack.encode(keys))  # far below a pipe's buffer: never blocks
    finally:
        os.close(write_end)
    return read_end, keys


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
        self.failed: str | None = None
        self.malformed_frames = 0
        #: Frames from peers that are not a worker this pool spawned and that proved it (``_refuse``).
        self.refused_frames = 0
        #: Reports refused (``bad_report``) and reports whose CPU was cut to the kernel's count.
        self.refused_reports = 0
        self.capped_reports = 0
        self._refused_peers: set[bytes] = set()
        #: Set by the economy: answering a task's calls to the world is then charged to its agent.
        self.for_agent: ForAgent | None = None
        self.started = 0
        self.crashed = 0
        self.cgroup_status = "cgroups off by configuration" if self.cfg.cgroups == "off" else ""
        self._own_run_dir = run_dir is None
        self._run_dir = run_dir or tempfile.mkdtemp(prefix="aeco-pool-")
        self._ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        self._queue: FairQueue[_Job] = FairQueue()
        self._workers: dict[bytes, _Worker] = {}
        self._idle: collections.deque[_Worker] = collections.deque()
        self._crash_times: collections.deque[float] = collections.deque()
        self._crashes_in_a_row = 0
        self._closing = False
        self._all_exited: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._endpoint = ""
        self._monitor: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._sampler: asyncio.TimerHandle | None = None
        self._deadline_when = float("inf")
        self._log_budget = 20  # malformed-frame log lines before going quiet
        #: Held by every entry point (``_locked``): the loop's callbacks and other threads' submits.
        self._mutex = threading.RLock()
        self._loop_thread: int | None = None
        # Refused peers remembered so that each is logged once; past this many (a flood of made-up
        # identities) further ones are refused without a line: a bounded set, a bounded log.
        self._refused_peers_max = 100

    # ----------------------------------------------------------------------------------- lifecycle

    async def start(self) -> WorkerPool:
        """Bind the socket and start the workers; returns once all of them said hello. A pool starts
        once: ``AecoError`` (``pool_closed``) after ``close``, (``busy``) if it is already started."""
        if self._closing:
            raise AecoError("this pool was closed; a closed pool cannot be started again", code="pool_closed")
        if self._loop is not None:
            raise AecoError("this pool is already started", code="busy")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._all_exited = asyncio.Event()
        self._ready = asyncio.Event()
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self.cfg.transport == "ipc":
            os.chmod(self._run_dir, 0o700)
            self._endpoint = f"ipc://{self._run_dir}/pool.sock"
            self._sock.bind(self._endpoint)
        else:
            self._sock.bind(f"tcp://{self.cfg.tcp_host}:*")
            self._endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loop.add_reader(self._fd(), self._drain)
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
            if self._closing or self._loop is None:
                return
            self._begin_close()
        assert self._all_exited is not None
        if self._workers:
            try:
                await asyncio.wait_for(self._all_exited.wait(), grace_s)
            except TimeoutError:
                with self._mutex:
                    for w in list(self._workers.values()):
                        w.kill_reason = w.kill_reason or "pool_closed"
                        self._kill(w)
                await asyncio.wait_for(self._all_exited.wait(), 5.0)
        with self._mutex:
            for timer in (self._monitor, self._deadline_timer, self._sampler):
                if timer is not None:
                    timer.cancel()
            if self._sock is not None:
                self._loop.remove_reader(self._fd())
                self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        if self._own_run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def _begin_close(self) -> None:
        self._closing = True
        for job in self._queue.drain():
            self._fail(job, "pool_closed", "the pool was closed before the task ran")
        for w in list(self._workers.values()):
            if w.state == "starting":  # not connected yet: nothing to finish
                w.kill_reason = "pool_closed"
                self._kill(w)
            elif w.state in ("idle", "busy"):
                self._send(w, p.Shutdown())
                if w.state == "busy":
                    w.kill_reason = "pool_closed"  # if it has to be killed after the grace period
                else:
                    w.state = "stopping"

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
    ) -> int:
        """Queue a task; ``done(outcome, error)`` is called on the pool's loop when it ends.

        ``track``: the ledger's id of the task, to record it in ``inflight`` from dispatch until the
        caller clears it (once its charge is durable). Must be called from the pool's event loop
        thread. Returns the task id. ``InvalidTimeout`` (a ``ValueError``) for a ``timeout_s`` that is
        not a positive finite number.
        """
        timeout = check_timeout(timeout_s)
        job = _Job(
            next(self._ids),
            agent,
            spec,
            timeout or self.cfg.task_timeout_s,
            idempotent,
            measure,
            memory_limit,
            done,
            claim,
            serve,
            track=track,
        )
        if self.failed or self._closing:
            code: ErrorCode = "pool_failed" if self.failed else "pool_closed"
            self._fail(job, code, self.failed or "the pool is closed")
            return job.id
        self._queue.push(agent, job)
        self._dispatch()
        return job.id

    def begin(self, spec: p.TaskSpec, **options: Unpack[TaskOptions]) -> RunningTask:
        """Queue one task and return its handle: ``ended`` resolves with its ``Outcome`` or fails with
        ``TaskFailed``; ``stop()`` cancels it. Options as for ``run``. ``AecoError`` (``closed``) before
        ``start``."""
        if self._loop is None:
            raise AecoError("the pool is not started: await pool.start() (or use async with) first", code="closed")
        ended: asyncio.Future[Outcome] = self._loop.create_future()

        def done(out: Outcome | None, err: TaskFailed | None) -> None:
            if out is not None:
                ended.set_result(out)
            else:
                ended.set_exception(err or TaskFailed("task_error", "no outcome"))

        return RunningTask(self, self.submit(spec, done, **options), ended)

    async def run(self, spec: p.TaskSpec, **options: Unpack[TaskOptions]) -> Outcome:
        """Run one task and return its ``Outcome``; raise ``TaskFailed`` if it did not succeed.

        Options (``TaskOptions``): ``agent`` it is charged to; ``timeout_s``, its deadline once it runs
        (a positive finite number; None: ``task_timeout_s``); ``idempotent`` (retried once after a
        worker crash); ``measure`` (False: no probes, benchmarks only); ``memory_limit``, bytes the
        task may add to its worker's memory (0: unlimited; over it the task fails with
        ``memory_exceeded`` and is charged what it used); ``serve``; ``track`` (see ``submit``).
        Cancelling the caller stops the task (see ``RunningTask.stop``) before the cancellation goes on.
        """
        task = self.begin(spec, **options)
        try:
            return await asyncio.shield(task.ended)
        except asyncio.CancelledError:
            await task.stop()
            raise

    @_locked
    def cancel(self, task_id: int) -> bool:
        """Stop task ``task_id``, which then ends ``cancelled``: a queued one at once (charged what
        earlier attempts used, if any), a running one once its worker stopped it (see the module's
        docstring). False if no such task is queued or running."""
        for w in self._workers.values():
            if w.state == "busy" and w.job is not None and w.job.id == task_id:
                self._stop(w, w.job)
                return True
            for job in w.waiting:
                if job.id == task_id:  # already in the worker's socket: stopped when it starts
                    job.cancel_at_start = True
                    return True
        for job in self._queue:
            if job.id == task_id:
                self._queue.remove(job.agent, job)
                job.cancelled = True
                job.done(None, TaskFailed("cancelled", f"task {task_id} was cancelled before it ran", job.prior))
                return True
        return False

    def _stop(self, w: _Worker, job: _Job) -> None:
        if job.cancelled:
            return
        job.cancelled = True
        if w.kill_reason is not None:
            return  # being killed already: it ends that way
        if not isinstance(job.spec, _STOPS_WHEN_ASKED):
            w.kill_reason = "cancelled"
            self._kill(w)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGUSR1)
        # Not stopped within the grace period: its deadline check kills it (as cancelled, see there).
        grace = time.monotonic() + self.cfg.cancel_grace_s
        if grace < w.deadline_at:
            w.deadline_at = grace
            if grace < self._deadline_when:
                self._arm_deadline(grace)

    # ------------------------------------------------------------------------------- scheduling

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            w = self._idle.popleft()
            if w.state != "idle":
                continue
            job = self._take()
            if job is not None:
                self._send_task(w, job)
        if self.cfg.prefetch and self._queue:
            self._prefetch()

    def _take(self) -> _Job | None:
        """The next task in fair order, claimed (None if its claim said it was cancelled meanwhile)."""
        _, job = self._queue.pop()
        if job.claim is not None:
            if not job.claim():
                return None
            job.claim = None  # claimed once: a retry or a requeue does not claim it again
        return job

    def _prefetch(self) -> None:
        """Send queued tasks to busy workers, up to ``prefetch`` waiting behind each one's running task,
        so that a worker starts its next task without waiting for the supervisor.

        Only plain tasks wait, behind plain tasks: a ``think`` or an ``invoke`` is stopped by a signal
        meant for the task running (a waiting one would take it), and an ``invoke`` reads its replies
        from the socket the waiting task would be in. Nor do tracked tasks (``inflight`` records a task
        from the moment it is sent), nor tasks for a worker about to be recycled. Fair order is kept:
        when the next task may not wait, nothing does until a worker is free for it.
        """
        for w in self._workers.values():
            while self._queue and self._may_prefetch(w):
                head = self._queue.peek()
                if head.track is not None or isinstance(head.spec, _STOPS_WHEN_ASKED):
                    return
                job = self._take()
                if job is not None:
                    self._send_task(w, job)
            if not self._queue:
                return

    def _may_prefetch(self, w: _Worker) -> bool:
        job, c = w.job, w.counters
        if w.state != "busy" or job is None or w.kill_reason is not None or len(w.waiting) >= self.cfg.prefetch:
            return False
        if job.track is not None or isinstance(job.spec, _STOPS_WHEN_ASKED) or job.cancelled:
            return False
        if c is None:
            return True
        most = self.cfg.max_tasks_per_worker
        if most and c.tasks_done + 1 + len(w.waiting) >= most:
            return False
        return c.memory_bytes - w.baseline_memory <= self.cfg.max_memory_growth_mb << 20

    def _send_task(self, w: _Worker, job: _Job) -> None:
        """Send ``job`` to ``w``: it runs at once if ``w`` is idle, else it waits behind its tasks."""
        runs_now = w.job is None
        job.attempts += 1
        job.sent_at = time.monotonic()  # = the loop's clock
        if job.measure:
            job.kernel_start = self._kernel_reading(w, job)
        if runs_now:
            self._start(w, job, job.sent_at)
            if job.track is not None and self.inflight is not None:
                self._record(w, job, job.track, self.inflight)  # before sending: a kill may come any time
        else:
            w.waiting.append(job)
        if not self._send(w, p.Task(id=job.id, spec=job.spec, measure=job.measure, memory_limit=job.memory_limit)):
            # The worker is gone before it saw the task: put the task back untouched (its death, already
            # seen or to come, does the same for any task sent to it before).
            if job.track is not None and self.inflight is not None and runs_now:
                self.inflight.clear(job.track)
            if runs_now:
                w.job = None
            elif job in w.waiting:
                w.waiting.remove(job)
            job.attempts -= 1
            self._queue.push_front(job.agent, job)

    def _start(self, w: _Worker, job: _Job, now: float) -> None:
        """``job`` is ``w``'s running task from ``now``: its held time and its deadline count from here."""
        assert w.job is None, "a worker runs one task at a time"
        w.state, w.job, w.job_started = "busy", job, now
        w.delay_at_start = w.run_delay.read() if w.run_delay is not None else 0.0
        w.deadline_at = now + job.timeout_s
        if w.deadline_at < self._deadline_when:
            self._arm_deadline(w.deadline_at)
        if job.cancel_at_start:
            self._stop(w, job)

    def _record(self, w: _Worker, job: _Job, track: str, inflight: InflightLog) -> None:
        assert w.cpu_counter is not None, "opened at hello"
        baseline = w.cpu_counter.read()
        now = time.time()
        inflight.begin(
            InFlight(
                task_id=track,
                agent=job.agent,
                kind=p.kind_of(job.spec),
                worker_id=w.worker_id,
                worker_pid=w.pid,
                started_at=now,
                cpu_probe=w.cpu_counter.probe,
                baseline_cpu=baseline or 0.0,
                prior_cpu=job.prior.cpu_seconds if job.prior is not None else 0.0,
                baseline_memory=w.counters.memory_bytes if w.counters else 0,
                cgroups=w.cgroups,
                sampled_cpu=baseline or 0.0,
                sampled_at=now,
                share=self.share,
            )
        )

    @_locked
    def _sample_inflight(self) -> None:
        """Write down the kernel's CPU counter of every worker running a tracked task."""
        assert self._loop is not None and self.inflight is not None
        readings = [
            (w.job.track, cpu)
            for w in self._workers.values()
            if w.state == "busy" and w.job is not None and w.job.track is not None and w.cpu_counter is not None
            if (cpu := w.cpu_counter.read()) is not None
        ]
        self.inflight.sample(readings)  # also commits what finished or was charged since the last commit
        if not self._closing:
            self._sampler = self._loop.call_later(self.cfg.sample_s, self._sample_inflight)

    def _send(self, w: _Worker, msg: p.Message) -> bool:
        assert self._sock is not None
        try:
            self._sock.send_multipart([w.ident, p.encode(msg)], _NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("worker %d unreachable (%s); killing it", w.worker_id, exc)
            w.kill_reason = w.kill_reason or "unreachable"
            self._kill(w)
            return False
        finally:
            # Sending can consume the edge that signals pending input; look again.
            if self._loop is not None and int(self._sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                self._soon(self._drain)
        return True

    # --------------------------------------------------------------------------------- receiving

    def _fd(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockopt(zmq.FD))

    @_locked
    def _drain(self) -> None:
        sock = self._sock
        if sock is None or sock.closed:
            return
        # Checking EVENTS is cheaper than ending every drain on a zmq.Again exception.
        while int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            frames = sock.recv_multipart(_NOBLOCK)
            try:
                self._handle(frames)
            except Exception:  # a bug in one message's handling must not stop the pool
                log.exception("error while handling a frame")

    def _refuse(self, ident: bytes, why: str) -> None:
        """Ignore a frame from a peer that has not proved it is one of our workers: it gets no task,
        and nothing it says is charged or counted. Logged once per peer."""
        self.refused_frames += 1
        if ident in self._refused_peers or len(self._refused_peers) >= self._refused_peers_max:
            return
        self._refused_peers.add(ident)
        last = len(self._refused_peers) == self._refused_peers_max
        log.warning("refused peer %r: %s%s", ident[:40], why, " (further peers not logged)" if last else "")

    def _drop(self, why: str) -> None:
        self.malformed_frames += 1
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning("dropped frame: %s%s", why, "" if self._log_budget else " (further drops not logged)")

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return self._drop(f"{len(frames)} parts, expected identity + message")
        w = self._workers.get(frames[0])
        if w is None:
            return self._refuse(frames[0], "not a worker this pool spawned")
        try:
            msg = p.decode(frames[1])
        except p.ProtocolError as exc:
            return self._drop(f"from worker {w.worker_id}: {exc}")
        if w.state == "starting" and not isinstance(msg, p.Hello):
            return self._refuse(frames[0], f"{type(msg).__name__} before its hello")
        w.last_seen = time.monotonic()
        if isinstance(msg, p.Result):
            self._on_result(w, msg)
        elif isinstance(msg, p.Heartbeat):
            try:
                self._note_counters(w, msg.counters)
            except BadReport as exc:
                return self._refuse_report(w, exc)
            if w.state == "idle":
                self._maybe_recycle(w)
        elif isinstance(msg, p.Request):
            self._on_request(w, msg)
        elif isinstance(msg, p.Hello):
            self._on_hello(w, msg)
        else:
            self._drop(f"unexpected {type(msg).__name__} from worker {w.worker_id}")

    def _on_request(self, w: _Worker, msg: p.Request) -> None:
        job = w.job
        if w.state != "busy" or job is None or msg.task_id != job.id:
            return self._drop(f"request for task {msg.task_id} not running on worker {w.worker_id}")
        if job.serve is None:
            self._send(
                w, p.Reply(task_id=job.id, seq=msg.seq, answer=p.RefusedAnswer(error="this task has no channel"))
            )
            return None
        assert self._loop is not None
        answering = self._answer(w, job, job.serve, msg)
        self._loop.create_task(answering if self.for_agent is None else self.for_agent(job.agent, answering))
        return None

    async def _answer(self, w: _Worker, job: _Job, serve: Serve, msg: p.Request) -> None:
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
        status displays read them, and a dying worker's task is charged what the kernel counted
        beyond them."""
        check_amounts(c, p.Counters.__struct_fields__, f"worker {w.worker_id}'s counters")
        w.counters = c
        acct = self.accounts.workers.get(w.pid)
        if acct is not None:
            acct.counters = c

    def _on_hello(self, w: _Worker, msg: p.Hello) -> None:
        if not hmac.compare_digest(msg.secret, w.secret):
            # The worker we spawned does not have this slot: whoever holds its identity is not it.
            self._refuse(w.ident, f"hello of worker {w.worker_id} without its secret")
            if w.state == "starting" and w.kill_reason is None:
                w.kill_reason = "refused_hello"
                self._kill(w)
            return None
        if w.state != "starting" or msg.pid != w.pid or msg.worker_id != w.worker_id:
            return self._drop(f"hello from worker {w.worker_id} in state {w.state}")
        if msg.init_error:
            if not self.failed:
                self.initializer_error = msg.init_error
                self._fail_pool(f"the initializer failed in worker {w.worker_id}")
            return None
        if w.cgroups is not None and not all(
            w.pid in cg.processes_in(os.path.dirname(f)) for f in w.cgroups.procs_files()
        ):
            log.warning("worker %d is not in its cgroups; measuring it through /proc", w.worker_id)
            w.cgroups.remove()
            w.cgroups = None
            self.accounts.workers[w.pid].cpu_probe = "/proc"
        try:
            self._note_counters(w, msg.counters)
        except BadReport as exc:
            return self._refuse_report(w, exc)
        w.cpu_counter = KernelCpu(w.pid, w.cgroups)
        w.baseline_memory = msg.counters.memory_bytes
        w.memory_probe = msg.memory_probe
        w.state = "idle"
        self._idle.append(w)
        if self._ready is not None and sum(x.state in ("idle", "busy") for x in self._workers.values()) >= self.size:
            self._ready.set()
        self._dispatch()

    def _on_result(self, w: _Worker, msg: p.Result) -> None:
        job = w.job
        if w.state != "busy" or job is None or msg.task_id != job.id:
            return self._drop(f"result for task {msg.task_id} not running on worker {w.worker_id}")
        try:
            cpu = self._check_report(w, job, msg.usage)
            if msg.ok and isinstance(job.spec, p.Think):  # its tokens are charged from its output
                check_think(job.spec, msg.output, f"worker {w.worker_id}'s report of task {job.id}")
            if msg.ok and isinstance(job.spec, p.ThinkBatch):  # its CPU is split by its output
                check_think_batch(job.spec, msg.output, f"worker {w.worker_id}'s report of task {job.id}")
            # Last: the counters of a refused report must not lower what its task is charged.
            self._note_counters(w, msg.counters)
        except BadReport as exc:
            return self._refuse_report(w, exc)
        w.deadline_at = 0.0
        self._crashes_in_a_row = 0
        w.job = None
        held = w.held()
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
            wall = time.monotonic() - w.job_started
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
        if w.waiting:  # the worker has begun the next one already
            self._start(w, w.waiting.popleft(), time.monotonic())
        elif self._closing:
            w.state = "stopping"
            return
        else:
            w.state = "idle"
            if not self._maybe_recycle(w):
                self._idle.append(w)
        self._dispatch()

    def _kernel_reading(self, w: _Worker, job: _Job) -> KernelReading | None:
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

    def _check_report(self, w: _Worker, job: _Job, usage: p.Usage | None) -> float:
        """The CPU to charge for a report of ``job``: the reported figure, cut to what the kernel saw
        the worker use since the task was sent. ``BadReport`` if the report cannot be true: a
        measured task without usage, a figure not finite or negative, more CPU than the host's
        processors had in the task's time, more memory than the host has."""
        if usage is None:
            if job.measure:
                raise BadReport(f"worker {w.worker_id} sent no usage for measured task {job.id}")
            return 0.0
        check_usage(usage, f"worker {w.worker_id}'s report of task {job.id}")
        if max(usage.peak_memory_bytes, usage.baseline_memory_bytes) > _HOST_MEMORY:
            raise BadReport(
                f"worker {w.worker_id}'s report of task {job.id}: peak_memory_bytes {usage.peak_memory_bytes} "
                f"is more than the host's {_HOST_MEMORY} bytes"
            )
        span = time.monotonic() - job.sent_at  # a waiting task may have begun before its turn was seen here
        most = span * (os.cpu_count() or 1) + _CGROUP_SLACK_S + PROC_SLACK_S
        if usage.cpu_seconds > most:
            raise BadReport(
                f"worker {w.worker_id}'s report of task {job.id}: cpu_seconds {usage.cpu_seconds:g} is more "
                f"than {os.cpu_count()} processors give in its {span:.3f} s"
            )
        start = job.kernel_start
        end = self._kernel_reading(w, job) if start is not None else None
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
        (``_charge_lost``)."""
        self.refused_reports += 1
        log.warning("refused a report: %s; killing worker %d", exc, w.worker_id)
        if w.kill_reason is None:
            w.kill_reason = "bad_report"
            w.bad_report = str(exc)
            self._kill(w)

    # ----------------------------------------------------------------------------- worker lives

    def _spawn(self) -> None:
        assert self._loop is not None
        wid = next(self._worker_ids)
        keys_fd, keys = hand_keys(wid)
        cgroups, status = (None, self.cgroup_status)
        if self.info.mode != "none":
            cgroups, status = cg.WorkerCgroups.create(self.info, cg.child_name(os.getpid(), wid, 0))
        self.cgroup_status = status
        boot = p.WorkerBoot(
            worker_id=wid,
            endpoint=self._endpoint,
            parent_pid=os.getpid(),
            heartbeat_s=self.cfg.heartbeat_s,
            memory_cgroup=(cgroups.memory_dir, cgroups.memory_version)
            if cgroups and cgroups.memory_dir and cgroups.memory_version
            else None,
            cgroup_dirs=dict(cgroups.controllers) if cgroups else {},
            sandbox_hide=[*self.hide, self._run_dir],
            keys_fd=keys_fd,
            initializer=self.initializer,
        )
        env = dict(os.environ)
        env["AECO_WORKER_BOOT"] = msgspec.json.encode(boot).decode()
        # Workers import what the supervisor imports (the executor pickles functions by reference).
        env["PYTHONPATH"] = os.pathsep.join(x for x in sys.path if x)
        argv = self.worker_command
        if cgroups is not None:
            # A shell joins the cgroups and then becomes the worker, so the cgroup counts the
            # worker's CPU from its first instruction. A failed join is noticed at hello.
            env["AECO_CGROUP_PROCS"] = "\n".join(cgroups.procs_files())
            argv = ["/bin/sh", "-c", _JOIN_AND_EXEC, "sh", *argv]
        try:
            proc = _spawner.popen(argv, env=env, close_fds=True, pass_fds=(keys_fd,), stdin=subprocess.DEVNULL)
        finally:
            os.close(keys_fd)
        pidfd = os.pidfd_open(proc.pid)
        now = time.monotonic()
        w = _Worker(
            wid, keys.identity, keys.secret, proc, pidfd, cgroups, now, last_seen=now, run_delay=RunDelay(proc.pid)
        )
        ident = keys.identity
        self._workers[ident] = w
        self.started += 1
        cpu_probe = "cgroup" if cgroups is not None and cgroups.cpu_file else "/proc"
        self.accounts.open_worker(proc.pid, wid, cpu_probe)
        self._loop.add_reader(pidfd, self._on_exit, w)

    def _kill(self, w: _Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)

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
        # armed for an earlier deadline re-arms itself for the next (``_check_deadlines``), so a steady
        # stream of tasks arms none: submitting from another thread does not wake the loop for it.
        assert self._loop is not None
        self._deadline_when = when
        if threading.get_ident() != self._loop_thread:
            self._soon(functools.partial(self._rearm_deadline, when))
            return
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_timer = self._loop.call_at(when, self._check_deadlines)

    @_locked
    def _rearm_deadline(self, when: float) -> None:
        if when == self._deadline_when:  # not superseded by an earlier one meanwhile
            self._arm_deadline(when)

    @_locked
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        self._deadline_timer, self._deadline_when = None, float("inf")
        upcoming = float("inf")
        for w in list(self._workers.values()):
            if w.state != "busy" or not w.deadline_at or w.kill_reason is not None:
                continue
            if w.deadline_at <= now:
                w.kill_reason = "cancelled" if w.job is not None and w.job.cancelled else "deadline_exceeded"
                self._kill(w)
            else:
                upcoming = min(upcoming, w.deadline_at)
        if upcoming < float("inf"):
            self._arm_deadline(upcoming)

    def _maybe_recycle(self, w: _Worker) -> bool:
        """Retire a worker that did its share of tasks or grew too much; start its replacement."""
        c = w.counters
        if c is None or self._closing or w.state != "idle":
            return False
        too_many = bool(self.cfg.max_tasks_per_worker) and c.tasks_done >= self.cfg.max_tasks_per_worker
        too_big = c.memory_bytes - w.baseline_memory > self.cfg.max_memory_growth_mb << 20
        if not (too_many or too_big):
            return False
        log.info("recycling worker %d (%s)", w.worker_id, "task count" if too_many else "memory growth")
        w.state = "stopping"
        w.kill_reason = "recycled"
        self._send(w, p.Shutdown())
        self._spawn()
        return True

    @_locked
    def _on_exit(self, w: _Worker) -> None:
        assert self._loop is not None
        held = w.held() if w.job is not None else 0.0  # while /proc still has the zombie's schedstat
        try:
            pid, status, ru = os.wait4(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, ru = w.pid, 0, None
        if pid == 0:
            return  # not yet a zombie
        self._loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        w.proc.returncode = os.waitstatus_to_exitcode(status) if ru is not None else -1
        w.deadline_at = 0.0
        kernel_total = ru.ru_utime + ru.ru_stime if ru is not None else 0.0
        peak = w.cgroups.memory_peak_bytes() if w.cgroups else None
        cgroup_cpu = w.cgroups.cpu_seconds() if w.cgroups else None
        oom_killed = bool(w.cgroups and w.cgroups.oom_kills())
        if w.cgroups is not None:
            w.cgroups.remove()
        if w.cpu_counter is not None:
            w.cpu_counter.close()
        if w.run_delay is not None:
            w.run_delay.close()
        job, was_state, waiting = w.job, w.state, list(w.waiting)
        w.state, w.job = "dead", None
        w.waiting.clear()
        del self._workers[w.ident]
        tail = self.accounts.unreported(w.pid, kernel_total)
        reason = w.kill_reason
        if reason is None and oom_killed and job is not None and job.memory_limit:
            reason = "memory_exceeded"  # the kernel killed it at the limit set for this task
        # The task's fault, not the worker's: replaced at once, not counted against restarts.
        task_fault = reason in ("deadline_exceeded", "memory_exceeded", "cancelled")
        expected = task_fault or reason in ("recycled", "pool_closed") or self._closing
        if not expected:
            self.crashed += 1
            why = reason or f"exit status {w.proc.returncode}"
            log.warning("worker %d (pid %d) died in state %s: %s", w.worker_id, w.pid, was_state, why)
            # Before its task is failed: whoever sees that failure then sees the executor broken.
            if self.on_broken is not None:
                self.on_broken(f"worker {w.worker_id} (pid {w.pid}) died: {why}")
        self._requeue(waiting)  # first: a retried running task goes back ahead of them
        if job is not None:
            self._charge_lost(w, job, tail, peak, ru.ru_maxrss * 1024 if ru else 0, reason, held)
        self.accounts.close_worker(
            w.pid, kernel_total, exit_overhead=0.0 if job is not None else tail, cgroup_total=cgroup_cpu
        )
        if not self._workers and self._closing and self._all_exited is not None:
            self._all_exited.set()
        if self._closing or self.failed:
            return
        if task_fault:
            self._spawn()
        elif not expected:
            self._schedule_restart()
        self._dispatch()  # what went back to the queue may go to another worker

    def _charge_lost(
        self,
        w: _Worker,
        job: _Job,
        cpu: float,
        cgroup_peak: int | None,
        maxrss: int,
        reason: str | None,
        held: float,
    ) -> None:
        """Charge a task whose worker died under it, from the kernel's account of the worker."""
        baseline = w.counters.memory_bytes if w.counters else 0
        probe = w.memory_probe if cgroup_peak is not None else "rusage"
        usage = TaskUsage(
            cpu,
            cgroup_peak if cgroup_peak is not None else maxrss,
            baseline,
            time.monotonic() - w.job_started,
            w.pid,
            probe,
            occupancy_seconds=occupancy(held, self.share, cpu),
        )
        self.accounts.charge(job.agent, usage, False, w.pid, cpu)
        total = job.prior.plus(usage) if job.prior is not None else usage
        if job.track is not None and self.inflight is not None:
            self.inflight.finish(job.track, total)
        if reason == "deadline_exceeded":
            msg = f"task {job.id} ran over its {job.timeout_s:g} s deadline; its worker was killed"
            return job.done(None, TaskFailed("deadline_exceeded", msg, total))
        if reason == "pool_closed":
            return job.done(None, TaskFailed("pool_closed", "the pool was closed mid-task", total))
        if reason == "cancelled":
            msg = f"task {job.id} was cancelled; its worker was killed to stop it"
            return job.done(None, TaskFailed("cancelled", msg, total))
        if reason == "memory_exceeded":
            msg = f"task {job.id} went over its {job.memory_limit} byte memory limit; the kernel killed its worker"
            return job.done(None, TaskFailed("memory_exceeded", msg, total))
        if reason == "bad_report":
            msg = f"{w.bad_report}; the report was refused and the task charged from the kernel's count"
            return job.done(None, TaskFailed("bad_report", msg, total))
        what = f"worker {w.worker_id} (pid {w.pid}) died while running task {job.id}"
        code = w.proc.returncode
        what += f" (killed by signal {-code})" if code is not None and code < 0 else f" (exit {code})"
        if job.idempotent and job.attempts < 2 and not self._closing and not self.failed:
            log.info("%s; retrying it once (idempotent)", what)
            job.prior = total
            self._queue.push_front(job.agent, job)
            return
        job.done(None, WorkerCrashed("worker_crashed", what, total))

    def _requeue(self, waiting: list[_Job]) -> None:
        """Tasks that waited at a worker that died never began there: each goes back to the head of its
        agent's line, uncharged and its attempt not counted (or fails as the pool does, if it stops)."""
        for job in reversed(waiting):
            job.attempts -= 1
            if self._closing or self.failed:
                code: ErrorCode = "pool_failed" if self.failed else "pool_closed"
                job.done(None, TaskFailed(code, self.failed or "the pool was closed before the task ran", job.prior))
            elif job.cancel_at_start:
                job.done(None, TaskFailed("cancelled", f"task {job.id} was cancelled before it ran", job.prior))
            else:
                self._queue.push_front(job.agent, job)

    def _schedule_restart(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        self._crash_times.append(now)
        while self._crash_times and now - self._crash_times[0] > self.cfg.restart_window_s:
            self._crash_times.popleft()
        if len(self._crash_times) > self.cfg.max_restarts:
            return self._fail_pool(
                f"{len(self._crash_times)} worker crashes within {self.cfg.restart_window_s:g} s "
                f"(limit {self.cfg.max_restarts})"
            )
        self._crashes_in_a_row += 1
        delay = min(self.cfg.restart_backoff_s * 2 ** (self._crashes_in_a_row - 1), self.cfg.restart_backoff_max_s)
        self._loop.call_later(delay, self._restart)

    @_locked
    def _restart(self) -> None:
        if not self._closing and not self.failed:
            self._spawn()

    def _fail_pool(self, reason: str) -> None:
        log.error("worker pool failed: %s", reason)
        self.failed = reason
        if self.on_broken is not None:
            self.on_broken(reason)
        for job in self._queue.drain():
            self._fail(job, "pool_failed", reason)
        for w in list(self._workers.values()):
            w.kill_reason = w.kill_reason or "pool_failed"
            self._kill(w)
        if self._ready is not None:
            self._ready.set()

    def _fail(self, job: _Job, code: ErrorCode, message: str) -> None:
        if job.claim is not None and not job.claim():
            return
        job.done(None, TaskFailed(code, message, job.prior))

    def _arm_monitor(self) -> None:
        assert self._loop is not None
        self._monitor = self._loop.call_later(self.cfg.heartbeat_s, self._check_liveness)

    @_locked
    def _check_liveness(self) -> None:
        now = time.monotonic()
        for w in list(self._workers.values()):
            if w.kill_reason is not None:
                continue
            if w.state == "starting" and now - w.started_at > self.cfg.startup_timeout_s:
                w.kill_reason = "startup_timeout"
            elif w.state == "idle" and now - w.last_seen > self.cfg.heartbeat_timeout_s:
                w.kill_reason = "heartbeat_timeout"
            else:
                continue
            log.warning("worker %d: %s; killing it", w.worker_id, w.kill_reason)
            self._kill(w)
        if not self._closing:
            self._arm_monitor()

    # ------------------------------------------------------------------------------------ status

    @_locked
    def kernel_cpu(self) -> dict[int, float]:
        """CPU of each live worker from the kernel: its cgroup counter, else /proc/<pid>/stat."""
        out: dict[int, float] = {}
        for w in self._workers.values():
            v = w.cgroups.cpu_seconds() if w.cgroups else None
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
            queued=len(self._queue),
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
                    "waiting": len(w.waiting),
                }
                for w in ws
            ],
        )

    @property
    def endpoint(self) -> str:
        """The address workers connect to (``ipc://…`` or ``tcp://…``)."""
        return self._endpoint

    @_locked
    def pids(self) -> list[int]:
        """Pids of the live worker processes."""
        return [w.pid for w in self._workers.values()]


# ------------------------------------------------------------------------------------ the executor

#: Executors alive in this process, shut down (their pending work finished) when the interpreter exits.
_live_executors: weakref.WeakSet[WorkerPoolExecutor] = weakref.WeakSet()
_exiting = False
_LOGGER = logging.getLogger("concurrent.futures")  # where ProcessPoolExecutor reports an initializer's failure


def _python_exit() -> None:
    """At interpreter exit, before threads are joined (as the stdlib's executors do): refuse new work,
    then finish what every live executor has pending, rather than dropping it with its daemon thread."""
    global _exiting
    _exiting = True
    for ex in list(_live_executors):
        ex.shutdown(wait=True)


getattr(threading, "_register_atexit")(_python_exit)  # noqa: B009 (private: typeshed does not list it)


class UsageFuture(cf.Future[Any]):
    """A ``concurrent.futures.Future`` that also carries what its task cost once it is done."""

    usage: TaskUsage | None = None
    #: Stops the task in its worker (set by the executor that made this future).
    _stop: Callable[[], object] | None = None

    def cancel(self) -> bool:
        """Cancel the call. Unlike ``Future.cancel``, a running call is stopped too: its worker stops
        it (see ``WorkerPool.cancel``), and the future then fails with ``TaskFailed`` (code
        ``cancelled``, ``usage`` what it used), since it did run. False once the call has ended."""
        if super().cancel():
            return True
        if not self.running() or self._stop is None:
            return False
        self._stop()
        return True


def _settle_future(fut: cf.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve ``fut`` unless something else (the executor breaking, a cancel) already did."""
    with contextlib.suppress(cf.InvalidStateError):
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _remote(exc: BaseException, tb: str) -> BaseException:
    """``exc`` with the worker's traceback as its cause, as ProcessPoolExecutor shows it."""
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb}"""')  # type: ignore[arg-type]  # typeshed is wrong: a str
    return exc


class _LoopThread:
    """The pool's event loop, in a thread that holds no reference to the executor: dropping the
    executor's last reference then lets its finalizer stop the pool."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.grace_s = 2.0
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._serve, name="aeco-pool", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        main = self.loop.create_task(self._main())
        while not main.done():
            try:
                self.loop.run_until_complete(main)
            except BaseException:  # e.g. SystemExit from a user's done-callback: the pool must live on
                log.exception("the executor's event loop was interrupted; carrying on")
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.pool.start()
        except BaseException as exc:
            # An initializer that raised broke the executor (``on_broken``), which is then returned
            # broken, as ProcessPoolExecutor's is; anything else is the constructor's error.
            if not self.pool.initializer_error:
                self.start_error = exc
            return
        finally:
            self.started.set()
        await self._stop.wait()
        await self.pool.close(self.grace_s)

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop; nothing if the loop already ended."""
        with contextlib.suppress(RuntimeError):  # closed: the pool is gone and so is what fn would touch
            self.loop.call_soon_threadsafe(fn)

    def stop(self, grace_s: float = 2.0) -> None:
        """Close the pool (running tasks get ``grace_s`` to finish) and end the thread."""
        self.grace_s = min(self.grace_s, grace_s)
        if self._stop is not None:
            self.call(self._stop.set)


class WorkerPoolExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` over a ``WorkerPool``, usable wherever ProcessPoolExecutor is
    (CPython's own ``test_concurrent_futures`` runs against it: tests/integration/test_stdlib_futures.py).

    ``submit(fn, *args, **kwargs)`` takes an importable callable (pickled by reference, as with
    ProcessPoolExecutor); the returned future has ``.usage`` (a ``TaskUsage``) once done. A call that
    raises in its worker re-raises here with its type, the worker's traceback as ``__cause__``. The
    pool's event loop runs in a background thread; the workers start with the executor.

    As ProcessPoolExecutor: ``initializer(*initargs)`` runs in each worker before any task (if it
    raises, the executor is broken); ``max_tasks_per_child`` recycles a worker after that many tasks;
    ``mp_context`` is accepted and ignored (workers are always fresh interpreters, like ``spawn``).
    A worker that dies unexpectedly breaks the executor: its task fails with ``WorkerCrashed`` (a
    ``BrokenProcessPool`` with ``code`` and ``usage``), every other pending future with
    ``BrokenProcessPool``, and ``submit`` raises ``BrokenProcessPool`` from then on; the workers are
    stopped. (The asyncio ``WorkerPool`` replaces dead workers instead.) Tasks stopped on purpose
    (``cancel``, a deadline, a memory limit) do not break it. Pending work is finished at interpreter
    exit, and dropping the last reference to the executor shuts it down.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: object = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        config: PoolConfig | None = None,
        agent: str = "executor",
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # One call waits at each worker, as ProcessPoolExecutor queues one beyond its workers.
        cfg = config or PoolConfig(prefetch=1)
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1:
                raise ValueError("max_tasks_per_child must be >= 1")
            cfg = msgspec.structs.replace(cfg, max_tasks_per_worker=max_tasks_per_child)
        boot = pickle.dumps((initializer, initargs), protocol=pickle.HIGHEST_PROTOCOL) if initializer else b""
        self._agent = agent
        self._lock = threading.Lock()
        self._shutdown = False
        #: False, or why the executor is broken (the name and meaning ProcessPoolExecutor gives it).
        self._broken: str | Literal[False] = False
        self._pending: set[UsageFuture] = set()
        self._idle = threading.Condition(self._lock)
        self._pool = WorkerPool(cfg, size=max_workers, initializer=boot)
        brk = weakref.WeakMethod(self._break)  # the pool (held by its thread) must not hold the executor

        def on_broken(reason: str) -> None:
            if (executor_break := brk()) is not None:
                executor_break(reason)

        self._pool.on_broken = on_broken
        self._max_workers = self._pool.size
        self._runner = _LoopThread(self._pool)
        self._runner.thread.start()
        self._runner.started.wait()
        if self._runner.start_error is not None:
            self._runner.thread.join()
            raise self._runner.start_error
        # Bound to the runner, not to self: the finalizer must not keep the executor alive.
        self._finalizer = weakref.finalize(self, self._runner.stop)
        _live_executors.add(self)

    @property
    def pool(self) -> WorkerPool:
        """The underlying pool (read its ``accounts`` and ``status()`` from any thread, racily)."""
        return self._pool

    @property
    def _processes(self) -> dict[int, subprocess.Popen[bytes]]:
        """ProcessPoolExecutor's name for its live worker processes by pid (read racily)."""
        return {w.pid: w.proc for w in list(self._pool._workers.values()) if w.state in ("starting", "idle", "busy")}

    @property
    def _executor_manager_thread(self) -> threading.Thread:
        """ProcessPoolExecutor's name for the thread that runs the pool (ends after ``shutdown``)."""
        return self._runner.thread

    def _break(self, reason: str) -> None:
        """The pool lost a worker or failed: fail every pending future, refuse new work, stop the workers."""
        with self._lock:
            if self._broken:
                return
            self._broken = reason
            pending = list(self._pending)
            self._pending.clear()
            self._idle.notify_all()
        if self._pool.initializer_error:
            _LOGGER.critical("Exception in initializer:\n%s", self._pool.initializer_error)
        broken = f"the worker pool is broken: {reason}"

        def fail_pending() -> None:
            for fut in pending:
                _settle_future(fut, exc=BrokenProcessPool(broken))

        # Called on the pool's loop as a worker's death is handled: its task is failed there with what it
        # cost (``WorkerCrashed``) once the executor is marked broken, and every other pending future
        # right after, by the loop. A future that fails is then never seen before ``submit`` refuses.
        self._runner.call(fail_pending)
        self._runner.stop(grace_s=0.0)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> UsageFuture:
        """Schedule ``fn(*args, **kwargs)`` on a worker; return a future with ``.usage``."""
        fut = UsageFuture()
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(f"the worker pool is broken: {self._broken}")
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self._pending.add(fut)
        try:
            payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            self._settle(fut)
            fut.set_exception(exc)
            return fut
        spec = p.Call(payload=payload)
        settle = self._settle  # the closures below must not keep the executor alive once they ran

        def done(out: Outcome | None, err: TaskFailed | None) -> None:
            try:
                if out is not None:
                    fut.usage = out.usage
                    _settle_future(fut, pickle.loads(out.output))
                elif err is not None:
                    fut.usage = err.usage
                    if err.payload:
                        _settle_future(fut, exc=_remote(pickle.loads(err.payload), err.message))
                    elif err.code == "pool_failed":
                        _settle_future(fut, exc=BrokenProcessPool(err.message))
                    else:
                        _settle_future(fut, exc=err)
            except BaseException as exc:  # a result that cannot be unpickled here, even by SystemExit
                broken = BrokenProcessPool(f"the call's result could not be unpickled: {type(exc).__name__}: {exc}")
                broken.__cause__ = exc
                _settle_future(fut, exc=broken)
            finally:
                settle(fut)

        def claim() -> bool:
            # A future failed already (the executor broke) is not started; the check and the set race
            # only with a break, whose RuntimeError is then expected.
            if fut.cancelled() or not fut.done():
                with contextlib.suppress(RuntimeError):
                    if fut.set_running_or_notify_cancel():
                        return True
            settle(fut)
            return False

        # Queued and sent to a free worker from this thread, under the pool's lock: the pool's loop is
        # not woken for it (it wakes for the result, which resolves the future where it is read).
        fut._stop = functools.partial(self._pool.cancel, self._pool.submit(spec, done, agent=self._agent, claim=claim))
        return fut

    def _settle(self, fut: UsageFuture) -> None:
        with self._lock:
            self._pending.discard(fut)
            if self._shutdown and not self._pending:  # only shutdown waits for "all settled"
                self._idle.notify_all()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Any:
        """Like ``ProcessPoolExecutor.map``: results in the order of the inputs; ``chunksize`` inputs
        are sent to a worker as one task (``ValueError`` if it is below 1)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = super().map(
            functools.partial(_process_chunk, fn), _get_chunks(*iterables, chunksize=chunksize), timeout=timeout
        )
        return _chain_from_iterable_of_lists(chunks)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what has not started; stop the workers."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        lock, idle, runner = self._lock, self._idle, self._runner
        if cancel_futures:
            # Submitting sent what a free worker could take (claimed: running), as ProcessPoolExecutor's
            # queue feeds its workers ahead of a shutdown; what is still queued is cancelled.
            for fut in pending:
                if cf.Future.cancel(fut):
                    self._settle(fut)
        if not runner.thread.is_alive():
            return

        def stop_when_idle() -> None:
            with lock:
                while self._pending:
                    idle.wait()
            runner.stop()

        if wait:
            stop_when_idle()
            runner.thread.join()
        else:
            threading.Thread(target=stop_when_idle, daemon=True).start()
