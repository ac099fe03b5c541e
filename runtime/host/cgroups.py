"""cgroup discovery, container limits and per-worker child cgroups.

Hosts differ: pure cgroup v2 (``cpu.max``, ``memory.max``, ``memory.peak``), pure v1
(``cpu.cfs_quota_us``, ``memory.limit_in_bytes``, ``cpuacct.usage``, ``memory.max_usage_in_bytes``)
and hybrids (v1 controllers plus a v2 tree without controllers). Everything here is found from
``/proc/self/cgroup`` and ``/proc/self/mountinfo``; nothing assumes a layout.

Per-worker child cgroups (``WorkerCgroups``) give each worker an exact, resettable memory peak and an
exact CPU counter that does not depend on the worker's own word; a confined invocation's child cgroups
under its worker's (``CgroupSet``) bound and measure its whole process tree and let it be killed at once.
This module is the one place that reads or writes cgroup files: the pool, the sandbox, the limits and
the metrics all come here. When the hierarchy is not writable the pool falls back
to in-process probes, and ``WorkerCgroups.create`` returns the reason so that status output can say so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from msgspec import Struct

log = logging.getLogger("runtime.host.cgroups")

CgroupMode = Literal["v1", "v2", "hybrid", "none"]
_UNLIMITED = 1 << 62  # v1 reports "no limit" as a page-rounded 2**63-1
#: Super-block options of a v1 cgroup mount that are not controller names.
_NOT_CONTROLLERS = frozenset({"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode"})


class Mount(Struct, frozen=True):
    """One cgroup filesystem mount: which controllers, where, and which hierarchy path is its root."""

    mountpoint: str
    root: str
    controllers: tuple[str, ...]
    version: Literal[1, 2]


class CgroupInfo(Struct, frozen=True):
    """Where this process's cgroups live in the filesystem, per controller."""

    mode: CgroupMode
    #: controller name -> directory of this process's own cgroup ("unified" for the v2 tree).
    dirs: dict[str, str]
    #: controller name -> its mount point (limits are looked up from ``dirs`` up to here).
    mounts: dict[str, str]
    #: controllers enabled in the v2 tree at this process's cgroup (empty on v1).
    v2_controllers: tuple[str, ...] = ()

    def ancestors(self, controller: str) -> list[Path]:
        """This process's cgroup directory for ``controller`` and its parents up to the mount."""
        d, top = self.dir(controller), self.mounts.get(controller)
        if d is None or top is None:
            return []
        out = [d]
        while out[-1] != Path(top) and out[-1] != out[-1].parent:
            out.append(out[-1].parent)
        return out

    def dir(self, controller: str) -> Path | None:
        """The directory of this process's cgroup for ``controller``, if mounted."""
        d = self.dirs.get(controller)
        return Path(d) if d else None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Parse ``/proc/<pid>/cgroup`` into controller -> path (``"unified"`` for the ``0::`` line)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            out["unified"] = path
            continue
        for c in controllers.split(","):
            out[c.removeprefix("name=")] = path
    return out


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in ``/proc/<pid>/mountinfo``."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        fstype, _source, *opts = right.split()
        if fstype not in ("cgroup", "cgroup2") or len(fields) < 5:
            continue
        root, mountpoint = fields[3], fields[4]
        if fstype == "cgroup2":
            mounts.append(Mount(mountpoint, root, ("unified",), 2))
            continue
        super_opts = opts[0].split(",") if opts else []
        ctrls = tuple(o for o in super_opts if o not in _NOT_CONTROLLERS and "=" not in o)
        ctrls += tuple(o.removeprefix("name=") for o in super_opts if o.startswith("name="))
        mounts.append(Mount(mountpoint, root, ctrls, 1))
    return mounts


