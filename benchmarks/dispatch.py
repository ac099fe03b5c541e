"""Dispatch overhead: no-op round trips per second and their latency, for this pool and its peers.

With W workers, W closed-loop clients each keep exactly one no-op in flight, so every number is the
cost of turning one request around (send, wake a worker, run nothing, answer, wake the client) and
not of batching or queueing. Systems measured, each with 1 and 2 workers:

- ``aeco-pool``: ``WorkerPool.run(Echo())`` from W coroutines, per-task accounting on;
- ``aeco-pool-noacct``: the same with ``measure=False`` (what accounting costs is the difference);
- ``aeco-executor``: ``WorkerPoolExecutor.submit(_noop).result()`` from W threads, accounting on;
- ``ProcessPoolExecutor``, ``multiprocessing.Pool`` (``apply``), loky and Ray, the same way;
- ``pyzmq-floor``: bare REQ/REP over ipc to W echo processes, no encoding and no scheduling, the
  fastest any design built on pyzmq can go;
- ``pyzmq-asyncio-floor``: the same echo processes from W coroutines, each send answered through a
  future that a reader callback on the socket's descriptor settles: the fastest an asyncio client
  (such as ``WorkerPool``) can go, so that the pool's distance from ``pyzmq-floor`` splits into what
  the event loop costs and what the pool adds.

Then the pipelined rows: ``map`` of 100,000 no-ops (10,000 with --quick) at one ``chunksize``, where
many tasks are in flight at once: ``WorkerPoolExecutor`` (accounting on, ``pool.prefetch`` 1: a task
waits at each worker behind the one it runs) against ``ProcessPoolExecutor``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import ctypes
import importlib.util
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from benchmarks.common import (
    RESULTS_DIR,
    Budget,
    Failed,
    Options,
    PySpy,
    Sample,
    child_pids,
    closed_loop_async,
    closed_loop_threads,
    host_info,
    percentile_us,
    publish,
    save_figure,
    stop_resource_trackers,
)

FULL = Budget(warmup=200, duration_s=3.0, max_round_trips=20_000)
QUICK = Budget(warmup=200, duration_s=0.5, max_round_trips=20_000)
#: Inputs mapped in the pipelined rows, and how many go to a worker as one task (the same for both).
MAP_TASKS, MAP_TASKS_QUICK, MAP_CHUNKSIZE = 100_000, 10_000, 1
WORKER_COUNTS = (1, 2)
#: A round trip that takes this long means the peer is stuck: fail it rather than hang the benchmark.
CALL_TIMEOUT_S = 30.0
PROFILED = "aeco-pool"  # the system (at 1 worker) that --profile records
PPE, FLOOR, ASYNC_FLOOR = "ProcessPoolExecutor", "pyzmq-floor", "pyzmq-asyncio-floor"


def _noop() -> None:
    """The task every executor runs: module level, so that workers import it by reference."""


def _noop_of(_x: object) -> None:
    """The pipelined rows' task: ``map`` passes it one input."""


# --------------------------------------------------------------------------------------- results


class Entry(msgspec.Struct, omit_defaults=True):
    """One system at one worker count."""

    name: str
    workers: int
    round_trips_per_s: float
    p50_us: float
    p99_us: float
    round_trips: int
    seconds: float
    #: py-spy was sampling while this was measured (its numbers are slightly pessimistic).
    profiled: bool = False
    #: CPU per round trip in the benchmark's process (the callers and the system's own threads there:
    #: the pool's loop, an executor's manager) and in its child processes (workers, echo servers), in µs.
    client_cpu_us: float | None = None
    workers_cpu_us: float | None = None


class Pipelined(msgspec.Struct):
    """One executor's ``map`` of many no-ops: tasks per second with many in flight."""

    name: str
    workers: int
    chunksize: int
    tasks: int
    seconds: float
    tasks_per_s: float


class Skipped(msgspec.Struct):
    """A system (or one worker count of it) that was not measured, and why."""

    name: str
    workers: int | None
    reason: str


class Report(msgspec.Struct):
    """The JSON file: host facts, the budget used, one entry per system and worker count."""

    benchmark: str
    mode: str
    host: dict[str, Any]
    budget: dict[str, float]
    results: list[Entry]
    skipped: list[Skipped]
    pipelined: list[Pipelined] = []


class Unavailable(Exception):
    """A peer that is not installed: skipped, not failed."""


