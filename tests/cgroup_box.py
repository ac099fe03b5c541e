"""``benchmarks.cgroup_box`` for tests: a box around a command, or a skip saying why there is none."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from benchmarks.cgroup_box import CgroupBox, CgroupUnavailable

#: ``cpu.shares`` of the box: well above the default 1024, so that on a busy shared host the box gets
#: the CPU its quota allows, and the quota, not the neighbours, is what limits it.
SHARES = 8192


@contextlib.contextmanager
def cgroup_box(cpu_cores: float, memory_bytes: int | None = None) -> Iterator[list[str]]:
    """Make the box; yield ``["sh", "-c", ..., "box"]`` to put in front of a command; remove it after."""
    name = f"aeco-box-{os.getpid()}-{time.monotonic_ns()}"
    try:
        box = CgroupBox(name, cpu_cores, memory_bytes=memory_bytes, cpuacct=True, shares=SHARES)
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    with box:
        yield box.command_prefix()
