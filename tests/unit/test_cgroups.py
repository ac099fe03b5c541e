"""Unit tests for ``runtime.host.cgroups``: parsing, discovery over a fake /proc, and limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.host.cgroups import (
    CgroupInfo,
    Mount,
    cpu_capacity,
    cpu_quota_cores,
    discover,
    memory_limit_bytes,
    parse_mountinfo,
    parse_proc_cgroup,
    pressure,
    throttling,
)

AFFINITY = len(os.sched_getaffinity(0))
V1_UNLIMITED_MEMORY = "9223372036854771712"

# --- realistic samples ---------------------------------------------------------------------------

# A hybrid host (this sandbox): v1 controllers, each on its own hierarchy, plus an empty cgroup2 tree.
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/7d7c6a187362b6b5ebd2962426cbb24c
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
HYBRID_MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A pure v1 host seen from inside a Docker container without a cgroup namespace (CentOS 7 style):
# cpu and cpuacct co-mounted, the container's cgroup is the root of every mount.
V1_PROC_CGROUP = """\
11:cpuset:/docker/0123abcd
10:memory:/docker/0123abcd
9:devices:/docker/0123abcd
8:pids:/docker/0123abcd
7:cpu,cpuacct:/docker/0123abcd
6:net_cls,net_prio:/docker/0123abcd
5:blkio:/docker/0123abcd
4:hugetlb:/docker/0123abcd
3:freezer:/docker/0123abcd
2:perf_event:/docker/0123abcd
1:name=systemd:/docker/0123abcd
"""
V1_MOUNTINFO = """\
600 580 0:50 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
605 600 0:54 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755
606 605 0:26 /docker/0123abcd /sys/fs/cgroup/systemd ro,nosuid,nodev,noexec,relatime master:9 - \
cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
607 605 0:29 /docker/0123abcd /sys/fs/cgroup/cpu,cpuacct ro,nosuid,nodev,noexec,relatime master:13 - \
cgroup cgroup rw,cpu,cpuacct
608 605 0:30 /docker/0123abcd /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime master:14 - \
cgroup cgroup rw,memory
609 605 0:31 /docker/0123abcd /sys/fs/cgroup/net_cls,net_prio ro,nosuid,nodev,noexec,relatime master:15 - \
cgroup cgroup rw,net_cls,net_prio
610 605 0:32 /docker/0123abcd /sys/fs/cgroup/cpuset ro,nosuid,nodev,noexec,relatime master:16 - \
cgroup cgroup rw,cpuset
"""

# A pure v2 host (systemd, unified hierarchy).
V2_PROC_CGROUP = "0::/user.slice/user-1000.slice/session-1.scope\n"
V2_MOUNTINFO = """\
23 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
24 23 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""


def test_parse_proc_cgroup_hybrid() -> None:
    paths = parse_proc_cgroup(HYBRID_PROC_CGROUP)
    assert paths["memory"] == "/process_api/7d7c6a187362b6b5ebd2962426cbb24c"
    assert paths["cpu"] == "/"
    assert paths["cpuacct"] == "/"
    assert paths["systemd"] == "/"  # name= is stripped
    assert paths["unified"] == "/"
    assert "name=systemd" not in paths
    assert len(paths) == 10


def test_parse_proc_cgroup_v1_comounted() -> None:
    paths = parse_proc_cgroup(V1_PROC_CGROUP)
    for c in ("cpu", "cpuacct", "net_cls", "net_prio", "memory", "systemd", "perf_event"):
        assert paths[c] == "/docker/0123abcd"
    assert "unified" not in paths


def test_parse_proc_cgroup_v2() -> None:
    assert parse_proc_cgroup(V2_PROC_CGROUP) == {"unified": "/user.slice/user-1000.slice/session-1.scope"}
    assert parse_proc_cgroup("0::/user.slice/session-1.scope") == {"unified": "/user.slice/session-1.scope"}


def test_parse_proc_cgroup_path_with_colon_and_blank_lines() -> None:
    assert parse_proc_cgroup("\n0::/a:b/c\n\n") == {"unified": "/a:b/c"}