def discover(proc: Path = Path("/proc/self")) -> CgroupInfo:
    """Find this process's cgroup directories for every mounted controller."""
    try:
        paths = parse_proc_cgroup((proc / "cgroup").read_text())
        mounts = parse_mountinfo((proc / "mountinfo").read_text())
    except OSError:
        return CgroupInfo("none", {}, {})
    dirs: dict[str, str] = {}
    tops: dict[str, str] = {}
    for m in mounts:
        for c in m.controllers:
            path = paths.get(c)
            if path is None or c in dirs:
                continue
            # A container sees its own cgroup as the mount's root: strip that prefix.
            inside = m.root != "/" and (path == m.root or path.startswith(m.root + "/"))
            rel = path[len(m.root) :] if inside else path
            d = Path(m.mountpoint) / rel.lstrip("/")
            if d.is_dir():
                dirs[c] = str(d)
                tops[c] = m.mountpoint
    has_v1 = any(m.version == 1 for m in mounts if any(c in dirs for c in m.controllers))
    has_v2 = "unified" in dirs
    v2_ctrls: tuple[str, ...] = ()
    if has_v2:
        try:
            v2_ctrls = tuple((Path(dirs["unified"]) / "cgroup.controllers").read_text().split())
        except OSError:
            v2_ctrls = ()
    mode: CgroupMode = "hybrid" if has_v1 and has_v2 else "v1" if has_v1 else "v2" if has_v2 else "none"
    return CgroupInfo(mode, dirs, tops, v2_ctrls)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Found(Struct, frozen=True):
    """A number read from the cgroup files, and where it was found (for status output)."""

    value: float
    source: str


def cpu_quota(info: CgroupInfo) -> Found | None:
    """The CPU quota (in cores) of this process's cgroup or its tightest ancestor, None if unlimited."""
    best: Found | None = None
    for d in info.ancestors("cpu"):
        quota, period = _read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us")
        if quota is not None and period and quota > 0 and (best is None or quota / period < best.value):
            src = f"cgroup v1 cpu.cfs_quota_us={quota}/cpu.cfs_period_us={period} at {d}"
            best = Found(quota / period, src)
    for d in info.ancestors("unified"):
        try:
            q, p = (d / "cpu.max").read_text().split()
            if q != "max" and int(p) > 0 and (best is None or int(q) / int(p) < best.value):
                best = Found(int(q) / int(p), f"cgroup v2 cpu.max={q} {p} at {d}")
        except (OSError, ValueError):
            continue
    return best


def cpu_quota_cores(info: CgroupInfo) -> float | None:
    """The CPU quota of this process's cgroup (or its tightest ancestor) in cores, None if unlimited."""
    found = cpu_quota(info)
    return found.value if found else None


def memory_limit(info: CgroupInfo) -> Found | None:
    """The memory limit (bytes) of this process's cgroup or its tightest ancestor, None if unlimited."""
    best: Found | None = None
    for d in info.ancestors("memory"):
        v = _read_int(d / "memory.limit_in_bytes")
        if v is not None and v < _UNLIMITED and (best is None or v < best.value):
            best = Found(v, f"cgroup v1 memory.limit_in_bytes at {d}")
    for d in info.ancestors("unified"):
        v = _read_int(d / "memory.max")  # "max" does not parse: unlimited
        if v is not None and (best is None or v < best.value):
            best = Found(v, f"cgroup v2 memory.max at {d}")
    return best


def memory_limit_bytes(info: CgroupInfo) -> int | None:
    """The memory limit of this process's cgroup (or its tightest ancestor), None if unlimited."""
    found = memory_limit(info)
    return int(found.value) if found else None


def cpu_capacity_found(info: CgroupInfo) -> Found:
    """Cores this process may use, and why: the cgroup quota, capped by the CPUs it may run on."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(info)
    if quota is not None and quota.value <= cpus:
        return quota
    beyond = f" (below the cgroup quota of {quota.value:g})" if quota else ""
    return Found(float(cpus), f"sched_getaffinity: {cpus} CPUs{beyond}")


def cpu_capacity(info: CgroupInfo) -> float:
    """Cores this process may use: the cgroup quota, capped by the CPUs it is allowed to run on."""
    return cpu_capacity_found(info).value


def cpu_usage(info: CgroupInfo) -> Found | None:
    """CPU-seconds used by this process's cgroup and everything below it (in a container: the
    container's), from the kernel: v1 ``cpuacct.usage``, else v2 ``cpu.stat`` ``usage_usec``."""
    return _first_counter(info, ("cpuacct", "cpuacct.usage"), ("unified", "cpu.stat"), read=read_cpu_seconds)


