"""The pool's decisions, as a state machine with no sockets, processes nor event loop.

``Scheduler`` decides which task goes to which worker and when, and says so with *commands* that the
pool (``runtime.pool.pool``) carries out: ``Send`` a task to a worker, ``Start`` the clock of the task a
worker now runs, ``AskStop`` or ``Kill`` a worker, ``Shutdown`` one, ``Spawn`` a worker (now or after a
back-off), ``Fail`` a task, ``ArmDeadline`` for the earliest deadline, ``PoolFailed``. Every method that
depends on time takes ``now`` (the monotonic clock) instead of reading one, so a hand-driven clock tests
every rule (tests/unit/test_scheduler.py), as ``economy/buckets.py`` is tested.

The rules:

- **One task runs per worker.** A task is sent to an ``idle`` worker, which is then ``busy`` until the
  pool reports its answer (``answered``) or its death (``died``).
- **Prefetch.** Up to ``prefetch`` plain tasks (not stopped by asking, see ``Job.plain``) may wait at a
  busy worker behind a plain task (up to a task's own ``depth`` when it asks for more); each starts when
  the one ahead of it answered. Not at a worker that
  will be recycled before reaching them. Fair order is kept: when the next task may not wait, nothing
  waits until a worker is free for it.
- **Fairness.** Tasks leave the queue in ``FairQueue`` order (round-robin over agents).
- **Retry once.** A task whose worker crashed under it goes back to the head of its agent's line if it
  is idempotent and on its first attempt; tasks that waited at a dead worker go back uncounted.
- **Crash window.** A worker that died unexpectedly is replaced after an exponential back-off; more
  than ``max_restarts`` crashes within ``restart_window_s`` and the pool fails: every queued task
  fails with ``pool_failed`` and every worker is killed. A death that was the task's fault (deadline,
  memory limit, cancel) is replaced at once and not counted.
- **Deadlines.** A task's deadline counts from when it starts on its worker; past it the worker is
  killed (``deadline_exceeded``, or ``cancelled`` for a task asked to stop that did not within
  ``cancel_grace_s``).
- **Recycling.** An idle worker that did ``max_tasks_per_worker`` tasks or grew more than
  ``max_memory_growth_mb`` is shut down and a new one spawned.

Invariants: a busy worker runs exactly one task, an idle or starting one none, and at most ``prefetch``
wait at a busy one; a task is in exactly one place: queued, waiting at a worker, or running on one (or
done: in none). Each step that could break one asserts it (a task starts only on a worker that runs
none, waits only where there is room, a worker says hello once); ``check`` asserts them all at once
(the unit tests call it after every step, over random sequences of events).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from runtime.config import PoolConfig
from runtime.errors import ErrorCode
from runtime.pool.fairqueue import FairQueue

log = logging.getLogger("runtime.pool")

WorkerState = Literal["starting", "idle", "busy", "stopping", "dead"]

#: Why a worker is killed, or died, that is the task's fault: it is replaced at once, not counted as a crash.
_TASK_FAULTS = ("deadline_exceeded", "memory_exceeded", "cancelled")


@dataclass(slots=True, eq=False, kw_only=True)
class Job:
    """A task as the scheduler sees it (the pool's task subclasses it with what it sends and charges)."""

    id: int
    agent: str
    #: Seconds it may run once started.
    timeout_s: float
    #: Retried once after a crash of its worker.
    idempotent: bool = False
    #: May wait at a worker behind another task, and be waited behind: not stopped by asking (a signal
    #: for the task running would reach a task waiting, and an invocation's replies share the worker's
    #: socket). A tracked task that waited is recorded in ``inflight`` when its turn comes (``Start``).
    plain: bool = True
    #: Stopped by asking its worker (SIGUSR1), which keeps its process; else by killing its worker.
    stops_when_asked: bool = False
    #: Called once when the task is about to be sent (or failed unsent); False: cancelled meanwhile.
    claim: Callable[[], bool] | None = None
    attempts: int = 0
    #: Asked to stop: it ends as ``cancelled``, whatever stops it.
    cancelled: bool = False
    #: Asked to stop while it waited at a worker: stopped as soon as it starts.
    cancel_at_start: bool = False
    #: When it was last sent to a worker.
    sent_at: float = 0.0
    #: The worker it should run on if that one is idle when its turn comes (what it needs is kept
    #: there); 0: any.
    prefer: int = 0
    #: How many tasks may wait at a worker when this one is sent to wait there, if more than the pool's
    #: ``prefetch`` (a burst such as ``WorkerPoolExecutor.map``: its tasks travel several per frame).
    depth: int = 0


J = TypeVar("J", bound=Job)


@dataclass(slots=True, eq=False)
class Worker(Generic[J]):
    """A worker's scheduling state (the pool's worker object holds its process and socket identity)."""

    wid: int
    started_at: float
    last_seen: float
    state: WorkerState = "starting"
    #: The task it runs.
    job: J | None = None
    #: Tasks sent after it that wait in the worker's socket, in order.
    waiting: collections.deque[J] = field(default_factory=collections.deque)
    #: When ``job`` began: when it was sent, or when the task ahead of it answered.
    job_started: float = 0.0
    #: When ``job`` must be over; 0 when none runs.
    deadline_at: float = 0.0
    #: Why it is being killed or shut down (None: it is not).
    kill_reason: str | None = None
    #: Tasks done and memory in use, as its last report said (None: no report yet), and its memory at hello.
    tasks_done: int | None = None
    memory_bytes: int = 0
    baseline_memory: int = 0

    def grown(self) -> int:
        """Bytes of memory it gained since its hello."""
        return self.memory_bytes - self.baseline_memory


# --------------------------------------------------------------------------------------- commands
# Plain slotted dataclasses: a few are made per task, and a frozen one's __init__ costs a setattr call per field.


@dataclass(slots=True)
class Send(Generic[J]):
    """Send ``job`` to worker ``wid``; ``runs_now``: it starts there at once (else it waits)."""

    wid: int
    job: J
    runs_now: bool


@dataclass(slots=True)
class Start:
    """Worker ``wid`` now runs its ``job``: its held time counts from here."""

    wid: int


@dataclass(slots=True)
class AskStop:
    """Ask worker ``wid`` to stop its task (SIGUSR1)."""

    wid: int


@dataclass(slots=True)
class Kill:
    """Kill worker ``wid`` (its ``kill_reason`` says why)."""

    wid: int


@dataclass(slots=True)
class Shutdown:
    """Ask worker ``wid`` to exit once its task is done."""

    wid: int


@dataclass(slots=True)
class Spawn:
    """Start a worker after ``delay`` seconds (0: now); after a delay, only if the pool is still up."""

    delay: float = 0.0


@dataclass(slots=True)
class Fail(Generic[J]):
    """End ``job`` without running it (further): ``code``, ``message``."""

    job: J
    code: ErrorCode
    message: str


@dataclass(slots=True)
class ArmDeadline:
    """Call ``check_deadlines`` at ``when``."""

    when: float


@dataclass(slots=True)
class PoolFailed:
    """The pool gave up (``reason``): tell whoever waits on it."""

    reason: str


Command = Send[J] | Start | AskStop | Kill | Shutdown | Spawn | Fail[J] | ArmDeadline | PoolFailed


@dataclass(slots=True)
class Lost(Generic[J]):
    """What a worker's death means (``Scheduler.died``)."""

    #: The task it ran (None: it ran none), and why it ended: the kill reason, ``memory_exceeded`` for a
    #: kernel kill at the task's limit, or None for a death nobody asked for.
    job: J | None
    reason: str | None
    state: WorkerState
    #: Nobody asked for it: counted as a crash (and the executor breaks).
    crash: bool
    #: The task's fault (deadline, memory limit, cancel): replaced at once, not a crash.
    task_fault: bool
    #: What becomes of the tasks that waited at the worker (those not requeued).
    first: list[Command[J]]
    #: The task in hand when it had not begun it by its tally (``job`` is then None): requeued, or
    #: failed in ``first``, uncharged; the pool forgets its in-flight record.
    unbegun: J | None = None


class Scheduler(Generic[J]):
    """The pool's decisions (see the module's docstring). Not thread-safe: the pool holds its lock."""

    def __init__(self, cfg: PoolConfig, size: int) -> None:
        self.cfg = cfg
        self.size = size
        self.queue: FairQueue[J] = FairQueue()
        self.workers: dict[int, Worker[J]] = {}
        self._idle: collections.deque[Worker[J]] = collections.deque()
        self._crash_times: collections.deque[float] = collections.deque()
        self._crashes_in_a_row = 0
        #: Why the pool failed (None: it did not).
        self.failed: str | None = None
        self.closing = False
        self.crashed = 0
        #: The earliest deadline a timer is armed for (inf: none).
        self.deadline_when = float("inf")

    # ------------------------------------------------------------------------------- workers come

    def add(self, wid: int, now: float) -> None:
        """Worker ``wid`` was spawned; it takes tasks once it said hello."""
        assert wid not in self.workers, f"worker {wid} added twice"
        self.workers[wid] = Worker(wid, now, now)

    def seen(self, wid: int, now: float) -> None:
        """Worker ``wid`` said something (liveness)."""
        self.workers[wid].last_seen = now

    def hello(self, wid: int, baseline_memory: int, now: float) -> list[Command[J]]:
        """Worker ``wid`` proved itself and is ready for tasks; it uses ``baseline_memory`` bytes."""
        w = self.workers[wid]
        assert w.state == "starting", f"hello from worker {wid} in state {w.state}"
        w.state, w.baseline_memory = "idle", baseline_memory
        self._idle.append(w)
        return self._dispatch(now)

    def ready(self) -> bool:
        """As many workers are up as the pool's size."""
        return sum(w.state in ("idle", "busy") for w in self.workers.values()) >= self.size

    def report(self, wid: int, tasks_done: int, memory_bytes: int) -> list[Command[J]]:
        """Worker ``wid``'s counters; an idle worker is recycled if they say it is time."""
        w = self.workers[wid]
        w.tasks_done, w.memory_bytes = tasks_done, memory_bytes
        return self._recycle(w) if w.state == "idle" else []

    # ---------------------------------------------------------------------------------- tasks go

    def submit(self, job: J, now: float) -> list[Command[J]]:
        """Queue ``job`` (or fail it if the pool failed or is closing) and dispatch."""
        if self.failed or self.closing:
            return self._fail(job, "pool_failed" if self.failed else "pool_closed", self.failed or "the pool is closed")
        self.queue.push(job.agent, job)
        return self._dispatch(now)

    def _dispatch(self, now: float) -> list[Command[J]]:
        cmds: list[Command[J]] = []
        while self._idle and self.queue:
            w = self._idle.popleft()
            if w.state != "idle":
                continue
            job = self._take()
            if job is None:  # cancelled before it was sent: the worker stays free for the next
                self._idle.appendleft(w)
                continue
            cmds += self._send(self._preferred(w, job), job, now)
        if self.queue:
            cmds += self._prefetch(now)
        return cmds

    def _preferred(self, w: Worker[J], job: J) -> Worker[J]:
        """The idle worker ``job`` prefers, if there is one (``w`` goes back to the idle ones), else ``w``."""
        if job.prefer and job.prefer != w.wid:
            for other in self._idle:
                if other.wid == job.prefer and other.state == "idle":
                    self._idle.remove(other)
                    self._idle.appendleft(w)
                    return other
        return w

    def _take(self) -> J | None:
        """The next task in fair order, claimed (None if its claim said it was cancelled meanwhile)."""
        _, job = self.queue.pop()
        if job.claim is not None:
            if not job.claim():
                return None
            job.claim = None  # claimed once: a retry or a requeue does not claim it again
        return job

    def _prefetch(self, now: float) -> list[Command[J]]:
        cmds: list[Command[J]] = []
        for w in self.workers.values():
            while self.queue and self._may_prefetch(w, self.queue.peek()):
                job = self._take()
                if job is not None:
                    cmds += self._send(w, job, now)
            if not self.queue:
                break
        return cmds

    def _may_prefetch(self, w: Worker[J], nxt: J) -> bool:
        """Whether ``nxt``, the next task in fair order, may be sent to wait at ``w``."""
        job = w.job
        if w.state != "busy" or job is None or w.kill_reason is not None or not nxt.plain:
            return False
        if len(w.waiting) >= max(self.cfg.prefetch, nxt.depth):
            return False
        if not job.plain or job.cancelled:
            return False
        if w.tasks_done is None:
            return True
        most = self.cfg.max_tasks_per_worker
        if most and w.tasks_done + 1 + len(w.waiting) >= most:
            return False  # it is recycled before it would reach the task
        return w.grown() <= self.cfg.max_memory_growth_mb << 20

    def _send(self, w: Worker[J], job: J, now: float) -> list[Command[J]]:
        job.attempts += 1
        job.sent_at = now
        if w.job is not None:
            assert len(w.waiting) < max(self.cfg.prefetch, job.depth), f"worker {w.wid} has no room for a waiting task"
            w.waiting.append(job)
            return [Send(w.wid, job, False)]
        return [*self._start(w, job, now), Send(w.wid, job, True)]

    def _start(self, w: Worker[J], job: J, now: float) -> list[Command[J]]:
        assert w.job is None, "a worker runs one task at a time"
        w.state, w.job, w.job_started = "busy", job, now
        w.deadline_at = now + job.timeout_s
        cmds: list[Command[J]] = [Start(w.wid)]
        if w.deadline_at < self.deadline_when:
            self.deadline_when = w.deadline_at
            cmds.append(ArmDeadline(w.deadline_at))
        if job.cancel_at_start:
            cmds += self._stop(w, job, now)
        return cmds

    def unsent(self, wid: int, job: J, now: float) -> list[Command[J]]:
        """Sending ``job`` to ``wid`` failed (the worker is gone, and the pool killed it): put the task
        back untouched, for another worker (its death does the same for tasks sent to it before)."""
        w = self.workers[wid]
        if w.job is job:
            w.job, w.state = None, "stopping"  # being killed: it takes nothing more
        elif job in w.waiting:
            w.waiting.remove(job)
        job.attempts -= 1
        self.queue.push_front(job.agent, job)
        return self._dispatch(now)

    # ------------------------------------------------------------------------------ tasks answer

    def answered(self, wid: int) -> J:
        """Worker ``wid`` answered its task, which is returned (the pool charges it and ends it, then
        calls ``resume``)."""
        w = self.workers[wid]
        job = w.job
        assert w.state == "busy" and job is not None, f"worker {wid} answered no task"
        w.deadline_at = 0.0
        w.job = None
        self._crashes_in_a_row = 0
        return job

    def resume(self, wid: int, now: float) -> list[Command[J]]:
        """After ``answered``: the worker begins its next waiting task, or is free (or recycled)."""
        w = self.workers[wid]
        assert w.job is None, f"worker {wid} resumed while it runs task {w.job and w.job.id}"
        if w.waiting:  # the worker has begun the next one already
            cmds = self._start(w, w.waiting.popleft(), now)
        elif self.closing:
            w.state = "stopping"
            return []
        else:
            w.state = "idle"
            cmds = self._recycle(w)
            if not cmds:
                self._idle.append(w)
        return cmds + self._dispatch(now)

    def _recycle(self, w: Worker[J]) -> list[Command[J]]:
        """Retire an idle worker that did its share of tasks or grew too much; start its replacement."""
        if w.tasks_done is None or self.closing or w.state != "idle":
            return []
        too_many = bool(self.cfg.max_tasks_per_worker) and w.tasks_done >= self.cfg.max_tasks_per_worker
        too_big = w.grown() > self.cfg.max_memory_growth_mb << 20
        if not (too_many or too_big):
            return []
        log.info("recycling worker %d (%s)", w.wid, "task count" if too_many else "memory growth")
        w.state, w.kill_reason = "stopping", "recycled"
        return [Shutdown(w.wid), Spawn()]

    # ------------------------------------------------------------------------------------ stopping

    def find(self, task_id: int) -> J | None:
        """The task ``task_id`` if it is queued, waiting or running."""
        for w in self.workers.values():
            if w.job is not None and w.job.id == task_id:
                return w.job
            for job in w.waiting:
                if job.id == task_id:
                    return job
        return next((job for job in self.queue if job.id == task_id), None)

    def cancel(self, task_id: int, now: float) -> tuple[bool, list[Command[J]]]:
        """Stop task ``task_id``: a queued one fails ``cancelled`` at once, a waiting one is stopped when
        it starts, a running one is asked to stop (or its worker killed). False if there is none."""
        for w in self.workers.values():
            if w.state == "busy" and w.job is not None and w.job.id == task_id:
                return True, self._stop(w, w.job, now)
            for job in w.waiting:
                if job.id == task_id:
                    job.cancel_at_start = True
                    return True, []
        for job in self.queue:
            if job.id == task_id:
                self.queue.remove(job.agent, job)
                job.cancelled = True
                return True, [Fail(job, "cancelled", f"task {task_id} was cancelled before it ran")]
        return False, []

    def _stop(self, w: Worker[J], job: J, now: float) -> list[Command[J]]:
        if job.cancelled:
            return []
        job.cancelled = True
        if w.kill_reason is not None:
            return []  # being killed already: it ends that way
        if not job.stops_when_asked:
            w.kill_reason = "cancelled"
            return [Kill(w.wid)]
        # Not stopped within the grace period: its deadline check kills it (as cancelled, see there).
        cmds: list[Command[J]] = [AskStop(w.wid)]
        grace = now + self.cfg.cancel_grace_s
        if grace < w.deadline_at:
            w.deadline_at = grace
            if grace < self.deadline_when:
                self.deadline_when = grace
                cmds.append(ArmDeadline(grace))
        return cmds

    def kill(self, wid: int, reason: str) -> list[Command[J]]:
        """Kill worker ``wid`` for ``reason`` (a reason it already has stays)."""
        w = self.workers[wid]
        w.kill_reason = w.kill_reason or reason
        return [Kill(wid)]

    def check_deadlines(self, now: float) -> list[Command[J]]:
        """Kill the workers whose task is past its deadline; arm for the next deadline."""
        self.deadline_when = float("inf")
        cmds: list[Command[J]] = []
        upcoming = float("inf")
        for w in self.workers.values():
            if w.state != "busy" or not w.deadline_at or w.kill_reason is not None:
                continue
            if w.deadline_at <= now:
                w.kill_reason = "cancelled" if w.job is not None and w.job.cancelled else "deadline_exceeded"
                cmds.append(Kill(w.wid))
            else:
                upcoming = min(upcoming, w.deadline_at)
        if upcoming < float("inf"):
            self.deadline_when = upcoming
            cmds.append(ArmDeadline(upcoming))
        return cmds

    def check_liveness(self, now: float) -> list[Command[J]]:
        """Kill workers that did not say hello in time, and idle ones silent too long."""
        cmds: list[Command[J]] = []
        for w in self.workers.values():
            if w.kill_reason is not None:
                continue
            if w.state == "starting" and now - w.started_at > self.cfg.startup_timeout_s:
                w.kill_reason = "startup_timeout"
            elif w.state == "idle" and now - w.last_seen > self.cfg.heartbeat_timeout_s:
                w.kill_reason = "heartbeat_timeout"
            else:
                continue
            log.warning("worker %d: %s; killing it", w.wid, w.kill_reason)
            cmds.append(Kill(w.wid))
        return cmds

    def close(self) -> list[Command[J]]:
        """Stop taking tasks: fail the queued ones; workers finish what they run, then exit."""
        self.closing = True
        cmds: list[Command[J]] = []
        for job in self.queue.drain():
            cmds += self._fail(job, "pool_closed", "the pool was closed before the task ran")
        for w in self.workers.values():
            if w.state == "starting":  # not connected yet: nothing to finish
                w.kill_reason = "pool_closed"
                cmds.append(Kill(w.wid))
            elif w.state in ("idle", "busy"):
                cmds.append(Shutdown(w.wid))
                if w.state == "busy":
                    w.kill_reason = "pool_closed"  # if it has to be killed after the grace period
                else:
                    w.state = "stopping"
        return cmds

    def kill_all(self, reason: str) -> list[Command[J]]:
        """Kill every worker (those without a reason get ``reason``)."""
        return [cmd for wid in list(self.workers) for cmd in self.kill(wid, reason)]

    # ------------------------------------------------------------------------------------- deaths

    def died(self, wid: int, now: float, *, begun: int, over_memory: bool = False) -> Lost[J]:
        """Worker ``wid`` is dead (``over_memory``: the kernel killed it at its task's memory limit).

        ``begun`` is how many of the tasks it held unanswered, in the order sent (its task, then those
        that waited), it had begun by its own tally (``runtime.host.tally``). A task that never began
        (one that waited, or the task in hand itself if the worker died between its last answer and
        the next task) goes back to the head of its agent's line, its attempt not counted and nothing
        charged to it (or fails, as the pool does if it stops, or as a cancel asked). One that waited
        and began may have run, its answer lost with the worker: it fails ``worker_crashed`` uncharged
        (what the worker used since its last answer is charged to the task it ran), unless it is
        idempotent and on its first attempt (then it goes back, as a retry). The pool then settles the
        task it ran (``retry`` says whether it runs again) and asks ``replace`` for what comes next.
        """
        w = self.workers.pop(wid)
        job, was_state, waiting = w.job, w.state, list(w.waiting)
        assert job is not None or not waiting, f"worker {wid}: tasks wait behind none"
        w.state, w.job, w.deadline_at = "dead", None, 0.0
        w.waiting.clear()
        ran = job if begun >= 1 else None
        reason = w.kill_reason
        if reason is None and over_memory and ran is not None:
            reason = "memory_exceeded"  # the kernel killed it at the limit set for this task
        task_fault = reason in _TASK_FAULTS
        crash = not (task_fault or reason in ("recycled", "pool_closed") or self.closing)
        if crash:
            self.crashed += 1
        held = [job, *waiting] if job is not None else []
        first: list[Command[J]] = []
        for at in reversed(range(len(held))):
            queued, began = held[at], at < begun
            if queued is ran:
                continue  # the pool charges it from the kernel's count, then ``retry`` decides
            if not began:  # the attempt does not count
                queued.attempts -= 1
            if self.closing or self.failed:
                code: ErrorCode = "pool_failed" if self.failed else "pool_closed"
                first.append(Fail(queued, code, self.failed or "the pool was closed before the task ran"))
            elif queued.cancel_at_start or (queued is job and reason == "cancelled"):
                first.append(Fail(queued, "cancelled", f"task {queued.id} was cancelled before it ran"))
            elif began and not (queued.idempotent and queued.attempts < 2):
                why = f"worker {wid} died after it began task {queued.id}, whose answer was lost: not run again"
                first.append(Fail(queued, "worker_crashed", why))
            else:
                self.queue.push_front(queued.agent, queued)
        return Lost(ran, reason, was_state, crash, task_fault, first, None if ran is not None else job)

    def retry(self, lost: Lost[J]) -> bool:
        """Whether the task of a worker that crashed under it runs again: once, if it is idempotent. It
        goes back to the head of its agent's line, ahead of the tasks that waited behind it."""
        job = lost.job
        if job is None or lost.reason in (*_TASK_FAULTS, "pool_closed", "bad_report"):
            return False
        if not job.idempotent or job.attempts >= 2 or self.closing or self.failed:
            return False
        self.queue.push_front(job.agent, job)
        return True

    def replace(self, lost: Lost[J], now: float) -> list[Command[J]]:
        """After a death is settled: a new worker at once if the death was its task's fault, after a
        back-off if it crashed (or the pool fails, if too many crashed lately); then dispatch."""
        if self.closing or self.failed:
            return []
        cmds: list[Command[J]] = []
        if lost.task_fault:
            cmds.append(Spawn())
        elif lost.crash:
            cmds += self._restart(now)
        return cmds + self._dispatch(now)  # what went back to the queue may go to another worker

    def _restart(self, now: float) -> list[Command[J]]:
        self._crash_times.append(now)
        while self._crash_times and now - self._crash_times[0] > self.cfg.restart_window_s:
            self._crash_times.popleft()
        if len(self._crash_times) > self.cfg.max_restarts:
            return self.fail_pool(
                f"{len(self._crash_times)} worker crashes within {self.cfg.restart_window_s:g} s "
                f"(limit {self.cfg.max_restarts})"
            )
        self._crashes_in_a_row += 1
        delay = min(self.cfg.restart_backoff_s * 2 ** (self._crashes_in_a_row - 1), self.cfg.restart_backoff_max_s)
        return [Spawn(delay)]

    def fail_pool(self, reason: str) -> list[Command[J]]:
        """Give up: every queued task fails with ``pool_failed``, every worker is killed."""
        log.error("worker pool failed: %s", reason)
        self.failed = reason
        cmds: list[Command[J]] = [PoolFailed(reason)]
        for job in self.queue.drain():
            cmds += self._fail(job, "pool_failed", reason)
        return cmds + self.kill_all("pool_failed")

    def _fail(self, job: J, code: ErrorCode, message: str) -> list[Command[J]]:
        if job.claim is not None and not job.claim():
            return []  # cancelled meanwhile: its owner has ended it
        return [Fail(job, code, message)]

    # ---------------------------------------------------------------------------------- invariants

    def check(self) -> None:
        """Assert the invariants of the module's docstring (the unit tests call it after every step)."""
        places: dict[int, str] = {}

        def put(job: J, where: str) -> None:
            assert job.id not in places, f"task {job.id} is {where} and {places[job.id]}"
            places[job.id] = where

        for job in self.queue:
            put(job, "queued")
        for w in self.workers.values():
            if w.state == "busy":
                assert w.job is not None, f"busy worker {w.wid} runs no task"
            elif w.state in ("starting", "idle"):
                assert w.job is None and not w.waiting, f"{w.state} worker {w.wid} holds a task"
            most = max([self.cfg.prefetch, *(job.depth for job in w.waiting)])
            assert len(w.waiting) <= most, f"worker {w.wid} holds more than prefetch waiting"
            if w.job is not None:
                put(w.job, f"running on worker {w.wid}")
            for job in w.waiting:
                put(job, f"waiting at worker {w.wid}")
        for w in self._idle:
            assert w.wid in self.workers or w.state == "dead", f"idle list holds unknown worker {w.wid}"
