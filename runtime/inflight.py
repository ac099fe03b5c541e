"""Tasks in flight, kept where a killed supervisor leaves them, and charged on the next start.

A supervisor killed with SIGKILL takes its workers with it (``PR_SET_PDEATHSIG``), and with them every
task they were running: no ``Result`` and no ``wait4`` will ever say what those tasks used. So the pool
writes down each task it hands to a worker, in a small LMDB environment under ``data/run/inflight``:

- at dispatch, before the task is sent: the task id (the ledger's), agent, kind, worker, wall-clock
  start, and a *baseline*: the worker's kernel CPU counter at that moment (its per-worker cgroup's
  ``cpuacct.usage``/``cpu.stat``, else ``/proc/<pid>/stat``), read by the supervisor, not reported by
  the worker;
- every ``pool.sample_s`` while the task runs: the same counter again (one transaction for all busy
  workers);
- when the worker answers (or dies and is reaped): the exact usage, ``finished``;
- once the task's usage record is durable in the ledger: nothing (the record is deleted).

On the next start, before any agent runs and before the pool sweeps stale cgroups,
``runtime.recovery.recover`` charges
each record left over as a failed task (``supervisor_crashed``): the exact usage when it had finished;
else, when its worker's cgroup is still there, the cgroup's final counter minus the baseline (exact to
the nanosecond: the counter stops when the last process of the cgroup dies); else the last sample minus
the baseline (``/proc`` mode, as in an unprivileged container: up to ``sample_s`` of CPU, plus the
10 ms tick of ``/proc/<pid>/stat``, is not charged). The usage record is keyed by the task id like every
charge, so a task charged before the kill, or by a recovery that was itself killed, is never charged
again; its cost lowers the agent's buckets from their persisted levels, as ``Economy`` does.

Durability: the environment is written with ``sync`` off. Every commit is in the kernel's page cache
when it returns, so it survives the death of the process (SIGKILL, OOM kill), not a power loss or a
kernel crash (an environment that no longer opens is set aside, with a warning, and its tasks are lost).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import lmdb
import msgspec
from msgspec import Struct

from runtime import cgroups as cg
from runtime.accounting import TaskUsage

log = logging.getLogger("runtime.inflight")

#: The failure code of a task whose supervisor died while it ran.
CRASH_CODE = "supervisor_crashed"


class Finished(Struct, frozen=True):
    """A task's exact usage, known once its worker answered or was reaped; its charge is not durable yet."""

    cpu_seconds: float
    peak_memory_bytes: int
    baseline_memory_bytes: int
    wall_seconds: float


class InFlight(Struct, frozen=True, kw_only=True):
    """One task handed to a worker whose charge is not durable yet."""

    task_id: str
    agent: str
    kind: str
    worker_id: int
    worker_pid: int
    #: Unix time at dispatch.
    started_at: float
    #: Which kernel counter ``baseline_cpu`` and ``sampled_cpu`` come from.
    cpu_probe: Literal["cgroup", "/proc"]
    baseline_cpu: float
    #: CPU of earlier attempts (an idempotent task retried after its worker crashed).
    prior_cpu: float = 0.0
    #: The worker's memory use when the task started (what its cgroup peak is compared with).
    baseline_memory: int = 0
    #: The worker's child cgroups: after a kill they keep its final CPU counter and memory peak.
    cgroups: cg.WorkerCgroups | None = None
    sampled_cpu: float
    #: Unix time of ``sampled_cpu``.
    sampled_at: float
    finished: Finished | None = None


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(InFlight)


