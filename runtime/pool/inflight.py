"""Tasks in flight, kept where a killed supervisor leaves them, and charged on the next start.

A supervisor killed with SIGKILL takes its workers with it (``PR_SET_PDEATHSIG``), and with them every
task they were running: no ``Result`` and no ``wait4`` will ever say what those tasks used. So the pool
writes down each task it hands to a worker, in a small LMDB environment under ``data/run/inflight``:

- at dispatch, before the task is sent: the task id (the ledger's), agent, kind, worker, wall-clock
  start, and a *baseline*: the worker's kernel CPU counter at that moment (its per-worker cgroup's
  ``cpuacct.usage``/``cpu.stat``, else ``/proc/<pid>/stat``), read by the supervisor, not reported by
  the worker. A task sent to wait behind the one its worker runs (``pool.prefetch``) is written when its
  turn comes (the answer of the task ahead), its baseline where the task ahead's ends: that one's
  baseline plus the CPU it was charged, so that the two never count the same CPU and miss none of the
  worker's. Until then a crash charges the worker's CPU since the running task's baseline to that task
  (the kernel cannot tell the two apart), and the waiting task is not charged;
- every ``pool.sample_s`` while the task runs: the same counter again (one commit for all busy workers);
- when the worker answers (or dies and is reaped): the exact usage (``finished``);
- once the task's usage record is durable in the ledger: nothing (the record is deleted).

The last two are held back and written with the next dispatch or sample, so that a task costs one
commit (a few microseconds) in all; each is safe to lose (see ``finish`` and ``clear``).

On the next start, before any agent runs and before the pool sweeps stale cgroups,
``runtime.economy.recovery.recover`` charges each record left over as a failed task (``supervisor_crashed``):
the exact usage when it had finished; else, when its worker's cgroup is still there, the cgroup's final
counter minus the baseline (exact to the nanosecond: the counter stops when the last process of the
cgroup dies); else the last sample minus the baseline (``/proc`` mode, as in an unprivileged container:
the CPU since the last sample, up to ``sample_s`` of it, is not charged, and ``/proc`` counts in 10 ms
ticks). The usage record is keyed by the task id like every charge, so a task charged before the kill,
or by a recovery that was itself killed, is never charged again; its cost lowers the agent's buckets
from their persisted levels, as ``Economy`` does.

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

from runtime.host import cgroups as cg
from runtime.host.lmdbfile import check_file
from runtime.pool.accounting import (
    BadReport,
    TaskUsage,
    check_amounts,
    check_usage,
    occupancy,
    proc_stat_cpu_seconds,
)

log = logging.getLogger("runtime.pool.inflight")

#: The failure code of a task whose supervisor died while it ran.
CRASH_CODE = "supervisor_crashed"


class Finished(Struct, frozen=True):
    """A task's exact usage, known once its worker answered or was reaped; its charge is not durable yet."""

    cpu_seconds: float
    peak_memory_bytes: int
    baseline_memory_bytes: int
    wall_seconds: float
    occupancy_seconds: float = 0.0


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
    #: The agents of a ``think_batch``, in its order (``agent`` is the first): after a crash each is
    #: charged an equal share as ``<task_id>.<i>``, the batch's sequences' own work being lost with it.
    sharers: list[str] = []
    #: The pool's ``share``: a task cut short by the crash pays the occupancy of its worker up to its
    #: last sample at that rate (``runtime.pool.accounting.occupancy``).
    share: float = 0.0


