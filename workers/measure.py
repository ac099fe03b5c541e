"""Measurement probes used by a worker around each task.

CPU is ``getrusage`` (this process, all threads, plus waited-for children); memory is a resettable
high-water mark, from the worker's own memory cgroup when it has one, else from ``VmHWM`` in
``/proc/self/status`` reset through ``/proc/self/clear_refs``. Files are opened once and read with
``pread``, which keeps a probe in the microseconds.

A cgroup's peak is only reset when it is above the current use: a high-water mark that already equals
the current use is exactly what a reset would give. ``clear_refs`` is the other way round: its reset
only sets the mark to the current use (about a microsecond), while reading the mark to decide means
having the kernel format all of ``/proc/self/status`` (about ten), so it is reset every time.
"""

from __future__ import annotations

import os
import resource
from typing import NamedTuple, Protocol

from runtime.protocol import MemoryProbe

_SELF, _CHILDREN = resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN


def cpu_seconds() -> float:
    """CPU (user + system) used so far by this process's threads and its reaped children.

    Children are only ever reaped inside a task, so their CPU always lands in a task's segment.
    """
    s, c = resource.getrusage(_SELF), resource.getrusage(_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class MemoryMeter(Protocol):
    """A resettable memory high-water mark for the current process."""

    name: MemoryProbe

    def start(self) -> int:
        """Reset the peak to the current use and return the current use (bytes)."""
        ...

    def peak(self) -> int:
        """The highest use since ``start`` (bytes)."""
        ...

    def current(self) -> int:
        """The current use (bytes)."""
        ...

    def peak_and_current(self) -> tuple[int, int]:
        """``peak()`` and ``current()`` at the end of a task, in one read where one file holds both."""
        ...

    def limit(self, extra: int) -> None:
        """Let the process grow by at most ``extra`` bytes from now on (until ``unlimit``)."""
        ...

    def unlimit(self) -> None:
        """Lift the limit set by ``limit``."""
        ...


def _pread_int(fd: int) -> int:
    return int(os.pread(fd, 64, 0))


class _CgroupFiles(NamedTuple):
    """The memory files of one cgroup version, and what is written to reset the peak and lift the limit."""

    usage: str
    peak: str
    limit: str
    reset: bytes
    unlimited: bytes


_CGROUP_FILES = {
    1: _CgroupFiles("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes", b"0", b"-1"),
    # Writing to an open memory.peak resets that file's own peak (kernel >= 6.12).
    2: _CgroupFiles("memory.current", "memory.peak", "memory.max", b"reset", b"max"),
}


class CgroupMeter:
    """The peak of the worker's own memory cgroup (``version`` 1: ``memory.max_usage_in_bytes``,
    2: ``memory.peak``), reset by a write to it; raises ``OSError`` where the peak cannot be reset."""

    def __init__(self, directory: str, version: int) -> None:
        files = self._files = _CGROUP_FILES[version]
        self.name: MemoryProbe = "cgroup-v1" if version == 1 else "cgroup-v2"
        self._usage = os.open(os.path.join(directory, files.usage), os.O_RDONLY)
        self._peak = os.open(os.path.join(directory, files.peak), os.O_RDWR)
        self._limit = os.open(os.path.join(directory, files.limit), os.O_WRONLY)
        if version == 2:
            os.pwrite(self._peak, files.reset, 0)  # raises on kernels without per-fd reset

    def limit(self, extra: int) -> None:
        # Over it the kernel OOM-kills the worker (its cgroup's only process); the pool reads the
        # cgroup's oom_kill count to report memory_exceeded.
        os.pwrite(self._limit, str(_pread_int(self._usage) + extra).encode(), 0)

    def unlimit(self) -> None:
        os.pwrite(self._limit, self._files.unlimited, 0)

    def start(self) -> int:
        usage = _pread_int(self._usage)
        if _pread_int(self._peak) > usage:
            os.pwrite(self._peak, self._files.reset, 0)
        return usage

    def peak(self) -> int:
        return _pread_int(self._peak)

    def current(self) -> int:
        return _pread_int(self._usage)

    def peak_and_current(self) -> tuple[int, int]:
        return _pread_int(self._peak), _pread_int(self._usage)


class ProcStatusMeter:
    """``VmHWM`` from ``/proc/self/status``, reset by writing 5 to ``clear_refs``; the current use
    (``VmRSS``, the same count) from the much shorter ``/proc/self/statm``."""

    name: MemoryProbe = "vmhwm"

    def __init__(self) -> None:
        self._status = os.open("/proc/self/status", os.O_RDONLY)
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def limit(self, extra: int) -> None:
        # Without a memory cgroup, bound the address space: an allocation over it raises
        # MemoryError inside the task instead of growing the worker.
        vm = 0
        for line in os.pread(self._status, 4096, 0).split(b"\n"):
            if line.startswith(b"VmSize:"):
                vm = int(line.split()[1]) * 1024
                break
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))

    def unlimit(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))

    def _read(self) -> tuple[int, int]:
        text = os.pread(self._status, 4096, 0)
        hwm = rss = 0
        for line in text.split(b"\n"):
            if line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
            elif line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break  # VmRSS follows VmHWM
        return hwm, rss

    def start(self) -> int:
        os.write(self._clear, b"5")
        return self.current()

    def peak(self) -> int:
        return self._read()[0]

    def current(self) -> int:
        return int(os.pread(self._statm, 128, 0).split()[1]) * self._page  # resident pages

    def peak_and_current(self) -> tuple[int, int]:
        # The kernel formats all of /proc/self/status for each read (~10 µs): one read gives both.
        return self._read()


def open_meter(memory_cgroup: tuple[str, int] | None) -> MemoryMeter:
    """The best memory meter available: the worker's own cgroup, else ``/proc/self``."""
    if memory_cgroup is not None:
        directory, version = memory_cgroup
        with open("/proc/self/cgroup") as f:
            joined = os.path.basename(directory) in f.read()
        try:
            if not joined:
                raise OSError(f"not a member of {directory}")
            return CgroupMeter(directory, version)
        except OSError:
            pass
    return ProcStatusMeter()