# ---------------------------------------------------------------------------------------- peers

Runner = Callable[[int, Budget, Path | None], Sample]


@dataclass(frozen=True, slots=True)
class System:
    """A system under test: ``runner(workers, budget, profile_dir)`` sets up, measures, shuts down."""

    name: str
    describe: str
    runner: Runner


def zmq_echo_server(endpoint: str) -> None:
    """The floor's server process: answer every request with itself until asked to stop."""
    # Die with the benchmark even if it is killed before it can say stop.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.REP)
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        msg = sock.recv()
        sock.send(msg)
        if msg == b"stop":
            break
    sock.close(linger=1000)
    ctx.term()


def _reap(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _echo_sockets(workers: int) -> Iterator[list[zmq.Socket[bytes]]]:
    """One REQ socket connected to each of ``workers`` echo processes (``zmq_echo_server``), which are
    asked to stop and reaped after (killed if the body failed)."""
    tmp = tempfile.mkdtemp(prefix="aeco-zmq-floor-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in sys.path if x))
    servers: list[subprocess.Popen[bytes]] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
    socks: list[zmq.Socket[bytes]] = []
    stopped = False
    try:
        for i in range(workers):
            endpoint = f"ipc://{tmp}/floor-{i}.sock"
            code = "import sys; from benchmarks.dispatch import zmq_echo_server as s; s(sys.argv[1])"
            servers.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, endpoint],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                )
            )
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(CALL_TIMEOUT_S * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(CALL_TIMEOUT_S * 1000))
            sock.connect(endpoint)
            socks.append(sock)
        for proc in servers:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise Failed(f"echo server pid {proc.pid} did not start (exit {proc.wait()})")
        yield socks
        for sock in socks:
            sock.send(b"stop")
            sock.recv()
        stopped = True
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
        for proc in servers:
            _reap(proc, 5.0 if stopped else 0.0)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _run_zmq_floor(workers: int, budget: Budget, _profile: Path | None) -> Sample:
    with _echo_sockets(workers) as socks:

        def client(sock: zmq.Socket[bytes]) -> Callable[[], object]:
            def call() -> bytes:
                sock.send(b"x")
                return sock.recv()

            return call

        # Sockets are created here and used by one client thread each: zmq allows moving a socket
        # to another thread when the move is a full memory barrier, as starting a thread is.
        return closed_loop_threads([client(s) for s in socks], budget)


def _run_zmq_asyncio_floor(workers: int, budget: Budget, _profile: Path | None) -> Sample:
    with _echo_sockets(workers) as socks:
        return asyncio.run(_zmq_asyncio_floor(socks, budget))


async def _zmq_asyncio_floor(socks: list[zmq.Socket[bytes]], budget: Budget) -> Sample:
    """The least an asyncio client can do per round trip: send, then await a future that a reader
    callback on the socket's descriptor settles (the pool's own receive path, with nothing else)."""
    loop = asyncio.get_running_loop()
    events, pollin, noblock = zmq.EVENTS, int(zmq.POLLIN), int(zmq.NOBLOCK)

    def client(sock: zmq.Socket[bytes]) -> Callable[[], Awaitable[bytes]]:
        waiting: list[asyncio.Future[bytes]] = []

        def drain() -> None:
            while int(sock.getsockopt(events)) & pollin:
                reply = sock.recv(noblock)
                if waiting:
                    waiting.pop().set_result(reply)

        loop.add_reader(int(sock.getsockopt(zmq.FD)), drain)

        def call() -> Awaitable[bytes]:
            fut = loop.create_future()
            waiting.append(fut)
            sock.send(b"x", noblock)
            drain()  # the descriptor is edge-triggered: a send can consume the edge of a reply
            return fut

        return call

    clients = [client(s) for s in socks]
    try:
        return await closed_loop_async(clients, budget)
    finally:
        for sock in socks:
            loop.remove_reader(int(sock.getsockopt(zmq.FD)))


def _run_executor(make: Callable[[int], cf.Executor]) -> Runner:
    def run(workers: int, budget: Budget, _profile: Path | None) -> Sample:
        with make(workers) as ex:

            def call() -> object:
                return ex.submit(_noop).result(timeout=CALL_TIMEOUT_S)

            return closed_loop_threads([call] * workers, budget)

    return run