def memory_usage(info: CgroupInfo) -> Found | None:
    """Bytes of memory charged to this process's cgroup and below (page cache included, as ``docker
    stats`` counts it before its own adjustments): v1 ``memory.usage_in_bytes``, v2 ``memory.current``."""
    return _first_counter(info, ("memory", "memory.usage_in_bytes"), ("unified", "memory.current"), read=_read_int)


def _first_counter(
    info: CgroupInfo, v1: tuple[str, str], v2: tuple[str, str], read: Callable[[Path], float | None]
) -> Found | None:
    """The v1 counter file ``(controller, name)`` of this process's cgroup if it reads, else the v2 one."""
    for version, (controller, name) in ((1, v1), (2, v2)):
        d = info.dir(controller)
        if d is not None and (v := read(d / name)) is not None:
            return Found(v, f"cgroup v{version} {name} at {d}")
    return None


class Throttling(Struct, frozen=True):
    """CFS bandwidth control of the cgroup that holds the CPU quota: enforcement periods that passed,
    periods in which the cgroup was throttled (it had used its quota and waited for the next period),
    and the time its tasks spent throttled in all. Counters since the cgroup was made."""

    periods: int
    throttled: int
    throttled_seconds: float
    source: str

    def share_since(self, before: Throttling | None) -> float | None:
        """Throttled periods over periods since ``before`` (None when no period passed or no ``before``)."""
        if before is None or self.periods <= before.periods:
            return None
        return (self.throttled - before.throttled) / (self.periods - before.periods)


def throttling(info: CgroupInfo) -> Throttling | None:
    """The throttling counters (``cpu.stat``) of this process's cgroup or of the nearest ancestor with a
    CPU quota (the one the kernel throttles at): v1 ``throttled_time`` (ns), v2 ``throttled_usec``.
    None without a ``cpu.stat`` to read (no v1 cpu controller and no v2 tree)."""
    for controller, v1 in (("cpu", True), ("unified", False)):
        dirs = info.ancestors(controller)
        if not dirs:
            continue
        at = next((d for d in dirs if _has_quota(d, v1)), dirs[0])
        try:
            text = (at / "cpu.stat").read_text()
        except OSError:
            continue
        if "nr_periods" not in text:
            continue
        spent = flat_field(text, "throttled_time") / 1e9 if v1 else flat_field(text, "throttled_usec") / 1e6
        return Throttling(
            flat_field(text, "nr_periods"),
            flat_field(text, "nr_throttled"),
            spent,
            f"cgroup v{1 if v1 else 2} cpu.stat at {at}",
        )
    return None


def _has_quota(d: Path, v1: bool) -> bool:
    if v1:
        quota = _read_int(d / "cpu.cfs_quota_us")
        return quota is not None and quota > 0
    try:
        return (d / "cpu.max").read_text().split()[0] != "max"
    except (OSError, IndexError):
        return False


class Pressure(Struct, frozen=True):
    """Pressure stall information for one resource: the share of the last 10 s in which some (``some``)
    or all (``full``) runnable tasks were stalled waiting for it, in percent, and the stalled time in all."""

    some_avg10: float
    full_avg10: float
    some_total_seconds: float


def pressure(info: CgroupInfo, resources: tuple[str, ...] = ("cpu", "memory", "io")) -> tuple[dict[str, Pressure], str]:
    """PSI for ``resources`` where the kernel has it: the v2 cgroup's ``<resource>.pressure`` (the
    container's own), else ``/proc/pressure/<resource>`` (the whole host's); and which it was ("" if none)."""
    places: list[tuple[Path, str]] = []
    if (d := info.dir("unified")) is not None:
        places.append((d, "{}.pressure"))
    places.append((Path("/proc/pressure"), "{}"))
    for base, pattern in places:
        found: dict[str, Pressure] = {}
        for r in resources:
            try:
                text = (base / pattern.format(r)).read_text()
            except OSError:
                continue
            if (p := _parse_pressure(text)) is not None:
                found[r] = p
        if found:
            where = f"cgroup v2 *.pressure at {base}" if pattern != "{}" else "/proc/pressure (the whole host)"
            return found, where
    return {}, ""


