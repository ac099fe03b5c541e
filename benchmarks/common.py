"""Pieces shared by the benchmarks: options, closed-loop drivers, latency statistics, host facts, py-spy.

A closed loop keeps exactly one request in flight per client: a client sends the next request only
when the previous one came back. With as many clients as workers, throughput measures how fast the
system turns a request around rather than how deep a queue it can build.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import math
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line asked for; every benchmark module takes one in its ``run``."""

    quick: bool
    json_path: Path
    profile: bool
    #: How long a benchmark that runs for a time (``soak``) runs; None: its own default.
    minutes: float | None = None
    #: The numbers of agents a benchmark that measures several (``ecology``) measures; None: its own.
    sizes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """How long to measure one system at one worker count."""

    #: Round trips run (in total over all clients) and thrown away before measuring.
    warmup: int
    #: Measuring stops at whichever comes first: this much time, or ``max_round_trips`` in total.
    duration_s: float
    max_round_trips: int


@dataclass(slots=True)
class Sample:
    """Raw result of one closed-loop run: every measured round trip's latency, and the CPU spent meanwhile."""

    latencies_ns: list[int]
    seconds: float
    #: py-spy was sampling during the measurement (its numbers are slightly pessimistic).
    profiled: bool = False
    #: CPU-seconds used during the measurement by this process (the clients and whatever threads the
    #: system runs in it), and by its child processes (the system's workers or servers).
    cpu: CpuUsed | None = None

    @property
    def round_trips(self) -> int:
        """Number of measured round trips."""
        return len(self.latencies_ns)

    @property
    def per_second(self) -> float:
        """Round trips per second over the whole measured interval."""
        return self.round_trips / self.seconds if self.seconds > 0 else 0.0


class CpuUsed(NamedTuple):
    """CPU-seconds used by this process (all its threads) and by its live descendants (all theirs)."""

    own: float
    children: float

    @classmethod
    def now(cls) -> CpuUsed:
        """What they used so far. A descendant's count is ``/proc``'s, in clock ticks: read over a
        window of seconds, good to a fraction of a percent."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        children = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                t = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            children += t.user + t.system
        return cls(me.ru_utime + me.ru_stime, children)

    def since(self, start: CpuUsed) -> CpuUsed:
        """What was used between ``start`` and this reading."""
        return CpuUsed(self.own - start.own, self.children - start.children)


def percentile_us(sorted_ns: Sequence[int], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of sorted nanosecond values, in microseconds."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1000


def pipelined_batches(submit_batch: Callable[[], Sequence[Future[Any]]], duration_s: float) -> tuple[int, float]:
    """One thread keeps two batches of futures in flight (so a group-committing writer never waits for
    it) for ``duration_s``; return how many operations completed and in how many seconds, the last
    batches drained. ``submit_batch`` submits one batch and returns its futures."""
    inflight: collections.deque[Sequence[Future[Any]]] = collections.deque()
    n = 0
    start = time.perf_counter()
    deadline = start + duration_s
    while True:
        if time.perf_counter() < deadline:
            inflight.append(submit_batch())
        if len(inflight) >= 2 or (inflight and time.perf_counter() >= deadline):
            for f in inflight.popleft():
                f.result()
                n += 1
        if not inflight:
            return n, time.perf_counter() - start


class Failed(Exception):
    """A closed-loop run could not complete (a client raised, or the run was aborted)."""


def closed_loop_threads(
    clients: Sequence[Callable[[], object]],
    budget: Budget,
    before_measure: Callable[[], None] | None = None,
) -> Sample:
    """Run each ``clients[i]`` (one blocking round trip per call) in a loop in its own thread.

    ``before_measure`` runs once after the warm-up of every client and before the clock starts.
    """
    n = len(clients)
    lats: list[list[int]] = [[] for _ in clients]
    ends = [0] * n
    errors: list[BaseException] = []
    clock = {"start": 0, "deadline": 0}
    warm_each = math.ceil(budget.warmup / n)
    cap_each = max(1, budget.max_round_trips // n)

    cpu_at_start: list[CpuUsed] = []

    def start_clock() -> None:
        if before_measure is not None:
            before_measure()
        cpu_at_start.append(CpuUsed.now())
        clock["start"] = time.perf_counter_ns()
        clock["deadline"] = clock["start"] + int(budget.duration_s * 1e9)

    # The barrier's action runs once, after every client finished its warm-up and before any of
    # them measures, so that no client's warm-up overlaps another client's measurement.
    barrier = threading.Barrier(n, action=start_clock)

    def body(i: int) -> None:
        call = clients[i]
        try:
            for _ in range(warm_each):
                call()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:  # raised by before_measure, in the thread that ran it
            errors.append(exc)
            return
        pc = time.perf_counter_ns
        out = lats[i]
        deadline = clock["deadline"]
        t1 = pc()
        try:
            while True:
                t0 = pc()
                call()
                t1 = pc()
                out.append(t1 - t0)
                if t1 >= deadline or len(out) >= cap_each:
                    break
        except BaseException as exc:
            errors.append(exc)
        ends[i] = t1

    threads = [threading.Thread(target=body, args=(i,), name=f"client-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise Failed(f"a client failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    if barrier.broken or clock["start"] == 0:
        raise Failed("the measurement was aborted before it started")
    cpu = CpuUsed.now().since(cpu_at_start[0])
    return Sample(sorted(x for lat in lats for x in lat), (max(ends) - clock["start"]) / 1e9, cpu=cpu)


async def closed_loop_async(
    clients: Sequence[Callable[[], Awaitable[object]]],
    budget: Budget,
    before_measure: Callable[[], None] | None = None,
    timeout_s: float = 120.0,
) -> Sample:
    """Run each ``clients[i]`` (one awaited round trip per call) in a loop in its own coroutine.

    ``before_measure`` runs once after the warm-up and before the clock starts; the whole run is
    bounded by ``timeout_s`` rather than each call, so that no per-call wrapper adds overhead.
    """
    n = len(clients)
    warm_each = math.ceil(budget.warmup / n)
    cap_each = max(1, budget.max_round_trips // n)

    async def warm(call: Callable[[], Awaitable[object]]) -> None:
        for _ in range(warm_each):
            await call()

    async def measure(call: Callable[[], Awaitable[object]], deadline: int) -> tuple[list[int], int]:
        pc = time.perf_counter_ns
        out: list[int] = []
        while True:
            t0 = pc()
            await call()
            t1 = pc()
            out.append(t1 - t0)
            if t1 >= deadline or len(out) >= cap_each:
                return out, t1

    async def both() -> Sample:
        await asyncio.gather(*(warm(c) for c in clients))
        if before_measure is not None:
            before_measure()
        cpu_at_start = CpuUsed.now()
        start = time.perf_counter_ns()
        deadline = start + int(budget.duration_s * 1e9)
        runs = await asyncio.gather(*(measure(c, deadline) for c in clients))
        cpu = CpuUsed.now().since(cpu_at_start)
        lats = sorted(x for lat, _ in runs for x in lat)
        return Sample(lats, (max(end for _, end in runs) - start) / 1e9, cpu=cpu)

    try:
        return await asyncio.wait_for(both(), timeout_s)
    except TimeoutError:
        raise Failed(f"no result within {timeout_s:g} s") from None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_info(packages: Sequence[str] = ()) -> dict[str, Any]:
    """Facts about the machine and interpreter that the numbers depend on."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        # Other load on the machine skews every number: record it so that a noisy run can be told.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        from runtime.host import cgroups

        info["cpu_capacity"] = cgroups.cpu_capacity(cgroups.discover())
    except Exception as exc:  # a fact we can do without
        info["cpu_capacity"] = f"unknown ({exc})"
    info["packages"] = {name: _version(name) for name in packages}
    return info


