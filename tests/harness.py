"""Small pieces the tests share: things opened and closed after a test, threads started together, child
processes reaped whatever happened, waiters on an event log."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

if TYPE_CHECKING:
    from runtime.pool import WorkerPoolExecutor
    from runtime.world.events import Event
    from runtime.world.events.base import LogBase

#: The checkout: where ``python -m`` finds the project.
ROOT = Path(__file__).resolve().parents[1]


def python_m(module: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m module args…`` run from the checkout to its end, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s
    )


def start_supervisor(config: Path, *args: str) -> subprocess.Popen[str]:
    """A supervisor on ``config`` without its live view, started from the checkout, its output piped
    as text (the test reads it with ``communicate`` once it has stopped it)."""
    argv = [sys.executable, "-m", "runtime.supervisor", "--config", str(config), "--no-live", *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_dashboard(proc: subprocess.Popen[str], data: Path, timeout_s: float = 60) -> Path:
    """The operator token file of the supervisor ``proc`` running on ``data``, once its dashboard wrote it."""
    token = data / "run" / "dashboard.token"
    deadline = time.monotonic() + timeout_s
    while not token.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no dashboard token"
        time.sleep(0.1)
    return token


FutureT = TypeVar("FutureT", bound=Future[Any])


def begun(ex: WorkerPoolExecutor, fut: FutureT) -> FutureT:
    """``fut`` once its worker began its call, by the worker's own tally (``runtime.host.tally``): a
    worker that dies before that never ran it, and its call is not charged. For an executor whose
    only busy worker holds ``fut``; fails after 30 s."""
    deadline = time.monotonic() + 30
    while not (fut.running() and any(w["begun"] > w["answered"] for w in ex.pool.status().workers)):
        assert not fut.done() and time.monotonic() < deadline, fut
        time.sleep(0.001)
    return fut


class Closable(Protocol):
    def close(self) -> Any: ...


C = TypeVar("C", bound=Closable)


@contextlib.contextmanager
def closing_all(factory: Callable[..., C]) -> Iterator[Callable[..., C]]:
    """``factory`` wrapped so that everything it opened is closed when the block ends (for fixtures that
    hand a test an opener: ``with closing_all(open_x) as make: yield make``)."""
    opened: list[C] = []

    def make(*args: Any, **kwargs: Any) -> C:
        thing = factory(*args, **kwargs)
        opened.append(thing)
        return thing

    try:
        yield make
    finally:
        for thing in opened:
            thing.close()


def together(target: Callable[[], object], n: int, timeout_s: float = 60.0) -> list[BaseException]:
    """Run ``target`` in ``n`` threads at once and wait for them; return what any of them raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), f"a thread is still running after {timeout_s} s"
    return errors


def each_in_a_thread(target: Callable[[int], object], n: int, name: str) -> None:
    """Run ``target(0)`` … ``target(n - 1)`` in threads named ``name-k`` at once, and wait for them all."""
    threads = [threading.Thread(target=target, args=(k,), name=f"{name}-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def acknowledge(lines: list[str], lock: threading.Lock) -> None:
    """Write ``lines`` to stdout as one flushed block (a crash writer's acknowledgements: once a line is
    out, what it names is durable)."""
    if lines:
        with lock:
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            sys.stdout.flush()


def crash_writer_parser(module: str, what: str, *, threads: int, window: int) -> argparse.ArgumentParser:
    """The command line every crash writer takes: the directory it writes ``what`` in, and how it streams
    (``threads`` submitters, ``window`` operations in flight each, until killed or ``--max-seconds``)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}")
    ap.add_argument("dir", type=Path, help=f"the {what}")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--window", type=int, default=window, help="operations in flight per thread")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="stop on our own after this long")
    return ap


#: A crash writer's operations in flight, oldest first: each one's tag (what its acknowledgement says)
#: and its future.
InFlight = collections.deque[tuple[str, Future[Any]]]


def stream_from_threads(
    threads: int,
    window: int,
    max_seconds: float,
    submitter: Callable[[int], Callable[[InFlight], None]],
    settle: Callable[[str, Future[Any], InFlight], str | None],
) -> None:
    """The loop of every crash writer: ``threads`` threads, thread ``k`` adding operations with
    ``submitter(k)`` (its own state) while fewer than ``window`` are in flight, until ``max_seconds``
    and then until none is. A settled operation goes through ``settle`` (which waits for it, may add a
    follow-up, and says what line acknowledges it, if any). The oldest is waited for, then every next
    one already done is taken too, so that one flushed block covers a whole committed group rather
    than one line per syscall: once a line is out, what it names is durable."""
    out_lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def run(k: int) -> None:
        add = submitter(k)
        inflight: InFlight = collections.deque()
        while time.monotonic() < deadline or inflight:
            while len(inflight) < window and time.monotonic() < deadline:
                add(inflight)
            lines: list[str] = []
            while inflight and (not lines or inflight[0][1].done()):
                tag, fut = inflight.popleft()
                line = settle(tag, fut, inflight)
                if line is not None:
                    lines.append(line)
            acknowledge(lines, out_lock)

    each_in_a_thread(run, threads, "submitter")


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (a crash-test child must not go on writing
    into a finished test's directory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (made here) with mount ``options`` (``size=8m``, ``ro`` …) for the
    block; the test is skipped where mounting is not allowed."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def reap(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """Kill and wait for any of ``procs`` still running (a test's ``finally``: no child outlives it)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


class ThreadsafeCalls:
    """Counts the callbacks other threads hand an event loop (``call_soon_threadsafe``: each one wakes the
    loop through its self-pipe) while installed on it (``counting``)."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def counting(loop: Any) -> Iterator[ThreadsafeCalls]:
    """Count ``loop.call_soon_threadsafe`` calls inside the block (the real method still runs)."""
    calls = ThreadsafeCalls()
    real = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.count += 1
        return real(*args, **kwargs)

    loop.call_soon_threadsafe = counted
    try:
        yield calls
    finally:
        del loop.call_soon_threadsafe  # back to the class's method


async def started(log: LogBase, agent: str, **kw: Any) -> asyncio.Task[list[Event]]:
    """A ``wait`` running as a task, returned once it has read the log and sleeps (so it cannot miss an
    event, and what it returns from now on was committed after this)."""
    before = log.sleeping()
    task = asyncio.create_task(log.wait(agent, **kw))
    while log.sleeping() == before and not task.done():
        await asyncio.sleep(0.001)
    return task


async def wake_delays(waiter: LogBase, publishers: Sequence[LogBase], rounds: int, settle_s: float) -> list[float]:
    """Seconds from the publish call of an event ``alice`` waits for on ``waiter`` to her ``wait``
    returning it, once a round. Each round, events she does not want (another agent's, another kind),
    published on each of ``publishers``, leave her asleep for ``settle_s``; the one she wants is published
    on ``publishers[0]``."""
    delays = []
    for i in range(rounds):
        task = await started(waiter, "alice", kinds={"agent_woken"}, since=waiter.last_seq(), timeout=30)
        for log in publishers:
            await log.publish("agent_woken", "bob")
            await log.publish("transfer", "alice")
        await asyncio.sleep(settle_s)
        assert not task.done()
        t0 = time.perf_counter()
        ev = await publishers[0].publish("agent_woken", "alice", round=i)
        assert await task == [ev]
        delays.append(time.perf_counter() - t0)
    return delays
