"""How many tasks a worker has begun, counted by the worker in a page it shares with its pool.

A worker's answers travel through its ZeroMQ socket, whose queue dies with the process: after a crash
the pool cannot tell from the answers it got whether a task sent to wait at that worker was begun (its
answer lost) or never reached. A count the worker stores in shared memory *before* it begins each task
survives any death, SIGKILL included (the page belongs to the memory file, not to the process), so the
pool knows exactly: of the tasks it sent and got no answer for, in order, the first ``begun`` ones had
begun there and may have run; the rest never began and can run elsewhere without running twice.

The pool makes the page (``TaskTally()``) and hands its file to the worker (``WorkerBoot.tally_fd``); the
worker maps it (``TaskTally.attach``) and closes the file (the mapping keeps a duplicate of its own).
Both are close-on-exec and the mapping does not survive ``exec``: the sandbox's zygote, started with
``exec``, and the confined code it forks never see it.
"""

from __future__ import annotations

import mmap
import os


class TaskTally:
    """A shared 64-bit count of the tasks a worker began."""

    def __init__(self, fd: int | None = None) -> None:
        """A new page (the pool's side), or the one behind inherited ``fd`` (see ``attach``)."""
        if fd is None:
            fd = os.memfd_create("aeco-tally", os.MFD_CLOEXEC)
            os.ftruncate(fd, 8)
        #: The file to hand to the worker (None once closed here).
        self.fd: int | None = fd
        self._map = mmap.mmap(fd, 8)  # MAP_SHARED: the worker's stores are the pool's reads
        self._count = memoryview(self._map).cast("Q")

    @classmethod
    def attach(cls, fd: int) -> TaskTally:
        """The worker's side: map the page behind inherited ``fd`` and close ``fd``."""
        tally = cls(fd)
        tally.close_fd()
        return tally

    @property
    def handed_fd(self) -> int:
        """The file to hand to the worker (``WorkerBoot.tally_fd``), still open here."""
        assert self.fd is not None, "the tally's file was closed here: it was handed over already"
        return self.fd

    def close_fd(self) -> None:
        """Close the file (the mapping stays): the pool once the worker inherited it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def begin(self) -> None:
        """Count one more task begun (the worker, before anything of the task happens)."""
        self._count[0] += 1

    def read(self) -> int:
        """Tasks begun so far."""
        return int(self._count[0])

    def close(self) -> None:
        """Unmap the page (and close the file if still open)."""
        self.close_fd()
        self._count.release()
        self._map.close()
