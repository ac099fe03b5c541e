"""Confined code: the round trip of a trivial invocation, against a bare fork+exec of Python and bubblewrap.

Every system runs the same interpreter with the same flags (``python -I -S``) and hands back the same
one-line result; each is timed from the caller's side, one invocation at a time:

- ``fork-exec-python``: ``subprocess.run([python, -I, -S, -c, ...])`` reading the result from a pipe:
  the floor for running code in a fresh process, with no confinement at all;
- ``bwrap``: the same command under Debian's bubblewrap with a comparable policy: every namespace
  (user, mount, PID, network, IPC, UTS, cgroup), a root of read-only binds built from the same plan
  as the sandbox's (``workers.rootfs``), ``/dev``, a ``/proc`` of its own, a private ``/tmp``, uid
  nobody, no capabilities, the same seccomp program (``--seccomp``). It does not set rlimits, join a
  fresh keyring, watch memory or speak a protocol;
- ``confined``: ``workers.sandbox.run_confined`` from this process without a cgroup (every layer on:
  the outer's memory watch stands in for the cgroup);
- ``confined-cgroup``: the same with per-invocation cgroups (root only);
- ``confined-pool``: an ``Invoke`` task through a one-worker pool, supervisor -> worker -> sandbox ->
  result -> supervisor: what an agent's ``invoke_artifact`` costs (as root the worker has cgroups).

The systems take turns (a batch of each per round) so that a loaded machine's drift spreads over all
of them; the ratios compare medians measured in the same run. The target: ``confined-pool`` within
2× of ``fork-exec-python`` with every layer on. CPU per round trip is the kernel's count for the
process tree (``RUSAGE_CHILDREN``; the pool: what the worker charged).

bubblewrap is installed with apt-get when missing and this runs as root (``make bench`` does the
same); otherwise its system is skipped, and says why.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import Options, ReportHead, Skipped, host_info, publish, save_figure
from runtime.host import cgroups
from runtime.pool import WorkerPool
from runtime.protocol import Invoke, decode_invoke
from workers import rootfs, seccomp
from workers.sandbox import Limits, run_confined

FULL_S, QUICK_S = 30.0, 5.0
BATCH = 3  # invocations of one system before the next takes its turn
TARGET = 2.0
PYTHON = os.path.realpath(sys.executable)
#: What each system runs: the same work and the same answer ("1" on stdout, or as the result).
CODE = "print(1)"
BARE = "fork-exec-python"


class Entry(msgspec.Struct):
    """One system's round trips."""

    name: str
    describe: str
    n: int
    median_ms: float
    mean_ms: float
    p90_ms: float
    #: Mean CPU of the whole tree per round trip; None where the kernel's count cannot see the tree
    #: (bwrap's sandboxed process is reaped inside its PID namespace, its CPU lost to our wait4).
    cpu_ms: float | None


class Report(ReportHead):
    """The JSON file."""

    results: list[Entry]
    ratios: dict[str, float]
    target: str
    skipped: list[Skipped]


@dataclass
class System:
    """A system under test: ``start`` returns a one-invocation callable (returning its CPU seconds)
    and a cleanup; both run in the benchmark's thread."""

    name: str
    describe: str
    start: Callable[[Path], tuple[Callable[[], float], Callable[[], None]]]
    cpu_visible: bool = True
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


class Mismatch(Exception):
    """A system did not return the expected result."""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_checked(cmd: list[str], **kw: Any) -> float:
    before = _children_cpu()
    out = subprocess.run(cmd, capture_output=True, cwd="/", env={"LANG": "C.UTF-8"}, check=False, **kw)
    if out.returncode != 0 or out.stdout != b"1\n":
        raise Mismatch(f"{cmd[0]} exited {out.returncode}: {out.stdout[:200]!r} {out.stderr[-400:]!r}")
    return _children_cpu() - before


def _bare(tmp: Path) -> tuple[Callable[[], float], Callable[[], None]]:
    return (lambda: _run_checked([PYTHON, "-I", "-S", "-c", CODE])), lambda: None


