"""A small "container" for benchmarks and tests: a v1 child cgroup of this process's own with a CPU
quota (and optionally a memory limit and the ``cpuacct`` counter) that a process is started in.

Only cgroup v1 controllers are used: this project's hosts are v1/v2 hybrids whose v1 ``cpu``,
``cpuacct`` and ``memory`` hierarchies are writable by root. Where they are not, ``CgroupBox`` raises
``CgroupUnavailable`` saying which ones are missing (tests turn that into a skip).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from types import TracebackType

from runtime.host import cgroups


class CgroupUnavailable(RuntimeError):
    """The v1 hierarchies a box needs are not mounted or not writable here."""


class CgroupBox:
    """Child cgroups named ``name`` in the ``cpu`` (always), ``cpuacct`` and ``memory`` hierarchies.

    ``cpu.cfs_quota_us`` is ``cpu_cores`` × the period (``period_us`` when given, else the kernel's);
    ``shares`` sets ``cpu.shares``; ``memory_bytes`` sets ``memory.limit_in_bytes``. A process joins
    with ``enter`` (in a child before it executes) or by running behind ``command_prefix``.
    """

    def __init__(
        self,
        name: str,
        cpu_cores: float,
        *,
        memory_bytes: int | None = None,
        cpuacct: bool = False,
        shares: int | None = None,
        period_us: int | None = None,
    ) -> None:
        info = cgroups.discover()
        controllers = ["cpu"] + (["cpuacct"] if cpuacct else []) + (["memory"] if memory_bytes is not None else [])
        parents = {c: info.dir(c) for c in controllers}
        missing = [c for c, d in parents.items() if d is None or not os.access(d, os.W_OK)]
        if missing:
            raise CgroupUnavailable(
                f"needs writable cgroup v1 {', '.join(missing)} hierarchies (cgroups here: {info.mode})"
            )
        self.dirs: list[Path] = []
        by_controller: dict[str, Path] = {}
        try:
            for c, parent in parents.items():
                d = Path(str(parent)) / name
                d.mkdir(exist_ok=True)  # cpu and cpuacct may be one hierarchy: then it is one directory
                if d not in self.dirs:
                    self.dirs.append(d)
                by_controller[c] = d
            cpu = by_controller["cpu"]
            if period_us is not None:
                (cpu / "cpu.cfs_period_us").write_text(str(period_us))
            period = int((cpu / "cpu.cfs_period_us").read_text())
            (cpu / "cpu.cfs_quota_us").write_text(str(int(cpu_cores * period)))
            if shares is not None:
                (cpu / "cpu.shares").write_text(str(shares))
            if memory_bytes is not None:
                (by_controller["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
        except BaseException:
            self.remove()
            raise
        self._usage = by_controller["cpuacct"] / "cpuacct.usage" if cpuacct else None

    def enter(self) -> None:
        """Move the calling process in (run in the child between fork and exec)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def command_prefix(self) -> list[str]:
        """``["sh", "-c", ..., "box"]``: put in front of a command to run it inside the box."""
        join = "; ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)
        return ["sh", "-c", f'{join}; exec "$@"', "box"]

    def cpu_seconds(self) -> float:
        """CPU used by everything that ran in the box, from the kernel (needs ``cpuacct=True``)."""
        if self._usage is None:
            raise ValueError("this box was made without cpuacct: it has no CPU counter")
        return int(self._usage.read_text()) / 1e9

    def remove(self) -> None:
        """Remove the box and any groups nested in it, once their processes are gone. Safe to call twice."""
        for top in self.dirs:
            nested = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*nested, top]:
                for _ in range(100):  # the last process leaves once the kernel has reaped it
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)

    def __enter__(self) -> CgroupBox:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()