def _make_ppe(workers: int) -> cf.Executor:
    return cf.ProcessPoolExecutor(max_workers=workers)


def _make_loky(workers: int) -> cf.Executor:
    import loky

    # A private executor rather than get_reusable_executor, so that its workers end with this run.
    ex: cf.Executor = loky.ProcessPoolExecutor(max_workers=workers)
    return ex


def _make_aeco_executor(workers: int) -> cf.Executor:
    from runtime.pool import WorkerPoolExecutor

    return WorkerPoolExecutor(max_workers=workers)


def _run_mp_pool(workers: int, budget: Budget, _profile: Path | None) -> Sample:
    pool = multiprocessing.Pool(workers)
    try:

        def call() -> object:
            # What Pool.apply does, plus a timeout so that a stuck pool fails instead of hanging.
            return pool.apply_async(_noop).get(CALL_TIMEOUT_S)

        sample = closed_loop_threads([call] * workers, budget)
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
    return sample


def _run_ray(workers: int, budget: Budget, _profile: Path | None) -> Sample:
    try:
        import ray
    except ImportError as exc:
        raise Unavailable(f"not installed ({exc})") from None
    # Ray's workers are started by its raylet, which inherits this environment: they must be able
    # to import benchmarks.dispatch to find the no-op.
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in sys.path if x)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            noop = ray.remote(_noop)

            def call() -> object:
                return ray.get(noop.remote(), timeout=CALL_TIMEOUT_S)

            return closed_loop_threads([call] * workers, budget)
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_aeco_pool(measure: bool) -> Runner:
    def run(workers: int, budget: Budget, profile: Path | None) -> Sample:
        return asyncio.run(_aeco_pool(workers, budget, measure, profile))

    return run


async def _aeco_pool(workers: int, budget: Budget, measure: bool, profile: Path | None) -> Sample:
    from runtime import protocol as p
    from runtime.config import PoolConfig
    from runtime.pool import Outcome, WorkerPool

    spec = p.Echo()
    spies: list[tuple[PySpy, str]] = []
    async with WorkerPool(PoolConfig(workers=workers), size=workers) as pool:

        def call() -> Awaitable[Outcome]:
            return pool.run(spec, measure=measure)

        def start_profiles() -> None:
            if profile is None:
                return
            # Generous: the loop usually stops first and the recordings are stopped with it.
            max_s = budget.duration_s + 30
            targets = [("supervisor", os.getpid()), ("worker", pool.pids()[0])]
            for what, pid in targets:
                spy = PySpy.start(pid, profile / f"dispatch-{what}.svg", max_s, what)
                if spy is not None:
                    spies.append((spy, what))

        try:
            sample = await closed_loop_async([call] * workers, budget, before_measure=start_profiles)
            sample.profiled = bool(spies)
            return sample
        finally:
            for spy, what in spies:
                spy.stop(what)


MAP_AECO, MAP_PPE = "aeco-executor map", "ProcessPoolExecutor map"
#: The pipelined rows: an executor of W workers, by name.
MAPPERS: dict[str, Callable[[int], cf.Executor]] = {MAP_PPE: _make_ppe, MAP_AECO: _make_aeco_executor}


def run_map(make: Callable[[int], cf.Executor], workers: int, tasks: int) -> tuple[float, int]:
    """Seconds to ``map`` ``tasks`` no-ops over an executor of ``workers`` (started and warmed first)."""
    with make(workers) as ex:
        for _ in ex.map(_noop_of, range(200), chunksize=MAP_CHUNKSIZE):
            pass
        start = time.perf_counter()
        done = sum(1 for _ in ex.map(_noop_of, range(tasks), chunksize=MAP_CHUNKSIZE, timeout=CALL_TIMEOUT_S * 10))
        return time.perf_counter() - start, done


SYSTEMS: list[System] = [
    System(FLOOR, "bare pyzmq REQ/REP over ipc, one echo process per worker", _run_zmq_floor),
    System(
        ASYNC_FLOOR, "the same from asyncio: send, await a future a reader callback settles", _run_zmq_asyncio_floor
    ),
    System(PPE, "concurrent.futures, submit().result()", _run_executor(_make_ppe)),
    System("multiprocessing.Pool", "apply", _run_mp_pool),
    System("loky", "loky.ProcessPoolExecutor, submit().result()", _run_executor(_make_loky)),
    System("aeco-pool", "WorkerPool.run(Echo()), accounting on", _run_aeco_pool(True)),
    System("aeco-pool-noacct", "WorkerPool.run(Echo(), measure=False)", _run_aeco_pool(False)),
    System(
        "aeco-executor",
        "WorkerPoolExecutor, submit().result(), accounting on",
        _run_executor(_make_aeco_executor),
    ),
    System("ray", "ray.remote no-op, ray.get", _run_ray),
]