class InflightLog:
    """The crash-surviving record of the tasks in flight (see the module docstring).

    Written from the supervisor's event loop thread only; ``pending`` may be read from anywhere, also
    from another process (``readonly=True``) while the supervisor runs.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._live: dict[str, InFlight] = {}
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = self._open(readonly)
        except lmdb.Error as exc:
            if readonly:
                raise
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            log.warning("%s does not open (%s); set aside as %s: its tasks cannot be charged", self.path, exc, aside)
            os.replace(self.path, aside)
            self.path.mkdir()
            self.env = self._open(readonly)

    def _open(self, readonly: bool) -> lmdb.Environment:
        # sync off: a commit is a few microseconds and still survives the death of this process.
        return lmdb.open(
            str(self.path), map_size=1 << 28, max_dbs=0, sync=False, metasync=False, readonly=readonly, lock=True
        )

    def begin(self, rec: InFlight) -> None:
        """Record a task about to be sent to its worker (call it before sending)."""
        self._live[rec.task_id] = rec
        with self.env.begin(write=True) as txn:
            txn.put(rec.task_id.encode(), _enc.encode(rec))

    def sample(self, readings: Iterable[tuple[str, float]]) -> None:
        """Update the CPU counters of running tasks: ``(task id, kernel counter now)``, one commit."""
        now = time.time()
        with self.env.begin(write=True) as txn:
            for task_id, cpu in readings:
                rec = self._live.get(task_id)
                if rec is None or rec.finished is not None:
                    continue
                rec = self._live[task_id] = msgspec.structs.replace(rec, sampled_cpu=cpu, sampled_at=now)
                txn.put(task_id.encode(), _enc.encode(rec))

    def finish(self, task_id: str, usage: TaskUsage) -> None:
        """The task ended with this exact ``usage`` (all attempts); its charge is on its way."""
        rec = self._live.get(task_id)
        if rec is None:
            return
        done = Finished(usage.cpu_seconds, usage.peak_memory_bytes, usage.baseline_memory_bytes, usage.wall_seconds)
        rec = self._live[task_id] = msgspec.structs.replace(rec, finished=done)
        with self.env.begin(write=True) as txn:
            txn.put(task_id.encode(), _enc.encode(rec))

    def clear(self, task_id: str) -> None:
        """Forget a task whose usage record is durable (or that never reached its worker)."""
        if self._live.pop(task_id, None) is None:
            return
        with self.env.begin(write=True) as txn:
            txn.delete(task_id.encode())

    def pending(self) -> list[InFlight]:
        """Every task recorded and not cleared, as last written."""
        with self.env.begin() as txn:
            return [_dec.decode(v) for _, v in txn.cursor()]

    def drop(self, task_ids: Iterable[str]) -> None:
        """Delete records by id (after their recovery), in one commit."""
        with self.env.begin(write=True) as txn:
            for task_id in task_ids:
                self._live.pop(task_id, None)
                txn.delete(task_id.encode())

    def close(self) -> None:
        """Close the environment (records not cleared stay for the next start)."""
        self.env.close()


def _stop_leftovers(cgroups: cg.WorkerCgroups, timeout_s: float = 5.0) -> bool:
    """Kill what still runs in a dead supervisor's worker cgroups (its death signal should have) and
    wait until they are empty: only then is the CPU counter final. False if they did not empty."""
    end = time.monotonic() + timeout_s
    while True:
        pids = {pid for d in cgroups.dirs for pid in cg.processes_in(d)}
        if not pids:
            return True
        if time.monotonic() > end:
            return False
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def measure(rec: InFlight) -> tuple[TaskUsage, str]:
    """What a leftover task used, from the best source there is, and a word on which source it was."""
    if rec.finished is not None:
        f = rec.finished
        usage = TaskUsage(
            f.cpu_seconds, f.peak_memory_bytes, f.baseline_memory_bytes, f.wall_seconds, rec.worker_pid, "recovered"
        )
        return usage, "measured when it ended"
    wall = max(0.0, rec.sampled_at - rec.started_at)
    if rec.cpu_probe == "cgroup" and rec.cgroups is not None and _stop_leftovers(rec.cgroups):
        final = rec.cgroups.cpu_seconds()
        # A counter below the baseline is not this worker's cgroup any more (recreated since).
        if final is not None and final >= rec.baseline_cpu:
            peak = rec.cgroups.memory_peak_bytes()
            cpu = rec.prior_cpu + final - rec.baseline_cpu
            usage = TaskUsage(cpu, peak or 0, rec.baseline_memory if peak else 0, wall, rec.worker_pid, "recovered")
            return usage, "final cgroup counter"
    cpu = rec.prior_cpu + max(0.0, rec.sampled_cpu - rec.baseline_cpu)
    age = time.time() - rec.sampled_at
    return TaskUsage(cpu, 0, 0, wall, rec.worker_pid, "recovered"), f"last sample, {age:.0f} s old"