def _parse_pressure(text: str) -> Pressure | None:
    """``some avg10=1.00 avg60=… total=N`` and (not for host-wide cpu on old kernels) a ``full`` line."""
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        rows[kind] = dict(f.split("=", 1) for f in fields if "=" in f)
    some, full = rows.get("some"), rows.get("full", {})
    if some is None or "avg10" not in some:
        return None
    return Pressure(float(some["avg10"]), float(full.get("avg10", 0.0)), int(some.get("total", 0)) / 1e6)


def read_cpu_seconds(path: Path) -> float | None:
    """CPU-seconds from a v1 ``cpuacct.usage`` (ns) or a v2 ``cpu.stat`` (``usage_usec``) file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return cpu_seconds_in(str(path), text)


class WorkerCgroups(Struct):
    """The child cgroups of one worker: an exact memory peak and an exact CPU counter.

    ``memory`` and ``cpu`` name the version of each probe (or None when it could not be made).
    """

    dirs: list[str]
    memory_dir: str | None
    memory_version: Literal[1, 2] | None
    cpu_file: str | None
    #: Controller (``memory``, ``cpuacct``, ``unified``) -> this worker's directory in it.
    controllers: dict[str, str] = {}

    @classmethod
    def create(cls, info: CgroupInfo, name: str) -> tuple[WorkerCgroups | None, str]:
        """Make the child cgroups ``name`` under this process's own; return them and a status line."""
        made: list[str] = []
        by_controller: dict[str, str] = {}
        mem_dir: str | None = None
        mem_ver: Literal[1, 2] | None = None
        cpu_file: str | None = None
        notes: list[str] = []

        def mk(controller: str) -> Path | None:
            parent = info.dir(controller)
            if parent is None:
                return None
            d = parent / name
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                notes.append(f"{parent}: {exc.strerror}")
                return None
            made.append(str(d))
            by_controller[controller] = str(d)
            return d

        if (d := mk("memory")) is not None:
            mem_dir, mem_ver = str(d), 1
        if (d := mk("cpuacct")) is not None:
            cpu_file = str(d / "cpuacct.usage")
        # A v2 child always has cpu.stat; memory.peak only with the memory controller delegated.
        needs_v2 = info.dir("unified") is not None and (mem_dir is None or cpu_file is None)
        if needs_v2 and (d := mk("unified")) is not None:
            if cpu_file is None:
                cpu_file = str(d / "cpu.stat")
            if mem_dir is None and (d / "memory.peak").exists():
                mem_dir, mem_ver = str(d), 2
        if not made:
            return None, "no writable cgroup hierarchy (" + "; ".join(notes or ["none mounted"]) + ")"
        cg = cls(made, mem_dir, mem_ver, cpu_file, by_controller)
        mem = f"memory cgroup v{mem_ver}" if mem_ver else "memory via /proc (no memory cgroup)"
        cpu = "cpuacct.usage" if cpu_file and cpu_file.endswith("usage") else "cpu.stat"
        return cg, f"per-worker cgroups: {mem}, cpu from {cpu if cpu_file else '/proc'}"

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a worker writes its pid into to join."""
        return [str(Path(d) / "cgroup.procs") for d in self.dirs]

    def cpu_seconds(self) -> float | None:
        """CPU used by every process that ever ran in the cgroup, from the kernel."""
        return None if self.cpu_file is None else read_cpu_seconds(Path(self.cpu_file))

    def memory_peak_bytes(self) -> int | None:
        """The memory high-water mark since the worker last reset it (v1 and v2)."""
        if self.memory_dir is None:
            return None
        f = "memory.max_usage_in_bytes" if self.memory_version == 1 else "memory.peak"
        return _read_int(Path(self.memory_dir) / f)

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for going over its memory limit."""
        if self.memory_dir is None:
            return 0
        f = "memory.oom_control" if self.memory_version == 1 else "memory.events"
        try:
            return flat_field((Path(self.memory_dir) / f).read_text(), "oom_kill")
        except OSError:
            return 0

    def remove(self) -> None:
        """Remove the (now empty) child cgroups, and any nested ones a killed worker left behind
        (a sandbox's), killing what still runs in those. Safe to call twice."""
        for d in self.dirs:
            _remove_nested(Path(d))
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                # A cgroup directory cannot be removed while a process is still in it; rmtree
                # would fail the same way, so leave it for the next start-up's sweep.
                continue