def _unavailable(name: str) -> str | None:
    if name != "ray":
        return None
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
        found = False
    return None if found else "not installed, skipped"


# ---------------------------------------------------------------------------------------- report


def _ratio(num: Entry | None, den: Entry | None) -> float | None:
    if num is None or den is None or den.round_trips_per_s <= 0:
        return None
    return num.round_trips_per_s / den.round_trips_per_s


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}×"


def print_table(entries: list[Entry]) -> None:
    """Print one row per system and worker count, with throughput relative to PPE and the floor."""
    by = {(e.name, e.workers): e for e in entries}
    head = (
        f"{'system':<22} {'workers':>7} {'rt/s':>10} {'p50 µs':>9} {'p99 µs':>9} {'× PPE':>7} {'× floor':>8}"
        f" {'CPU µs/rt: caller':>18} {'workers':>8}"
    )
    print()
    print(head)
    print("-" * len(head))
    for e in entries:
        mark = " *" if e.profiled else ""
        print(
            f"{e.name:<22} {e.workers:>7} {e.round_trips_per_s:>10,.0f} {e.p50_us:>9.1f} {e.p99_us:>9.1f} "
            f"{_fmt_ratio(_ratio(e, by.get((PPE, e.workers)))):>7} "
            f"{_fmt_ratio(_ratio(e, by.get((FLOOR, e.workers)))):>8} "
            f"{_fmt_us(e.client_cpu_us):>18} {_fmt_us(e.workers_cpu_us):>8}{mark}"
        )
    print(
        "CPU µs/rt: CPU-seconds used in the measured window per round trip, by the calling process (its callers"
        " and the system's threads in it) and by its children (workers, servers), all threads"
    )
    if any(e.profiled for e in entries):
        print("* measured while py-spy was sampling (--profile): slightly pessimistic")


def _fmt_us(us: float | None) -> str:
    return "n/a" if us is None else f"{us:.1f}"


def _fmt_delta(ours: float | None, theirs: float | None) -> str:
    return "n/a" if ours is None or theirs is None else f"{ours - theirs:+.1f}"


def _target(what: str, r: float | None, target: float) -> None:
    verdict = "" if r is None else (" — met" if r >= target else " — NOT met")
    print(f"{what}: {_fmt_ratio(r)} (target ≥ {target:g}×){verdict}")


