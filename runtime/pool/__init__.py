"""Dispatch: the worker pool, its fair queue, the books of what each worker's CPU went to, and the
record of tasks in flight (``inflight``) that lets a restart charge what a crash interrupted.

The public surface is re-exported here: ``WorkerPool`` (asyncio), ``WorkerPoolExecutor``
(``concurrent.futures``), ``TaskFailed`` (``WorkerCrashed`` when a worker died under the task),
``Outcome``, ``RunningTask`` (a task begun, to stop or await).
"""

from runtime.pool.pool import (
    Done,
    InvalidTimeout,
    Outcome,
    PoolStatus,
    RunningTask,
    Serve,
    TaskFailed,
    TaskOptions,
    UsageFuture,
    WorkerCrashed,
    WorkerPool,
    WorkerPoolExecutor,
    resolve_size,
)

__all__ = [
    "Done",
    "InvalidTimeout",
    "Outcome",
    "PoolStatus",
    "RunningTask",
    "Serve",
    "TaskFailed",
    "TaskOptions",
    "UsageFuture",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerPoolExecutor",
    "resolve_size",
]