class KernelCpu:
    """A worker's CPU counter as the kernel keeps it: its cgroup's (exact, and still readable after it
    died) else its ``/proc/<pid>/stat`` (10 ms ticks). The file is opened once and read with one
    ``pread``: about a microsecond, against tens for an open-read-close on a loaded host."""

    def __init__(self, pid: int, cgroups: cg.WorkerCgroups | None) -> None:
        self._cgroup_file = cgroups.cpu_file if cgroups is not None else None
        self.probe: Literal["cgroup", "/proc"] = "cgroup" if self._cgroup_file else "/proc"
        # A /proc/<pid> file stays bound to its process: once it is reaped, reads fail (no pid reuse).
        try:
            self._fd = os.open(self._cgroup_file or f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # the worker is gone already: nothing to read, ever
            self._fd = -1

    def read(self, children: bool = False) -> float | None:
        """CPU seconds so far (None once the process is gone, in ``/proc`` mode); with ``children``,
        in ``/proc`` mode, plus its reaped children's (a cgroup counts them always)."""
        if self._fd < 0:
            return None
        try:
            text = os.pread(self._fd, 4096, 0).decode()
        except OSError:
            return None
        if self._cgroup_file is not None:
            return cg.cpu_seconds_in(self._cgroup_file, text)
        return proc_stat_cpu_seconds(text, children)

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Spoiled(Struct, frozen=True):
    """A record that is not a believable ``InFlight``: it does not decode, or an amount in it is not
    finite and >= 0. It cannot be charged; it is set aside (``InflightLog.quarantine``) for an operator."""

    key: bytes
    raw: bytes
    why: str


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(InFlight)
#: The in-flight log's map, reserved on disk when it opens: a record is a few hundred bytes a running task,
#: so this holds thousands of workers' tasks with room for LMDB's copy-on-write pages.
MAP_SIZE = 8 << 20


def _decode(key: bytes, raw: bytes) -> InFlight | Spoiled:
    try:
        rec = _dec.decode(raw)
        where = f"in-flight record {rec.task_id!r}"
        if rec.task_id.encode() != key:
            raise BadReport(f"{where} is stored under another key")
        figures = ("started_at", "baseline_cpu", "prior_cpu", "baseline_memory", "sampled_cpu", "sampled_at")
        check_amounts(rec, figures, where)
        if rec.finished is not None:
            check_usage(rec.finished, where)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return Spoiled(key, raw, f"undecodable ({len(raw)} bytes): {exc}")
    except BadReport as exc:
        return Spoiled(key, raw, str(exc))
    return rec


class InflightLog:
    """The crash-surviving record of the tasks in flight (see the module docstring).

    Written from the supervisor's event loop thread only; ``pending`` may be read from anywhere, also
    from another process (``readonly=True``) while the supervisor runs.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._live: dict[str, InFlight] = {}
        #: Changes not committed yet: a record to write, or None to delete it.
        self._held: dict[str, InFlight | None] = {}
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
        check_file(self.path)
        # sync off and written through the map (no write() per page): a commit is a few microseconds
        # of memory writes into the page cache, which outlives this process.
        env = lmdb.open(
            str(self.path),
            map_size=MAP_SIZE,
            max_dbs=0,
            sync=False,
            metasync=False,
            writemap=not readonly,
            readonly=readonly,
            lock=True,
        )
        if not readonly:
            # A page of a shared map that the filesystem cannot back (a hole in the sparse file on a
            # full disk) faults with SIGBUS when it is first written: allocate the whole map now, so
            # that a full disk is an error here, at open, and never a signal later.
            fd = os.open(self.path / "data.mdb", os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, MAP_SIZE)
            except OSError as exc:
                env.close()
                raise OSError(
                    exc.errno,
                    f"cannot reserve {MAP_SIZE >> 20} MiB for the in-flight log: {exc.strerror}",
                    str(self.path),
                ) from None
            finally:
                os.close(fd)
        return env

    def begin(self, rec: InFlight) -> None:
        """Record a task about to be sent to its worker (call it before sending), with every change
        held back since the last commit, in one commit."""
        self._live[rec.task_id] = rec
        self._held[rec.task_id] = rec
        self._commit()

    def sample(self, readings: Iterable[tuple[str, float]]) -> None:
        """Update the CPU counters of running tasks: ``(task id, kernel counter now)``, in one commit."""
        now = time.time()
        for task_id, cpu in readings:
            rec = self._live.get(task_id)
            if rec is not None and rec.finished is None:
                self._live[task_id] = self._held[task_id] = msgspec.structs.replace(
                    rec, sampled_cpu=cpu, sampled_at=now
                )
        self._commit()

    def finish(self, task_id: str, usage: TaskUsage) -> None:
        """The task ended with this exact ``usage`` (all attempts); its charge is on its way.

        Held back until the next commit (the next dispatch, at the latest the next sample): until then
        a recovery measures the task from its worker's counter instead, as if it were still running.
        """
        rec = self._live.get(task_id)
        if rec is None:
            return
        done = Finished(
            usage.cpu_seconds,
            usage.peak_memory_bytes,
            usage.baseline_memory_bytes,
            usage.wall_seconds,
            usage.occupancy_seconds,
        )
        self._live[task_id] = self._held[task_id] = msgspec.structs.replace(rec, finished=done)

    def clear(self, task_id: str) -> None:
        """Forget a task whose usage record is durable (or that never reached its worker).

        Held back until the next commit: a record left behind by a kill meanwhile is harmless, since
        a recovery skips every task that has a usage record already.
        """
        if self._live.pop(task_id, None) is not None:
            self._held[task_id] = None

    def _commit(self) -> None:
        if not self._held:
            return
        with self.env.begin(write=True) as txn:
            for task_id, rec in self._held.items():
                if rec is None:
                    txn.delete(task_id.encode())
                else:
                    txn.put(task_id.encode(), _enc.encode(rec))
        self._held.clear()

    def pending(self) -> list[InFlight]:
        """Every task recorded and not cleared, as last written (without the spoiled records)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[InFlight], list[Spoiled]]:
        """Every record, as last written: the tasks, and the records that are not believable."""
        good: list[InFlight] = []
        spoiled: list[Spoiled] = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor():
                rec = _decode(bytes(key), bytes(raw))
                if isinstance(rec, Spoiled):
                    spoiled.append(rec)
                else:
                    good.append(rec)
        return good, spoiled

    @property
    def quarantine_path(self) -> Path:
        """Where spoiled records are set aside: one JSON file each, with its raw bytes and what was wrong."""
        return self.path.with_name(f"{self.path.name}.quarantine")

    def quarantine(self, records: Iterable[Spoiled]) -> list[Path]:
        """Set spoiled records aside under ``quarantine_path`` (written durably first) and delete them
        from the log, so that the next start neither trips on them again nor forgets them."""
        written: list[Path] = []
        keys: list[bytes] = []
        for rec in records:
            self.quarantine_path.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns()}-{rec.key.hex()[:64]}.json"
            path = self.quarantine_path / name
            with open(path, "wb") as f:
                f.write(msgspec.json.encode(rec))
                f.flush()
                os.fsync(f.fileno())
            written.append(path)
            keys.append(rec.key)
        if keys:
            with self.env.begin(write=True) as txn:
                for key in keys:
                    txn.delete(key)
        return written

    def drop(self, task_ids: Iterable[str]) -> None:
        """Delete records by id (after their recovery), in one commit."""
        with self.env.begin(write=True) as txn:
            for task_id in task_ids:
                self._live.pop(task_id, None)
                txn.delete(task_id.encode())

    def close(self) -> None:
        """Write what is held back and close the environment (records not cleared stay for the next start)."""
        self._commit()
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
            f.cpu_seconds,
            f.peak_memory_bytes,
            f.baseline_memory_bytes,
            f.wall_seconds,
            rec.worker_pid,
            "recovered",
            occupancy_seconds=f.occupancy_seconds,
        )
        return usage, "measured when it ended"
    wall = max(0.0, rec.sampled_at - rec.started_at)
    if rec.cpu_probe == "cgroup" and rec.cgroups is not None and _stop_leftovers(rec.cgroups):
        final = rec.cgroups.cpu_seconds()
        # A counter below the baseline is not this worker's cgroup any more (recreated since).
        if final is not None and final >= rec.baseline_cpu:
            peak = rec.cgroups.memory_peak_bytes()
            cpu = rec.prior_cpu + final - rec.baseline_cpu
            held = occupancy(wall, rec.share, cpu)
            usage = TaskUsage(
                cpu, peak or 0, rec.baseline_memory if peak else 0, wall, rec.worker_pid, "recovered", 1, held
            )
            return usage, "final cgroup counter"
    cpu = rec.prior_cpu + max(0.0, rec.sampled_cpu - rec.baseline_cpu)
    age = time.time() - rec.sampled_at
    usage = TaskUsage(cpu, 0, 0, wall, rec.worker_pid, "recovered", 1, occupancy(wall, rec.share, cpu))
    return usage, f"last sample, {age:.0f} s old"