def test_parse_mountinfo_hybrid() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    # ext4 and tmpfs are not cgroup mounts
    assert len(mounts) == 10
    by_point = {m.mountpoint: m for m in mounts}
    assert by_point["/sys/fs/cgroup/cpu"] == Mount("/sys/fs/cgroup/cpu", "/", ("cpu",), 1)
    assert by_point["/sys/fs/cgroup/memory"].controllers == ("memory",)
    assert by_point["/sys/fs/cgroup/systemd"].controllers == ("systemd",)
    assert by_point["/sys/fs/cgroup/unified"] == Mount("/sys/fs/cgroup/unified", "/", ("unified",), 2)
    assert [m.version for m in mounts].count(2) == 1


def test_parse_mountinfo_v1_container() -> None:
    mounts = parse_mountinfo(V1_MOUNTINFO)
    assert len(mounts) == 5
    by_point = {m.mountpoint: m for m in mounts}
    cpu = by_point["/sys/fs/cgroup/cpu,cpuacct"]
    assert cpu.root == "/docker/0123abcd"
    assert cpu.controllers == ("cpu", "cpuacct")
    assert cpu.version == 1
    assert by_point["/sys/fs/cgroup/net_cls,net_prio"].controllers == ("net_cls", "net_prio")
    systemd = by_point["/sys/fs/cgroup/systemd"]
    assert "systemd" in systemd.controllers
    assert not any("=" in c for c in systemd.controllers)  # release_agent=... is an option
    assert all(m.version == 1 for m in mounts)


def test_parse_mountinfo_mount_options_are_not_controllers() -> None:
    systemd = next(m for m in parse_mountinfo(V1_MOUNTINFO) if m.mountpoint.endswith("systemd"))
    assert systemd.controllers == ("systemd",)


def test_parse_mountinfo_v2() -> None:
    assert parse_mountinfo(V2_MOUNTINFO) == [Mount("/sys/fs/cgroup", "/", ("unified",), 2)]


def test_parse_mountinfo_ignores_lines_without_separator() -> None:
    assert parse_mountinfo("garbage line\n\n") == []


# --- discover() over a fake /proc ----------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def limits_of(info: CgroupInfo) -> tuple[object, object, object]:
    """What discovery finds: the CPU quota in cores, the memory limit in bytes (None: no limit), and the
    CPU capacity (the quota, within the CPUs this process may use). Objects, to be compared with a tuple
    that may hold ``pytest.approx`` values."""
    return cpu_quota_cores(info), memory_limit_bytes(info), cpu_capacity(info)


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    write(proc / "cgroup", cgroup)
    write(proc / "mountinfo", mountinfo)
    return proc


def v1_line(n: int, root: str, point: Path, opts: str) -> str:
    return f"{n} 1 0:{n} {root} {point} rw,nosuid,nodev,noexec,relatime shared:{n} - cgroup cgroup {opts}\n"


def v2_line(n: int, root: str, point: Path) -> str:
    return f"{n} 1 0:{n} {root} {point} rw,nosuid,nodev,noexec,relatime shared:{n} - cgroup2 cgroup2 rw\n"


def make_v1(tmp_path: Path, path: str = "/a/b", root: str = "/") -> tuple[CgroupInfo, Path, Path]:
    """A v1 host with cpu,cpuacct and memory mounted under tmp_path; the process is at ``path``."""
    cpu, mem = tmp_path / "cg" / "cpu,cpuacct", tmp_path / "cg" / "memory"
    rel = path[len(root) :] if root != "/" else path
    (cpu / rel.lstrip("/")).mkdir(parents=True)
    (mem / rel.lstrip("/")).mkdir(parents=True)
    proc = fake_proc(
        tmp_path,
        f"4:memory:{path}\n3:cpu,cpuacct:{path}\n1:name=systemd:/\n",
        "22 1 8:1 / / rw - ext4 /dev/vda rw\n"
        + v1_line(30, root, cpu, "rw,cpu,cpuacct")
        + v1_line(31, root, mem, "rw,memory"),
    )
    return discover(proc), cpu, mem