def scratch(name: str, packages: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """A fresh directory for benchmark ``name``'s files and the host facts (``host_info``) with where it
    is, and whether it shares a device with ``data/`` (so that fsync figures compare with a real run)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"aeco-{name}-bench-"))
    host = host_info(packages)
    host["tmp_dir"] = str(tmp)
    data_dir = Path("data")
    if data_dir.exists():
        host["same_device_as_data_dir"] = os.stat(data_dir).st_dev == os.stat(tmp).st_dev
    return tmp, host


def announce(name: str, opts: Options, what: str, host: dict[str, Any], *more: str) -> None:
    """The run's first line: which benchmark, quick or full, what it measures, and the host it runs on."""
    mode = "quick" if opts.quick else "full"
    tail = "".join(f", {m}" for m in more)
    print(
        f"{name} benchmark ({mode}): {what}; {host['cpus_usable']} usable CPUs, Python {host['python']}{tail}",
        flush=True,
    )


def write_json(path: Path, obj: msgspec.Struct) -> None:
    """Write ``obj`` as indented JSON, creating the directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(obj), indent=2) + b"\n")


class ReportHead(msgspec.Struct):
    """What every benchmark's JSON file starts with; each benchmark's ``Report`` adds its results."""

    benchmark: str
    #: ``quick`` or ``full``.
    mode: str
    host: dict[str, Any]
    duration_s: float


class Skipped(msgspec.Struct):
    """A system that failed, and why."""

    name: str
    reason: str


M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class System(Generic[M]):
    """A system under test: ``runner(fresh_dir, seconds)`` sets up, measures, verifies and cleans up."""

    name: str
    describe: str
    #: Whether what it measured survives a power cut (a row's "durable" column).
    durable: bool
    runner: Callable[[Path, float], M]
    #: What it does, where a benchmark measures more than one kind of operation ("write", "read").
    kind: str = ""


def measure_each(
    systems: Sequence[System[M]], tmp: Path, duration: float, skipped: list[Skipped]
) -> Iterator[tuple[System[M], M]]:
    """Run each system in a fresh directory under ``tmp`` and yield what it measured. A system that
    fails is printed and recorded in ``skipped``; the others go on (one failure must not cost the
    others' numbers)."""
    for system in systems:
        tag = f"[{system.name}]"
        print(f"{tag} starting: {system.describe}", flush=True)
        where = tmp / system.name
        where.mkdir()
        try:
            measured = system.runner(where, duration)
        except Exception as exc:
            print(f"{tag} FAILED: {type(exc).__name__}: {exc}", flush=True)
            skipped.append(Skipped(system.name, f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            shutil.rmtree(where, ignore_errors=True)
        yield system, measured


def print_rows(head: str, rows: Iterable[str]) -> None:
    """A results table: ``head``, a rule as wide, then one line per row, set off by blank lines."""
    print()
    print(head)
    print("-" * len(head))
    for row in rows:
        print(row)
    print()


def save_figure(fig: Any, path: Path, *, grid: Any = None, which: str = "major", dpi: int = 120) -> None:
    """Lay out a matplotlib figure, write it as a PNG at ``path`` (creating the directory) and free it.
    ``grid``: axes that get the house style's faint horizontal grid behind the bars (``which`` lines)."""
    import matplotlib.pyplot as plt

    if grid is not None:
        grid.grid(axis="y", alpha=0.3, which=which)
        grid.set_axisbelow(True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def publish(json_path: Path, report: msgspec.Struct, plot: Callable[[Path], None]) -> None:
    """Write the JSON report, then the PNG beside it (a failed plot does not lose the numbers)."""
    write_json(json_path, report)
    print(f"\nwrote {json_path}")
    png = json_path.with_suffix(".png")
    try:
        plot(png)
    except Exception as exc:  # the numbers are already printed and saved
        print(f"plot failed: {type(exc).__name__}: {exc}")
    else:
        if png.exists():
            print(f"wrote {png}")


def child_pids() -> list[tuple[int, str]]:
    """Pids and names of this process's live children (to report anything a peer left behind)."""
    out: list[tuple[int, str]] = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append((child.pid, child.name()))
        except psutil.NoSuchProcess:
            continue
    return out


# ------------------------------------------------------------------------------------------ py-spy


def _py_spy_binary() -> str | None:
    # The venv's bin directory is often not on PATH when the interpreter is called by its full path.
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpy:
    """A ``py-spy record`` of one process into a flame graph SVG, stopped when the measurement ends."""

    def __init__(self, proc: subprocess.Popen[bytes], pid: int, out: Path) -> None:
        self.proc = proc
        self.pid = pid
        self.out = out

    @classmethod
    def start(cls, pid: int, out: Path, max_s: float, what: str) -> PySpy | None:
        """Start recording ``pid`` and wait until py-spy samples; print why and return None if not."""
        exe = _py_spy_binary()
        if exe is None:
            print(f"  py-spy ({what}): not found; no flame graph")
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        # --nonblocking: do not pause the target at every sample, which would inflate its latency.
        # --duration is only a safety net: the recording is stopped with SIGINT when the loop ends.
        cmd = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "flamegraph",
            "-o",
            str(out),
            "--duration",
            str(max(1, math.ceil(max_s))),
            "--nonblocking",
        ]
        try:
            # py-spy reports progress on stdout and errors on stderr: read both as one stream.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        except OSError as exc:
            print(f"  py-spy ({what}): could not start: {exc}")
            return None
        text = _read_until(proc, b"Sampling process", 15.0)
        if b"Sampling process" not in text:
            _stop(proc)
            why = text.decode(errors="replace").strip().splitlines()
            print(f"  py-spy ({what}): did not start sampling pid {pid}: {why[0] if why else 'no output'}")
            return None
        print(f"  py-spy ({what}): sampling pid {pid}")
        return cls(proc, pid, out)

    def stop(self, what: str) -> None:
        """Stop the recording (py-spy writes the SVG on SIGINT) and say whether it was written."""
        tail = _stop(self.proc).decode(errors="replace")
        wrote = [line for line in tail.splitlines() if "Wrote" in line]
        if self.proc.returncode == 0 and self.out.exists():
            print(f"  py-spy ({what}): {wrote[0].removeprefix('py-spy> ') if wrote else self.out}")
        else:
            last = tail.strip().splitlines()
            print(f"  py-spy ({what}): failed (exit {self.proc.returncode}): {last[-1] if last else ''}")


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout_s: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    end = time.monotonic() + timeout_s
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:  # py-spy exited
            break
        buf += chunk
    return buf


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or b""


def stop_resource_trackers() -> None:
    """Stop the resource-tracker processes that multiprocessing and loky start on first use.

    They are per-process singletons meant to live until the interpreter exits, so shutting an
    executor down leaves them running; stopping them here (they restart on demand) means a run
    leaves no helper process behind and the check for leftovers sees only what a peer left.
    """
    import multiprocessing.resource_tracker

    modules = [multiprocessing.resource_tracker, sys.modules.get("loky.backend.resource_tracker")]
    for module in modules:
        tracker = getattr(module, "_resource_tracker", None)
        stop = getattr(tracker, "_stop", None)  # private, but the only way short of exiting
        if stop is None:
            continue
        try:
            stop()
        except Exception as exc:  # a tracker we cannot stop is only untidy
            print(f"  could not stop {type(tracker).__module__} resource tracker: {exc}")
