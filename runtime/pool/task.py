"""A task as the pool runs it: how it ends (``Outcome``, ``TaskFailed``), how it is asked for
(``TaskOptions``, ``check_timeout``), and the pool's record of it (``PoolJob``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypedDict

import msgspec

from runtime import protocol as p
from runtime.errors import AecoError, ErrorCode
from runtime.pool.accounting import TaskUsage
from runtime.pool.scheduler import Job

#: Tasks a worker stops by itself when asked (SIGUSR1), keeping its process: a generation between two
#: tokens, an invocation by killing its confined child. Any other task is stopped by killing its worker.
STOPS_WHEN_ASKED = (p.Think, p.ThinkBatch, p.Invoke)


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
    sharers: tuple[str, ...]
    prefer: int
    depth: int


class KernelReading(msgspec.Struct, frozen=True, array_like=True):
    """A worker's CPU as the kernel counted it, and how far that count may lag the exact figure."""

    cpu: float
    slack: float


@dataclass(slots=True, eq=False, kw_only=True)
class PoolJob(Job):
    """A task in the pool: what the scheduler decides on (``Job``), and what is sent and charged."""

    spec: p.TaskSpec
    measure: bool = True
    #: Bytes the task may add to its worker's memory (0: unlimited).
    memory_limit: int = 0
    done: Done
    #: Answers the task's ``Request`` messages (confined code reaching the world), if it may send any.
    serve: Serve | None = None
    #: What its earlier attempt was charged (a retried task's charge adds up).
    prior: TaskUsage | None = None
    #: The ledger's id of the task: recorded in ``WorkerPool.inflight`` while it runs.
    track: str | None = None
    #: The agents sharing a tracked ``think_batch`` (recorded with it, for a recovery to split it).
    sharers: tuple[str, ...] = ()
    #: The worker's kernel CPU counter when the task was sent (None: unmeasured, or unreadable).
    kernel_start: KernelReading | None = None
    #: The worker it was last sent to (0: none yet); a ``Start`` for that worker finds it sent already
    #: when it waited there behind another task (``prefetch``).
    sent_to: int = 0
    #: Where its ``inflight`` record counts its CPU from (the worker's kernel counter), once recorded.
    baseline: float | None = None