class CgroupSet:
    """Child cgroups of one process tree (a confined invocation's), one per controller, under a parent
    per controller (its worker's own).

    v1 controllers by name (``memory``, ``cpuacct``, ``pids``, others for membership only) and the v2
    tree as ``unified``, whose files are used when present: ``cpu.stat`` always, ``memory.max``,
    ``memory.peak`` and ``pids.max`` only where the parent delegates those controllers.
    """

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs

    @classmethod
    def create(
        cls, parents: Mapping[str, str], name: str, *, memory_bytes: int | None = None, pids_max: int | None = None
    ) -> CgroupSet:
        """Make them (``name`` under each parent) with the limits given (no swap beyond the memory limit);
        on any failure remove what was made and raise OSError."""
        cg = cls({})
        try:
            for controller, parent in parents.items():
                d = os.path.join(parent, name)
                os.mkdir(d)
                cg.dirs[controller] = d
            mem, pids, v2 = cg.dirs.get("memory"), cg.dirs.get("pids"), cg.dirs.get("unified")
            if memory_bytes is not None:
                if mem is not None:
                    write_setting(mem, "memory.limit_in_bytes", memory_bytes)
                    write_setting(mem, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                if v2 is not None:
                    write_setting(v2, "memory.max", memory_bytes, optional=True)
                    write_setting(v2, "memory.swap.max", 0, optional=True)
            if pids_max is not None:
                if pids is not None:
                    write_setting(pids, "pids.max", pids_max)
                if v2 is not None:
                    write_setting(v2, "pids.max", pids_max, optional=True)
        except OSError:
            cg.remove(deadline=time.monotonic())
            raise
        return cg

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        """Processes in the cgroups now."""
        out: set[int] = set()
        for f in self.procs_files():
            with contextlib.suppress(OSError):
                out.update(int(x) for x in Path(f).read_text().split())
        return out

    def _read(self, controller: str, name: str) -> str | None:
        d = self.dirs.get(controller)
        if d is None:
            return None
        try:
            return Path(d, name).read_text()
        except OSError:
            return None

    def cpu_seconds(self) -> float | None:
        """CPU of every process that ever ran in the cgroup (exact: the scheduler's count)."""
        for controller, name in (("cpuacct", "cpuacct.usage"), ("unified", "cpu.stat")):
            if (text := self._read(controller, name)) is not None:
                return cpu_seconds_in(name, text)
        return None

    def measures_memory(self) -> bool:
        """Whether these cgroups bound and measure the tree's memory (a memory controller is there)."""
        return "memory" in self.dirs or (
            "unified" in self.dirs and os.path.exists(os.path.join(self.dirs["unified"], "memory.peak"))
        )

    def peak_bytes(self) -> int | None:
        """The high-water mark of the whole tree's memory (a fresh cgroup: no reset needed)."""
        text = self._read("memory", "memory.max_usage_in_bytes") or self._read("unified", "memory.peak")
        return int(text) if text is not None else None

    def oom_kills(self) -> int:
        """Processes the kernel killed in the cgroup for going over its memory limit."""
        text = self._read("memory", "memory.oom_control") or self._read("unified", "memory.events")
        return flat_field(text, "oom_kill") if text is not None else 0

    def kill(self, spare: int = 0) -> int:
        """SIGKILL every process in the cgroups but ``spare``; how many were signalled.

        A pid read from ``cgroup.procs`` may be reused before the kill: each is opened as a pidfd
        first and signalled only if it is still listed after that, which pins it to a member.
        """
        fds: dict[int, int] = {}
        try:
            for pid in self.pids() - {spare}:
                with contextlib.suppress(ProcessLookupError):
                    fds[pid] = os.pidfd_open(pid)
            members = self.pids()
            n = 0
            for pid, fd in fds.items():
                if pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        n += 1
            return n
        finally:
            for fd in fds.values():
                os.close(fd)

    def remove(self, deadline: float) -> bool:
        """Kill what is left and remove the cgroups, retrying until ``deadline``; True when gone."""
        while True:
            self.kill()
            if (v2 := self.dirs.get("unified")) is not None:
                # v2 kills the whole cgroup atomically (Linux >= 5.14): nothing forks past it.
                with contextlib.suppress(OSError):
                    write_setting(v2, "cgroup.kill", 1, optional=True)
            for c, d in list(self.dirs.items()):
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # still busy: dying processes leave it asynchronously
                del self.dirs[c]
            if not self.dirs:
                return True
            if time.monotonic() >= deadline:
                log.warning("cgroups %s not removed: processes %s remain", sorted(self.dirs.values()), self.pids())
                return False
            time.sleep(0.002)


def write_setting(directory: str, name: str, value: int, optional: bool = False) -> None:
    """Write a cgroup setting; an ``optional`` one is skipped when the kernel does not offer it."""
    path = os.path.join(directory, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(str(value))


def flat_field(text: str, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``cpu.stat``, ``memory.events`` …); 0 if absent."""
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


def cpu_seconds_in(cpu_file: str, text: str) -> float | None:
    """The CPU seconds in the text of a worker's ``cpuacct.usage`` (v1) or ``cpu.stat`` (v2)."""
    if cpu_file.endswith("cpuacct.usage"):
        return int(text) / 1e9
    return flat_field(text, "usage_usec") / 1e6 if "usage_usec" in text else None


def _remove_nested(d: Path) -> None:
    """Kill the processes of every cgroup nested under ``d`` and remove those cgroups, deepest first."""
    nested = sorted((p for p in d.glob("**/") if p != d), key=lambda p: -len(p.parts)) if d.is_dir() else []
    for sub in nested:
        for pid in processes_in(str(sub)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for sub in nested:
        for _ in range(50):  # killed processes leave the cgroup once the kernel has reaped them
            try:
                os.rmdir(sub)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def child_name(owner_pid: int, worker: int, generation: int) -> str:
    """The name of a worker's child cgroup; the owner pid lets ``sweep_stale`` spot orphans."""
    return f"{CHILD_PREFIX}{owner_pid}-w{worker}-{generation}"


CHILD_PREFIX = "aeco-"


def sweep_stale(info: CgroupInfo) -> int:
    """Remove empty worker cgroups whose supervisor is gone (it was killed). Returns how many."""
    removed = 0
    for c in ("memory", "cpuacct", "unified"):
        parent = info.dir(c)
        if parent is None:
            continue
        for d in parent.glob(CHILD_PREFIX + "*"):
            owner = d.name.removeprefix(CHILD_PREFIX).split("-")[0]
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            _remove_nested(d)
            try:
                os.rmdir(d)
                removed += 1
            except OSError:
                pass
    return removed


def processes_in(cgroup_dir: str) -> list[int]:
    """Pids still in a cgroup (used to make sure no worker is left behind)."""
    try:
        return [int(x) for x in (Path(cgroup_dir) / "cgroup.procs").read_text().split()]
    except OSError:
        return []


__all__ = [
    "CgroupInfo",
    "CgroupSet",
    "Found",
    "Pressure",
    "Throttling",
    "WorkerCgroups",
    "child_name",
    "cpu_capacity",
    "cpu_capacity_found",
    "cpu_quota",
    "cpu_quota_cores",
    "cpu_seconds_in",
    "cpu_usage",
    "discover",
    "flat_field",
    "memory_limit",
    "memory_limit_bytes",
    "memory_usage",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "pressure",
    "processes_in",
    "read_cpu_seconds",
    "sweep_stale",
    "throttling",
    "write_setting",
]
