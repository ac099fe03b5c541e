"""Charging a lost task: one whose worker died under it, charged from the kernel's account of the worker.

Its CPU is what the kernel counted for the worker beyond what the worker reported before it died
(``Accounts.unreported``); its memory peak the cgroup's, else ``wait4``'s peak RSS; its occupancy the
time it held the worker as for any task. It is charged once per attempt, here or from its ``Result``,
never both: a worker that answered has no task when it dies.
"""

from __future__ import annotations

from runtime.pool.accounting import Accounts, TaskUsage, occupancy
from runtime.pool.inflight import InflightLog
from runtime.pool.process import Death
from runtime.pool.task import PoolJob, TaskFailed, WorkerCrashed


def charge_lost(
    accounts: Accounts,
    inflight: InflightLog | None,
    job: PoolJob,
    death: Death,
    *,
    cpu: float,
    baseline_memory: int,
    memory_probe: str,
    wall: float,
    held: float,
    share: float,
) -> TaskUsage:
    """Charge ``job``'s attempt on the worker that ended as ``death`` (``cpu``: the kernel's CPU beyond
    its last report) to its agent, and finish its ``inflight`` record; returns what all its attempts
    cost."""
    peak = death.cgroup_peak
    usage = TaskUsage(
        cpu,
        peak if peak is not None else death.maxrss_bytes,
        baseline_memory,
        wall,
        death.pid,
        memory_probe if peak is not None else "rusage",
        occupancy_seconds=occupancy(held, share, cpu),
    )
    accounts.charge(job.agent, usage, False, death.pid, cpu)
    total = job.prior.plus(usage) if job.prior is not None else usage
    if job.track is not None and inflight is not None:
        inflight.finish(job.track, total)
    return total


def crash_story(worker_id: int, death: Death, task_id: int) -> str:
    """One line on a worker that died under a task: which, and how."""
    code = death.returncode
    how = f" (killed by signal {-code})" if code < 0 else f" (exit {code})"
    return f"worker {worker_id} (pid {death.pid}) died while running task {task_id}{how}"


def lost_failure(job: PoolJob, reason: str | None, total: TaskUsage, crash: str, bad_report: str) -> TaskFailed:
    """How ``job`` fails after its worker died for ``reason`` (``crash``: ``crash_story``'s line,
    ``bad_report``: why its report was refused), charged ``total``."""
    if reason == "deadline_exceeded":
        msg = f"task {job.id} ran over its {job.timeout_s:g} s deadline; its worker was killed"
        return TaskFailed("deadline_exceeded", msg, total)
    if reason == "pool_closed":
        return TaskFailed("pool_closed", "the pool was closed mid-task", total)
    if reason == "cancelled":
        return TaskFailed("cancelled", f"task {job.id} was cancelled; its worker was killed to stop it", total)
    if reason == "memory_exceeded":
        msg = f"task {job.id} went over its {job.memory_limit} byte memory limit; the kernel killed its worker"
        return TaskFailed("memory_exceeded", msg, total)
    if reason == "bad_report":
        msg = f"{bad_report}; the report was refused and the task charged from the kernel's count"
        return TaskFailed("bad_report", msg, total)
    return WorkerCrashed("worker_crashed", crash, total)