def print_targets(entries: list[Entry], pipelined: list[Pipelined]) -> None:
    """Print the pool's targets, each a ratio of two systems measured in this run."""
    by = {(e.name, e.workers): e for e in entries}
    maps = {(m.name, m.workers): m for m in pipelined}
    print()
    for w in WORKER_COUNTS:
        n = f"{w} worker{'s' if w > 1 else ''}"
        _target(
            f"aeco-executor vs ProcessPoolExecutor round trips, {n}",
            _ratio(by.get(("aeco-executor", w)), by.get((PPE, w))),
            1.5,
        )
        ppe, floor, loop = by.get((PPE, w)), by.get((FLOOR, w)), by.get((ASYNC_FLOOR, w))
        if ppe is not None and floor is not None and floor.round_trips_per_s > 0:
            # Where the target lies against the floors: past the asyncio floor, no pool driven by an
            # event loop can reach it, whatever it does per task (see the next lines).
            asked = 1.5 * ppe.round_trips_per_s
            vs_loop = asked / loop.round_trips_per_s if loop is not None and loop.round_trips_per_s > 0 else None
            print(
                f"  the target, 1.5 × ProcessPoolExecutor = {asked:,.0f} rt/s, is "
                f"{_fmt_ratio(asked / floor.round_trips_per_s)} the blocking pyzmq floor, "
                f"{_fmt_ratio(vs_loop)} the asyncio floor"
            )
        _target(
            f"aeco-pool (accounting on) vs pyzmq floor, {n}", _ratio(by.get(("aeco-pool", w)), by.get((FLOOR, w))), 0.85
        )
        # What bounds the line above: no asyncio client, however little it does, is as fast as a
        # blocking one; these two say how far the floor is out of an event loop's reach, and where
        # the pool stands within that reach.
        loop_floor = _ratio(by.get((ASYNC_FLOOR, w)), by.get((FLOOR, w)))
        pool_in_loop = _ratio(by.get(("aeco-pool", w)), by.get((ASYNC_FLOOR, w)))
        print(
            f"  the event loop's own reach: pyzmq-asyncio-floor vs pyzmq floor {_fmt_ratio(loop_floor)}; "
            f"aeco-pool vs pyzmq-asyncio-floor {_fmt_ratio(pool_in_loop)}"
        )
        pool, bare = by.get(("aeco-pool", w)), by.get((ASYNC_FLOOR, w))
        if pool is not None and bare is not None:
            # Where the pool's time goes: a round trip is a relay, so what either side adds is latency.
            print(
                f"  what the pool adds per round trip over pyzmq-asyncio-floor: "
                f"{_fmt_delta(pool.client_cpu_us, bare.client_cpu_us)} µs of CPU in the supervisor, "
                f"{_fmt_delta(pool.workers_cpu_us, bare.workers_cpu_us)} µs in its workers"
            )
        ours, theirs = maps.get((MAP_AECO, w)), maps.get((MAP_PPE, w))
        r = ours.tasks_per_s / theirs.tasks_per_s if ours and theirs and theirs.tasks_per_s > 0 else None
        _target(f"aeco-executor map (pipelined) vs ProcessPoolExecutor map, chunksize {MAP_CHUNKSIZE}, {n}", r, 3.0)


def _bars(ax: Any, values: dict[tuple[str, int], float]) -> None:
    """Grouped bars, one group per system, one bar per worker count (absent: "n/a")."""
    names = list(dict.fromkeys(n for n, _ in values))
    width = 0.8 / len(WORKER_COUNTS)
    for j, w in enumerate(WORKER_COUNTS):
        xs = [i + (j - (len(WORKER_COUNTS) - 1) / 2) * width for i in range(len(names))]
        found = [values.get((n, w)) for n in names]
        bars = ax.bar(xs, [v or 0.0 for v in found], width, label=f"{w} worker{'s' if w > 1 else ''}")
        ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" if v else "n/a" for v in found], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.legend()