def test_discover_v1_dirs_and_mode(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    assert info.mode == "v1"
    assert info.dirs == {"cpu": str(cpu / "a/b"), "cpuacct": str(cpu / "a/b"), "memory": str(mem / "a/b")}
    assert info.mounts["cpu"] == str(cpu)
    assert info.mounts["memory"] == str(mem)
    assert info.v2_controllers == ()
    assert info.ancestors("memory") == [mem / "a/b", mem / "a", mem]
    assert info.ancestors("unified") == []


def test_discover_v1_limits(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    write(cpu / "a/b/cpu.cfs_quota_us", "150000\n")
    write(cpu / "a/b/cpu.cfs_period_us", "100000\n")
    write(mem / "a/b/memory.limit_in_bytes", f"{512 << 20}\n")
    assert limits_of(info) == (pytest.approx(1.5), 512 << 20, pytest.approx(min(1.5, AFFINITY)))


def test_discover_v1_unlimited(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    for d in (cpu / "a/b", cpu / "a", cpu):
        write(d / "cpu.cfs_quota_us", "-1\n")
        write(d / "cpu.cfs_period_us", "100000\n")
    for d in (mem / "a/b", mem / "a", mem):
        write(d / "memory.limit_in_bytes", V1_UNLIMITED_MEMORY + "\n")
    assert limits_of(info) == (None, None, AFFINITY)


def test_discover_v1_no_limit_files_is_unlimited(tmp_path: Path) -> None:
    info, _, _ = make_v1(tmp_path)
    assert limits_of(info) == (None, None, AFFINITY)


def test_discover_v1_tightest_ancestor_wins(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    # the process's own cgroup is loose, its parent is tight, the grandparent (mount root) in between
    for d, quota in ((cpu / "a/b", "400000"), (cpu / "a", "50000"), (cpu, "200000")):
        write(d / "cpu.cfs_quota_us", quota)
        write(d / "cpu.cfs_period_us", "100000")
    for d, limit in ((mem / "a/b", V1_UNLIMITED_MEMORY), (mem / "a", str(256 << 20)), (mem, str(1 << 30))):
        write(d / "memory.limit_in_bytes", limit)
    assert limits_of(info) == (pytest.approx(0.5), 256 << 20, pytest.approx(0.5))


def test_discover_limits_above_the_mount_are_ignored(tmp_path: Path) -> None:
    info, cpu, mem = make_v1(tmp_path)
    # files in the directory that *contains* the mount points are not part of the hierarchy
    write(cpu.parent / "cpu.cfs_quota_us", "10000")
    write(cpu.parent / "cpu.cfs_period_us", "100000")
    write(mem.parent / "memory.limit_in_bytes", "4096")
    assert cpu_quota_cores(info) is None
    assert memory_limit_bytes(info) is None


def test_cpu_capacity_capped_by_affinity(tmp_path: Path) -> None:
    info, cpu, _ = make_v1(tmp_path)
    write(cpu / "a/b/cpu.cfs_quota_us", str(100000 * (AFFINITY + 8)))
    write(cpu / "a/b/cpu.cfs_period_us", "100000")
    assert cpu_quota_cores(info) == pytest.approx(AFFINITY + 8)
    assert cpu_capacity(info) == AFFINITY


def test_discover_container_root_maps_to_mount_point(tmp_path: Path) -> None:
    """Without a cgroup namespace a container's mount root is its own cgroup: that is the mount point."""
    cpu, mem = tmp_path / "cg" / "cpu,cpuacct", tmp_path / "cg" / "memory"
    cpu.mkdir(parents=True)
    mem.mkdir(parents=True)
    path = "/libpod_parent/abc"
    proc = fake_proc(
        tmp_path,
        f"4:memory:{path}\n3:cpu,cpuacct:{path}\n",
        v1_line(30, path, cpu, "rw,cpu,cpuacct") + v1_line(31, path, mem, "rw,memory"),
    )
    write(cpu / "cpu.cfs_quota_us", "250000")
    write(cpu / "cpu.cfs_period_us", "100000")
    write(mem / "memory.limit_in_bytes", str(3 << 30))
    info = discover(proc)
    assert info.mode == "v1"
    assert info.dirs["cpu"] == str(cpu)
    assert info.dirs["memory"] == str(mem)
    assert info.ancestors("cpu") == [cpu]
    assert cpu_quota_cores(info) == pytest.approx(2.5)
    assert memory_limit_bytes(info) == 3 << 30


def test_discover_container_subcgroup_below_mount_root(tmp_path: Path) -> None:
    info, cpu, _ = make_v1(tmp_path, path="/libpod_parent/abc/inner", root="/libpod_parent/abc")
    assert info.dirs["cpu"] == str(cpu / "inner")
    assert info.ancestors("cpu") == [cpu / "inner", cpu]


def test_discover_mount_root_prefix_is_a_path_prefix(tmp_path: Path) -> None:
    mem = tmp_path / "cg" / "memory"
    (mem / "def").mkdir(parents=True)  # a directory that the buggy mapping would land in
    proc = fake_proc(tmp_path, "4:memory:/docker/abcdef\n", v1_line(31, "/docker/abc", mem, "rw,memory"))
    info = discover(proc)
    # /docker/abcdef is not under /docker/abc: it cannot be located below this mount
    assert info.dirs.get("memory") != str(mem / "def")


def test_discover_missing_dir_is_skipped(tmp_path: Path) -> None:
    cpu = tmp_path / "cg" / "cpu"
    cpu.mkdir(parents=True)
    proc = fake_proc(tmp_path, "1:cpu:/not/there\n", v1_line(30, "/", cpu, "rw,cpu"))
    info = discover(proc)
    assert info.mode == "none"
    assert info.dirs == {}
    assert cpu_quota_cores(info) is None


def test_discover_no_proc_files(tmp_path: Path) -> None:
    info = discover(tmp_path / "empty")
    assert info == CgroupInfo("none", {}, {})
    assert memory_limit_bytes(info) is None
    assert cpu_capacity(info) == AFFINITY


def make_v2(tmp_path: Path) -> tuple[CgroupInfo, Path]:
    root = tmp_path / "cg2"
    scope = root / "user.slice" / "session-1.scope"
    scope.mkdir(parents=True)
    write(scope / "cgroup.controllers", "cpuset cpu io memory pids\n")
    proc = fake_proc(tmp_path, "0::/user.slice/session-1.scope\n", v2_line(30, "/", root))
    return discover(proc), root


def test_discover_v2(tmp_path: Path) -> None:
    info, root = make_v2(tmp_path)
    assert info.mode == "v2"
    assert info.dirs == {"unified": str(root / "user.slice/session-1.scope")}
    assert info.mounts == {"unified": str(root)}
    assert info.v2_controllers == ("cpuset", "cpu", "io", "memory", "pids")
    assert info.ancestors("unified") == [root / "user.slice/session-1.scope", root / "user.slice", root]


def test_discover_v2_limits_and_tightest_ancestor(tmp_path: Path) -> None:
    info, root = make_v2(tmp_path)
    scope, slice_ = root / "user.slice/session-1.scope", root / "user.slice"
    write(scope / "cpu.max", "max 100000\n")
    write(slice_ / "cpu.max", "50000 100000\n")
    write(scope / "memory.max", "max\n")
    write(slice_ / "memory.max", f"{1 << 30}\n")
    assert limits_of(info) == (pytest.approx(0.5), 1 << 30, pytest.approx(min(0.5, AFFINITY)))
    # now the scope itself is tighter
    write(scope / "cpu.max", "25000 100000\n")
    write(scope / "memory.max", f"{64 << 20}\n")
    assert cpu_quota_cores(info) == pytest.approx(0.25)
    assert memory_limit_bytes(info) == 64 << 20


def test_discover_v2_unlimited(tmp_path: Path) -> None:
    info, root = make_v2(tmp_path)
    for d in (root / "user.slice/session-1.scope", root / "user.slice"):
        write(d / "cpu.max", "max 100000\n")
        write(d / "memory.max", "max\n")
    assert limits_of(info) == (None, None, AFFINITY)


def test_discover_v2_container_root(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    write(root / "cpu.max", "200000 100000\n")
    write(root / "memory.max", f"{2 << 30}\n")
    proc = fake_proc(tmp_path, "0::/libpod_parent/abc\n", v2_line(30, "/libpod_parent/abc", root))
    info = discover(proc)
    assert info.mode == "v2"
    assert info.dirs == {"unified": str(root)}
    assert cpu_quota_cores(info) == pytest.approx(2.0)
    assert memory_limit_bytes(info) == 2 << 30


def test_discover_hybrid(tmp_path: Path) -> None:
    cpu, mem, uni = tmp_path / "cg" / "cpu", tmp_path / "cg" / "memory", tmp_path / "cg" / "unified"
    (mem / "job").mkdir(parents=True)
    cpu.mkdir(parents=True)
    uni.mkdir(parents=True)
    write(uni / "cgroup.controllers", "")  # hybrid: no controllers in the v2 tree
    write(mem / "job" / "memory.limit_in_bytes", str(100 << 20))
    write(mem / "memory.limit_in_bytes", V1_UNLIMITED_MEMORY)
    write(cpu / "cpu.cfs_quota_us", "-1")
    write(cpu / "cpu.cfs_period_us", "100000")
    proc = fake_proc(
        tmp_path,
        "9:name=systemd:/\n4:memory:/job\n1:cpu:/\n0::/\n",
        v1_line(32, "/", cpu, "rw,cpu") + v1_line(35, "/", mem, "rw,memory") + v2_line(41, "/", uni),
    )
    info = discover(proc)
    assert info.mode == "hybrid"
    assert info.dirs == {"cpu": str(cpu), "memory": str(mem / "job"), "unified": str(uni)}
    assert info.v2_controllers == ()
    assert memory_limit_bytes(info) == 100 << 20
    assert cpu_quota_cores(info) is None


# --- the real host -------------------------------------------------------------------------------


def test_throttling_v1_is_read_where_the_quota_is(tmp_path: Path) -> None:
    info, cpu, _ = make_v1(tmp_path)
    write(cpu / "a/b/cpu.stat", "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n")
    write(cpu / "a/b/cpu.cfs_quota_us", "-1\n")
    write(cpu / "a/cpu.cfs_quota_us", "50000\n")
    write(cpu / "a/cpu.stat", "nr_periods 120\nnr_throttled 30\nthrottled_time 2500000000\n")
    thr = throttling(info)
    assert thr is not None
    assert (thr.periods, thr.throttled) == (120, 30) and thr.throttled_seconds == pytest.approx(2.5)
    assert thr.source == f"cgroup v1 cpu.stat at {cpu / 'a'}"
    later = thr.__class__(220, 80, 4.0, thr.source)
    assert later.share_since(thr) == pytest.approx(0.5)
    assert thr.share_since(later) is None and later.share_since(None) is None
    # No quota anywhere: the process's own cgroup.
    write(cpu / "a/cpu.cfs_quota_us", "-1\n")
    own = throttling(info)
    assert own is not None and own.periods == 0 and own.source.endswith("a/b")


def test_throttling_v2_and_pressure_of_the_cgroup(tmp_path: Path) -> None:
    info, root = make_v2(tmp_path)
    scope = root / "user.slice/session-1.scope"
    write(scope / "cpu.max", "50000 100000\n")
    write(scope / "cpu.stat", "usage_usec 9\nnr_periods 10\nnr_throttled 4\nthrottled_usec 1500000\n")
    thr = throttling(info)
    assert thr is not None and (thr.periods, thr.throttled, thr.throttled_seconds) == (10, 4, 1.5)
    write(
        scope / "memory.pressure",
        "some avg10=12.50 avg60=1.00 avg300=0.10 total=2000000\nfull avg10=3.25 avg60=0 avg300=0 total=9\n",
    )
    write(scope / "cpu.pressure", "some avg10=0.75 avg60=0.00 avg300=0.00 total=10\n")
    found, source = pressure(info)
    assert source == f"cgroup v2 *.pressure at {scope}"
    assert found["memory"].some_avg10 == 12.5 and found["memory"].full_avg10 == 3.25
    assert found["memory"].some_total_seconds == 2.0
    assert found["cpu"].full_avg10 == 0.0  # no full line (host-wide cpu on older kernels)
    assert "io" not in found or source.startswith("/proc")


def test_real_host() -> None:
    info = discover()
    assert info.mode in {"v1", "v2", "hybrid", "none"}
    for c, d in info.dirs.items():
        assert Path(d).is_dir(), c
        assert Path(d).is_relative_to(info.mounts[c])
    cap = cpu_capacity(info)
    assert 0 < cap <= (os.cpu_count() or 1)
    limit = memory_limit_bytes(info)
    assert limit is None or limit > 0
