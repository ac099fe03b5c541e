"""One worker OS process: spawned into its cgroups, signalled, killed, and reaped into a ``Death``.

Workers are forked from one long-lived thread (``_Spawner``): a worker's parent-death signal fires when
the *thread* that forked it ends, and the pool's loop may run in a thread that ends before the process
(an executor's). The pidfd opened at spawn becomes readable when the worker exits; ``reap`` then
collects it with ``wait4`` (its kernel CPU and peak RSS) and reads its cgroups before removing them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any

import msgspec

from runtime.host import cgroups as cg
from runtime.host.tally import TaskTally
from runtime.pool.accounting import RunDelay

#: A shell joins the worker's cgroups and then becomes the worker, so that the cgroups count the
#: worker's CPU from its first instruction. A failed join is noticed at hello.
_JOIN_AND_EXEC = """IFS='
'
for f in $AECO_CGROUP_PROCS; do echo $$ 2>/dev/null > "$f"; done
unset AECO_CGROUP_PROCS
exec "$@"
"""


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


class Death(msgspec.Struct, frozen=True):
    """How a worker process ended, as the kernel tells it."""

    pid: int
    #: Its exit status (negative: the signal that killed it; -1 when someone else reaped it).
    returncode: int
    #: Its CPU (user + system, with its reaped children) from ``wait4``; 0 when someone else reaped it.
    cpu_seconds: float
    #: Its peak resident memory from ``wait4``.
    maxrss_bytes: int
    #: Its cgroups' memory peak and CPU counter (None without cgroups), and whether their OOM killer
    #: killed in them.
    cgroup_peak: int | None
    cgroup_cpu: float | None
    oom_killed: bool


class WorkerProcess:
    """A worker process: its ``Popen``, the pidfd that says when it exits, its cgroups (None: measured
    through ``/proc``), the counter of the time it waited for a CPU, and the tally of the tasks it began."""

    def __init__(self, proc: subprocess.Popen[bytes], cgroups: cg.WorkerCgroups | None, tally: TaskTally) -> None:
        self.proc = proc
        self.tally = tally
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        self.cgroups = cgroups
        self.run_delay = RunDelay(proc.pid)

    @classmethod
    def spawn(
        cls, argv: list[str], env: dict[str, str], keys_fd: int, cgroups: cg.WorkerCgroups | None, tally: TaskTally
    ) -> WorkerProcess:
        """Start ``argv`` with ``env`` (and the pool's imports on its path), inheriting ``keys_fd`` and
        ``tally``'s file, in ``cgroups`` if any. Both files are closed here, in any case."""
        env = dict(env)
        # Workers import what the supervisor imports (the executor pickles functions by reference).
        env["PYTHONPATH"] = os.pathsep.join(x for x in sys.path if x)
        if cgroups is not None:
            env["AECO_CGROUP_PROCS"] = "\n".join(cgroups.procs_files())
            argv = ["/bin/sh", "-c", _JOIN_AND_EXEC, "sh", *argv]
        try:
            fds = (keys_fd, tally.handed_fd)
            proc = _spawner.popen(argv, env=env, close_fds=True, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            tally.close()
            raise
        finally:
            os.close(keys_fd)
        tally.close_fd()
        return cls(proc, cgroups, tally)

    def in_cgroups(self) -> bool:
        """Whether it joined every cgroup made for it (trivially, when it has none)."""
        c = self.cgroups
        return c is None or all(self.pid in cg.processes_in(os.path.dirname(f)) for f in c.procs_files())

    def leave_cgroups(self) -> None:
        """Remove its cgroups (it is measured through ``/proc`` from now on)."""
        if self.cgroups is not None:
            self.cgroups.remove()
            self.cgroups = None

    def ask_stop(self) -> None:
        """Ask it to stop its task (SIGUSR1: it ends a generation or kills its confined child)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGUSR1)

    def kill(self) -> None:
        """SIGKILL it (nothing if it is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def reap(self) -> Death | None:
        """Collect it if it has exited (None: not yet a zombie), read and remove its cgroups."""
        try:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, ru = self.pid, 0, None
        if pid == 0:
            return None
        self.proc.returncode = os.waitstatus_to_exitcode(status) if ru is not None else -1
        c = self.cgroups
        death = Death(
            self.pid,
            self.proc.returncode,
            ru.ru_utime + ru.ru_stime if ru is not None else 0.0,
            ru.ru_maxrss * 1024 if ru is not None else 0,
            c.memory_peak_bytes() if c else None,
            c.cpu_seconds() if c else None,
            bool(c and c.oom_kills()),
        )
        if c is not None:
            c.remove()
        return death

    def close(self) -> None:
        """Close its pidfd (once no loop watches it), its run-delay counter and its tally."""
        os.close(self.pidfd)
        self.run_delay.close()
        self.tally.close()