def plot(entries: list[Entry], pipelined: list[Pipelined], path: Path, title_note: str) -> None:
    """Round trips per second (one task in flight per worker), then the pipelined ``map`` rows."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.5), width_ratios=(3, 1))
    _bars(ax, {(e.name, e.workers): e.round_trips_per_s for e in entries})
    ax.set_ylabel("no-op round trips per second")
    ax.set_title(f"Closed loop, one task in flight per worker (higher is better)\n{title_note}")
    _bars(bx, {(m.name, m.workers): m.tasks_per_s for m in pipelined})
    bx.set_ylabel("no-ops per second")
    bx.set_title(f"map, chunksize {MAP_CHUNKSIZE}: pipelined")
    save_figure(fig, path, grid=ax)


# ------------------------------------------------------------------------------------------ main


def _entry(name: str, workers: int, s: Sample) -> Entry:
    return Entry(
        name=name,
        workers=workers,
        round_trips_per_s=round(s.per_second, 1),
        p50_us=round(percentile_us(s.latencies_ns, 50), 1),
        p99_us=round(percentile_us(s.latencies_ns, 99), 1),
        round_trips=s.round_trips,
        seconds=round(s.seconds, 3),
        profiled=s.profiled,
        client_cpu_us=None if s.cpu is None or not s.round_trips else round(s.cpu.own / s.round_trips * 1e6, 1),
        workers_cpu_us=None if s.cpu is None or not s.round_trips else round(s.cpu.children / s.round_trips * 1e6, 1),
    )


def _check_leftovers(tag: str, before: set[int]) -> None:
    """Say if a system left child processes behind after its shutdown."""
    stop_resource_trackers()
    left = [(pid, name) for pid, name in child_pids() if pid not in before]
    if left:
        time.sleep(1.0)  # some peers (Ray) stop their helpers asynchronously: give them a moment
        left = [(pid, name) for pid, name in child_pids() if pid not in before]
    if left:
        print(f"{tag} warning: processes left behind: {', '.join(f'{p} ({n})' for p, n in left)}")


def measure_pipelined(tasks: int) -> list[Pipelined]:
    """The pipelined rows: each executor at each worker count maps ``tasks`` no-ops (a failure is said
    and leaves its row out)."""
    out: list[Pipelined] = []
    for name, make in MAPPERS.items():
        for w in WORKER_COUNTS:
            tag = f"[{name}, {w} worker{'s' if w > 1 else ''}]"
            print(f"{tag} starting: map of {tasks:,} no-ops, chunksize {MAP_CHUNKSIZE}", flush=True)
            before = {pid for pid, _ in child_pids()}
            try:
                seconds, done = run_map(make, w, tasks)
            except Exception as exc:  # one executor's failure must not cost the others' numbers
                print(f"{tag} FAILED: {type(exc).__name__}: {exc}")
                continue
            finally:
                _check_leftovers(tag, before)
            m = Pipelined(name, w, MAP_CHUNKSIZE, done, round(seconds, 3), round(done / seconds, 1))
            print(f"{tag} done: {m.tasks_per_s:,.0f} tasks/s ({done:,} in {m.seconds:.2f} s)", flush=True)
            out.append(m)
    return out


def run(opts: Options) -> int:
    """Measure every system at every worker count; print, and write the JSON and the plot.

    Returns 1 if a system that is installed failed, else 0.
    """
    budget = QUICK if opts.quick else FULL
    mode = "quick" if opts.quick else "full"
    host = host_info(["pyzmq", "msgspec", "loky", "ray"])
    host["libzmq"] = zmq.zmq_version()
    print(
        f"dispatch benchmark ({mode}): {budget.warmup} warm-up round trips, then "
        f"{budget.duration_s:g} s or {budget.max_round_trips:,} round trips per system and worker count; "
        f"{host['cpus_usable']} usable CPUs, Python {host['python']}"
    )
    entries: list[Entry] = []
    skipped: list[Skipped] = []
    failed = False
    for system in SYSTEMS:
        why = _unavailable(system.name)
        if why is not None:
            print(f"{system.name}: {why}")
            skipped.append(Skipped(system.name, None, why))
            continue
        for w in WORKER_COUNTS:
            tag = f"[{system.name}, {w} worker{'s' if w > 1 else ''}]"
            profile = RESULTS_DIR if opts.profile and system.name == PROFILED and w == 1 else None
            print(f"{tag} starting: {system.describe}", flush=True)
            before = {pid for pid, _ in child_pids()}
            try:
                sample = system.runner(w, budget, profile)
            except Unavailable as exc:
                print(f"{tag} skipped: {exc}")
                skipped.append(Skipped(system.name, w, str(exc)))
                break
            except Exception as exc:  # one peer's failure must not cost the others' numbers
                cause = exc.__cause__
                detail = f" ({type(cause).__name__}: {cause})" if cause and str(cause) not in str(exc) else ""
                print(f"{tag} FAILED: {type(exc).__name__}: {exc}{detail}")
                skipped.append(Skipped(system.name, w, f"failed: {type(exc).__name__}: {exc}"))
                failed = True
            else:
                e = _entry(system.name, w, sample)
                entries.append(e)
                print(
                    f"{tag} done: {e.round_trips_per_s:,.0f} rt/s, p50 {e.p50_us:.1f} µs, "
                    f"p99 {e.p99_us:.1f} µs ({e.round_trips:,} round trips in {e.seconds:.2f} s)",
                    flush=True,
                )
            finally:
                _check_leftovers(tag, before)
    pipelined = measure_pipelined(MAP_TASKS_QUICK if opts.quick else MAP_TASKS)
    failed = failed or len(pipelined) < len(MAPPERS) * len(WORKER_COUNTS)
    print_table(entries)
    print_targets(entries, pipelined)
    report = Report(
        benchmark="dispatch",
        mode=mode,
        host=host,
        budget={
            "warmup": budget.warmup,
            "duration_s": budget.duration_s,
            "max_round_trips": budget.max_round_trips,
        },
        results=entries,
        skipped=skipped,
        pipelined=pipelined,
    )
    note = f"{host['cpus_usable']} CPUs, Python {host['python']}, {mode} run"
    publish(opts.json_path, report, lambda png: plot(entries, pipelined, png, note) if entries else None)
    return 1 if failed else 0
