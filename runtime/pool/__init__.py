"""Dispatch: the worker pool, its fair queue, the books of what each worker's CPU went to, and the
record of tasks in flight (``inflight``) that lets a restart charge what a crash interrupted.

The public surface is re-exported here: ``WorkerPool`` (asyncio), ``WorkerPoolExecutor``
(``concurrent.futures``), ``TaskFailed`` (``WorkerCrashed`` when a worker died under the task),
``Outcome``, ``RunningTask`` (a task begun, to stop or await).

Data flow::

    caller thread                 pool's event loop (WorkerPool, pool.py)              worker processes
    ─────────────                 ─────────────────────────────────────────            ────────────────
    WorkerPoolExecutor.submit ─┐
    WorkerPool.run / begin ────┼─► submit ─► Scheduler.submit ─► commands ─► _do ──┐
    RunningTask.stop, cancel ──┘             (scheduler.py: pure,   Send ─────────►│ Wire (ROUTER) ──► DEALER
                                              explicit `now`)       Kill, AskStop ─►│ WorkerProcess ─► SIGKILL/USR1
                                                                    Spawn ────────►│ WorkerProcess.spawn
                                                                    Fail ─────────►│ done(None, TaskFailed)
                                                                                   │
    future / asyncio.Future ◄── done(Outcome) ◄── _on_result ◄─ Wire ◄─────────────┼── Result(usage), Heartbeat,
                                 charged (accounting.Accounts)  (checked, capped)  │   Hello(secret), Request
                                                                                   │
    done(None, WorkerCrashed) ◄── lost.charge_lost ◄── Scheduler.died ◄── _on_exit ◄── pidfd readable
                                  (wait4, cgroup)      retry / replace     (WorkerProcess.reap → Death)

Modules: ``scheduler`` (which task goes where, and when: the rules, with no I/O), ``pool`` (the I/O
shell that carries out its commands), ``wire`` (the socket, framing, the secret handshake),
``process`` (one worker OS process, its ``Death``), ``lost`` (charging a task whose worker died),
``task`` (a task's types and errors), ``executor`` (``WorkerPoolExecutor``), ``fairqueue``,
``accounting`` (each worker's CPU books), ``inflight`` (tasks in flight, for recovery).
"""

from runtime.pool.executor import UsageFuture, WorkerPoolExecutor
from runtime.pool.pool import PoolStatus, RunningTask, WorkerPool, resolve_size
from runtime.pool.task import Done, InvalidTimeout, Outcome, Serve, TaskFailed, TaskOptions, WorkerCrashed

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
