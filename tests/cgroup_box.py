"""A small "container" for tests: a child cgroup of the test process's own with a CPU quota (and
optionally a memory limit), and the command prefix that starts a program inside it.

Only cgroup v1 controllers are used (this project's CI hosts are v1/v2 hybrids whose v1 ``cpu``,
``cpuacct`` and ``memory`` hierarchies are writable by root); elsewhere the tests that need one skip,
saying why.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import cgroups as cg

#: ``cpu.shares`` of the box: well above the default 1024, so that on a busy shared host the box gets
#: the CPU its quota allows, and the quota, not the neighbours, is what limits it.
SHARES = 8192


@contextlib.contextmanager
def cgroup_box(cpu_cores: float, memory_bytes: int | None = None) -> Iterator[list[str]]:
    """Make the box; yield ``["sh", "-c", ..., "box"]`` to put in front of a command; remove it after."""
    info = cg.discover()
    controllers = ["cpu", "cpuacct"] + (["memory"] if memory_bytes is not None else [])
    parents = {c: info.dir(c) for c in controllers}
    missing = [c for c, d in parents.items() if d is None or not os.access(d, os.W_OK)]
    if missing:
        pytest.skip(f"needs writable cgroup v1 {', '.join(missing)} hierarchies (cgroups here: {info.mode})")
    name = f"aeco-box-{os.getpid()}-{time.monotonic_ns()}"
    dirs = [Path(str(d)) / name for d in parents.values()]
    try:
        for d in dirs:
            d.mkdir()
        cpu = Path(str(parents["cpu"])) / name
        period = int((cpu / "cpu.cfs_period_us").read_text())
        (cpu / "cpu.cfs_quota_us").write_text(str(int(cpu_cores * period)))
        (cpu / "cpu.shares").write_text(str(SHARES))
        if memory_bytes is not None:
            (Path(str(parents["memory"])) / name / "memory.limit_in_bytes").write_text(str(memory_bytes))
        join = "; ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in dirs)
        yield ["sh", "-c", f'{join}; exec "$@"', "box"]
    finally:
        for d in dirs:
            for _ in range(100):  # the last process leaves once the kernel has reaped it
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