def bwrap_args(plan: tuple[rootfs.Step, ...], seccomp_fd: int) -> list[str]:
    """bubblewrap's options for the sandbox's policy (see the module's doc for what differs)."""
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    args += ["--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    for step in plan:
        kind, path = step[0], step[1]
        if kind == "dir":
            args += ["--dir", path]
        elif kind == "link":
            args += ["--symlink", step[2], path]
        elif kind == "bind":
            args += ["--ro-bind", path, path]
        elif os.path.isdir(path):  # cover
            args += ["--tmpfs", path, "--remount-ro", path]
        else:
            args += ["--ro-bind", "/dev/null", path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp"]
    return [*args, "--seccomp", str(seccomp_fd)]


def _ensure_bwrap() -> str:
    found = shutil.which("bwrap")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("bwrap is not installed (apt-get install bubblewrap) and this is not root to install it")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "bubblewrap"]
    if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        subprocess.run(cmd, capture_output=True, check=True)
    found = shutil.which("bwrap")
    if not found:
        raise RuntimeError("apt-get installed bubblewrap but there is no bwrap on PATH")
    return found


def _bwrap(tmp: Path) -> tuple[Callable[[], float], Callable[[], None]]:
    binary = _ensure_bwrap()
    program = tmp / "seccomp.bpf"
    program.write_bytes(seccomp.program())
    plan = rootfs.plan(())

    def once() -> float:
        fd = os.open(program, os.O_RDONLY)  # bwrap reads the program to the end: a fresh fd each time
        try:
            return _run_checked([binary, *bwrap_args(plan, fd), PYTHON, "-I", "-S", "-c", CODE], pass_fds=(fd,))
        finally:
            os.close(fd)

    return once, lambda: None


def _refuse(op: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": False, "error": "no world here"}


def _confined(parents: dict[str, str] | None) -> Callable[[Path], tuple[Callable[[], float], Callable[[], None]]]:
    def start(tmp: Path) -> tuple[Callable[[], float], Callable[[], None]]:
        def once() -> float:
            r = run_confined("world.result(1)", None, Limits(), _refuse, cgroup_parents=parents)
            if not r.ok or r.value != b"1":
                raise Mismatch(f"{r.error_code}: {r.error[:300]}")
            return r.cpu_seconds

        return once, lambda: None

    return start


def _confined_cgroup(tmp: Path) -> tuple[Callable[[], float], Callable[[], None]]:
    """Per-invocation cgroups under worker-like ones of this process, made as the pool makes them."""
    cg, status = cgroups.WorkerCgroups.create(cgroups.discover(), cgroups.child_name(os.getpid(), 98, 0))
    if cg is None or cg.memory_dir is None:
        if cg is not None:
            cg.remove()
        raise RuntimeError(f"no memory cgroup to put invocations in (run as root on a cgroup v1 host): {status}")
    once, _ = _confined(dict(cg.controllers))(tmp)
    return once, cg.remove


def _pool(tmp: Path) -> tuple[Callable[[], float], Callable[[], None]]:
    """A one-worker pool on a loop of its own thread; each call is one ``Invoke`` round trip."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-pool", daemon=True)
    thread.start()
    pool = WorkerPool(size=1, hide=[str(tmp)])
    asyncio.run_coroutine_threadsafe(pool.__aenter__(), loop).result(120)
    spec = Invoke(code="world.result(1)")

    def once() -> float:
        out = asyncio.run_coroutine_threadsafe(pool.run(spec), loop).result(60)
        res = decode_invoke(out.output)
        if not res.ok or res.value != b"1":
            raise Mismatch(f"{res.error_code}: {res.error[:300]}")
        return out.usage.cpu_seconds

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(pool.__aexit__(None, None, None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    return once, stop


SYSTEMS = [
    System(BARE, "subprocess.run([python, -I, -S, -c, 'print(1)']): no confinement, the floor", _bare),
    System("bwrap", "the same under bubblewrap: all namespaces, the same root plan and seccomp program", _bwrap, False),
    System("confined", "run_confined from this process, no cgroup (the memory watch on)", _confined(None)),
    System("confined-cgroup", "run_confined with per-invocation cgroups (root)", _confined_cgroup),
    System("confined-pool", "Invoke through a one-worker pool: supervisor -> worker -> sandbox -> back", _pool),
]


def _started(tmp: Path, skipped: list[Skipped]) -> Iterator[tuple[System, Callable[[], float], Callable[[], None]]]:
    for s in SYSTEMS:
        where = tmp / s.name
        where.mkdir()
        try:
            once, stop = s.start(where)
            once()  # warm: imports, caches, a first sandbox
        except Exception as exc:
            print(f"[{s.name}] SKIPPED: {type(exc).__name__}: {exc}", flush=True)
            skipped.append(Skipped(s.name, f"{type(exc).__name__}: {exc}"))
            continue
        yield s, once, stop


def _entry(s: System) -> Entry:
    lat = sorted(s.latencies)
    p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
    return Entry(
        s.name,
        s.describe,
        len(lat),
        round(statistics.median(lat) * 1e3, 2),
        round(statistics.fmean(lat) * 1e3, 2),
        round(p90 * 1e3, 2),
        round(statistics.fmean(s.cpu) * 1e3, 2) if s.cpu_visible else None,
    )


def plot(entries: list[Entry], path: Path, note: str) -> None:
    """Median round trip per system (p90 as the whisker), with the target line at 2× the bare floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    med = [e.median_ms for e in entries]
    err = [[0.0] * len(entries), [e.p90_ms - e.median_ms for e in entries]]
    colors = ["tab:gray" if e.name == BARE else "tab:orange" if e.name == "bwrap" else "tab:blue" for e in entries]
    bars = ax.bar(range(len(entries)), med, yerr=err, color=colors, capsize=4)
    cpu = ["" if e.cpu_ms is None else f"\ncpu {e.cpu_ms:.0f} ms" for e in entries]
    labels = [f"{m:.1f} ms{c}" for m, c in zip(med, cpu, strict=True)]
    ax.bar_label(bars, labels=labels, label_type="center", color="white", fontsize=9)
    bare = next((e.median_ms for e in entries if e.name == BARE), None)
    if bare is not None:
        ax.axhline(TARGET * bare, color="tab:red", linestyle="--", linewidth=1, label=f"target: {TARGET:g}× {BARE}")
        ax.legend(loc="upper left")
    ax.set_xticks(range(len(entries)), [e.name for e in entries], rotation=10)
    ax.set_ylabel("round trip, ms (median; whisker: p90)")
    title = "A trivial confined invocation vs a bare fork+exec of Python and bubblewrap (lower is better)"
    ax.set_title(f"{title}\n{note}")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    save_figure(fig, path)


def run(opts: Options) -> int:
    """Measure every system in turns; print the table and the ratios; write the JSON and the plot."""
    duration = QUICK_S if opts.quick else FULL_S
    mode = "quick" if opts.quick else "full"
    host = host_info(["msgspec", "pyzmq"])
    host["kernel"] = os.uname().release
    host["uid"] = os.geteuid()
    load = host["loadavg_at_start"]
    print(f"sandbox benchmark ({mode}): {duration:g} s in turns of {BATCH}; load {load}", flush=True)
    skipped: list[Skipped] = []
    tmp = Path(tempfile.mkdtemp(prefix="aeco-sandbox-bench-"))
    running = list(_started(tmp, skipped))
    try:
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for s, once, _ in running:
                for _ in range(BATCH):
                    t = time.perf_counter()
                    cpu = once()
                    s.latencies.append(time.perf_counter() - t)
                    s.cpu.append(cpu)
    finally:
        for _, _, stop in running:
            stop()
        shutil.rmtree(tmp, ignore_errors=True)
    entries = [_entry(s) for s, _, _ in running]
    by = {e.name: e for e in entries}
    ratios: dict[str, float] = {}
    if BARE in by:
        for e in entries:
            if e.name != BARE:
                ratios[f"{e.name} / {BARE} (median)"] = round(e.median_ms / by[BARE].median_ms, 2)
    if "bwrap" in by and "confined" in by:
        ratios["confined / bwrap (median)"] = round(by["confined"].median_ms / by["bwrap"].median_ms, 2)
    head = f"{'system':<18} {'n':>5} {'median ms':>10} {'mean ms':>9} {'p90 ms':>8} {'cpu ms':>8}"
    print(f"\n{head}\n{'-' * len(head)}")
    for e in entries:
        cpu_text = "n/a" if e.cpu_ms is None else f"{e.cpu_ms:.2f}"
        print(f"{e.name:<18} {e.n:>5} {e.median_ms:>10.2f} {e.mean_ms:>9.2f} {e.p90_ms:>8.2f} {cpu_text:>8}")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}×")
    key = f"confined-pool / {BARE} (median)"
    target = f"{key} ≤ {TARGET:g}"
    if key in ratios:
        print(f"target {target}: {'met' if ratios[key] <= TARGET else 'NOT met'} ({ratios[key]:.2f}×)")
    report = Report("sandbox", mode, host, duration, entries, ratios, target, skipped)
    note = f"{host['cpus_usable']} CPUs, kernel {host['kernel']}, load {host['loadavg_at_start']}, {mode} run"
    publish(opts.json_path, report, lambda png: plot(entries, png, note) if entries else None)
    return 1 if skipped else 0
