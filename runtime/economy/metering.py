"""The supervisor's own CPU, measured per agent: what it spends acting, serving and remembering for an
agent is that agent's to pay, and only the rest is named overhead.

Where the time is measured (``time.thread_time_ns``, the CPU clock of the running thread)::

    event loop thread   an agent's turn (``Agent.step``, ``perform``) and the answer to each of its confined
                        code's world calls (``WorkerPool.for_agent``: serving, encoding, sending) run as
                        ``AgentMeter.metered`` coroutines: each synchronous step (``send`` to the next
                        ``await`` that suspends) is timed, and the sum is the agent's when the call ends;
                        the pool's dispatch of its tasks (``Economy.run``) is a timed call
                        (``AgentMeter.call``), or a part of the step that makes it
    executor threads    recall/remember (local Qdrant runs in the supervisor) run through
                        ``AgentMeter.to_thread``: the call is timed in the thread that runs it
    everything else     the loop's own work (selector, callbacks, the pool's receive path and the
                        charge it hands each ended task to, status, metrics, imports), the group-commit
                        writers, ZeroMQ's I/O thread: named overhead, one name per thread
                        (``SupervisorBooks.overhead``)

Invariants:

- A span is counted once. A metered coroutine awaited directly inside another runs inside the outer
  one's steps, which already time it: it passes its steps through untimed (``_Local.active``). Time in
  an executor thread is that thread's, never the loop's.
- Only synchronous spans are timed. The meter stops when a step suspends and restarts when the loop
  resumes it, so the work of other coroutines run in between is never billed to this agent.
- Named overhead is measured, not inferred: per thread, the kernel's CPU counter of that thread
  minus what was attributed in it. What neither covers (threads that ended, the gap between the
  readings) is ``SupervisorBooks.unattributed``, compared with the process's ``RUSAGE_SELF``.
- Measured CPU waits in ``pending`` until it is charged: with the agent's next task (the same ledger
  operation, ``Economy._charge``) or, when an agent has no task for ``EconomyConfig.supervisor_flush_s``
  (and when the node stops), as its own ``supervisor`` usage record (``Economy.flush_supervisor``).
  A supervisor that is killed loses at most that much unflushed measurement per agent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import functools
import os
import re
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

from msgspec import Struct

__all__ = ["AgentMeter", "SupervisorBooks", "thread_cpu_ns"]

T = TypeVar("T")

_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
#: Thread names that end in a number (``asyncio_3``, ``ZMQbg/IO/0``) are one named overhead together.
_NUMBERED = re.compile(r"[_/-]?\d+$")
#: Python's default thread name, ``Thread-3 (serve_forever)``: the overhead is named after the target.
_DEFAULT_NAME = re.compile(r"^Thread-\d+ \((.+)\)$")


class _Local(threading.local):
    #: True while a metered step runs on this thread (a nested metered coroutine then passes through).
    active = False


class _Metered(Generic[T]):
    """Awaitable that steps ``coro`` and times each synchronous step (see the module docstring)."""

    __slots__ = ("_agent", "_coro", "_meter")

    def __init__(self, meter: AgentMeter, agent: str, coro: Coroutine[Any, Any, T]) -> None:
        self._meter, self._agent, self._coro = meter, agent, coro

    def __await__(self) -> Generator[Any, None, T]:
        coro, local = self._coro, self._meter._local
        if local.active:  # inside another metered step, which already times this one
            return (yield from coro.__await__())
        clock = time.thread_time_ns
        spent = steps = 0  # added once, when the coroutine ends: one lock and a few dict updates per call
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                local.active = True
                t0 = clock()
                try:
                    out = coro.send(value) if error is None else coro.throw(error)
                except StopIteration as stop:
                    return cast(T, stop.value)
                finally:
                    spent += clock() - t0
                    steps += 1
                    local.active = False
                value, error = None, None
                try:
                    value = yield out
                except GeneratorExit:  # the awaiting task is being destroyed: close the coroutine too
                    coro.close()
                    raise
                except BaseException as exc:  # cancellation and friends go into the coroutine, as with await
                    error = exc
        finally:
            self._meter._add(self._agent, threading.get_native_id(), spent, steps)


class AgentMeter:
    """Measures the supervisor's CPU per agent (see the module docstring); ``enabled=False`` measures
    nothing and adds nothing to any call (``EconomyConfig.metering``)."""

    def __init__(self, enabled: bool = True, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self._clock = clock
        self._local = _Local()
        #: Nanoseconds per agent measured and not yet in a ledger operation.
        self._pending: dict[str, int] = {}
        #: When each agent's pending CPU started to accumulate (``clock``), to flush what waits too long.
        self._since: dict[str, float] = {}
        #: Nanoseconds per agent measured in this run (charged or pending).
        self.totals: dict[str, int] = {}
        #: Nanoseconds attributed per native thread id: the part of that thread's CPU that is not overhead.
        self._by_thread: dict[int, int] = {}
        #: Spans timed so far (a metered step, a call in a thread): what the meter itself costs is about
        #: this many pairs of clock readings.
        self.spans = 0
        self._lock = threading.Lock()

    def metered(self, agent: str, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """``coro`` with its synchronous steps charged to ``agent`` (``coro`` itself when disabled)."""
        return _Metered(self, agent, coro) if self.enabled else coro

    def call(self, agent: str, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` on this thread, its CPU charged to ``agent``: for synchronous work done for an agent
        outside its coroutines. Inside a metered step, which times it already, it is just called."""
        local = self._local
        if not self.enabled or local.active:
            return fn(*args)
        clock = time.thread_time_ns
        local.active = True
        t0 = clock()
        try:
            return fn(*args)
        finally:
            ns = clock() - t0
            local.active = False
            self._add(agent, threading.get_native_id(), ns, 1)

    async def run(self, agent: str, coro: Coroutine[Any, Any, T]) -> T:
        """``metered``, as a coroutine (for ``create_task``)."""
        return await self.metered(agent, coro)

    async def to_thread(
        self, agent: str, fn: Callable[..., T], /, *args: Any, executor: cf.Executor | None = None, **kwargs: Any
    ) -> T:
        """``asyncio.to_thread(fn, …)`` (in a thread of ``executor`` if given, else the loop's default),
        with the CPU the call uses in its thread charged to ``agent``."""
        loop, context = asyncio.get_running_loop(), contextvars.copy_context()  # as asyncio.to_thread does
        if not self.enabled:
            return await loop.run_in_executor(executor, functools.partial(context.run, fn, *args, **kwargs))
        spans: list[tuple[int, int]] = []

        def timed() -> T:
            t0 = time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((threading.get_native_id(), time.thread_time_ns() - t0))

        try:
            return await loop.run_in_executor(executor, functools.partial(context.run, timed))
        finally:
            for tid, ns in spans:  # the thread has finished with the call: it appended before returning
                self._add(agent, tid, ns, 1)

    def _add(self, agent: str, tid: int, ns: int, spans: int) -> None:
        with self._lock:
            self.spans += spans
            pending = self._pending.get(agent)
            if pending is None:
                self._since[agent] = self._clock()
                pending = 0
            self._pending[agent] = pending + ns
            self.totals[agent] = self.totals.get(agent, 0) + ns
            self._by_thread[tid] = self._by_thread.get(tid, 0) + ns

    def take(self, agent: str) -> float:
        """The CPU-seconds measured for ``agent`` and not yet charged, now handed to the caller to charge."""
        with self._lock:
            self._since.pop(agent, None)
            return self._pending.pop(agent, 0) / 1e9

    def waiting(self, older_than_s: float = 0.0) -> list[str]:
        """Agents whose measured CPU has waited at least ``older_than_s`` for a charge."""
        cutoff = self._clock() - older_than_s
        with self._lock:
            return [a for a, since in self._since.items() if since <= cutoff]

    def pending(self) -> float:
        """CPU-seconds measured for all agents and not yet charged."""
        with self._lock:
            return sum(self._pending.values()) / 1e9

    def books(self) -> SupervisorBooks:
        """The supervisor's CPU so far: the kernel's count for the process, what was attributed to agents,
        and the named overhead of each kind of thread (cumulative; subtract two to get a span)."""
        with self._lock:
            attributed = dict(self._by_thread)
            agents = sum(self.totals.values())
        threads = thread_cpu_ns()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        overhead: dict[str, int] = {}
        for tid, (name, ns) in threads.items():
            overhead[name] = overhead.get(name, 0) + ns - attributed.get(tid, 0)
        return SupervisorBooks(
            kernel_ns=round((ru.ru_utime + ru.ru_stime) * 1e9),
            agents_ns=agents,
            overhead_ns=overhead,
            live_threads=len(threads),
        )


class SupervisorBooks(Struct, frozen=True):
    """The supervisor's CPU, split: attributed to agents, named overhead, and what neither covers."""

    #: ``RUSAGE_SELF`` user + system: every thread of the process, the ended ones included.
    kernel_ns: int
    #: Attributed to agents (charged, or pending until the agent's next charge).
    agents_ns: int
    #: Per kind of thread: its CPU minus what was attributed in it.
    overhead_ns: dict[str, int]
    live_threads: int = 0

    def minus(self, earlier: SupervisorBooks) -> SupervisorBooks:
        """What happened between ``earlier`` and this reading."""
        names = self.overhead_ns.keys() | earlier.overhead_ns.keys()
        return SupervisorBooks(
            kernel_ns=self.kernel_ns - earlier.kernel_ns,
            agents_ns=self.agents_ns - earlier.agents_ns,
            overhead_ns={n: self.overhead_ns.get(n, 0) - earlier.overhead_ns.get(n, 0) for n in sorted(names)},
            live_threads=self.live_threads,
        )

    @property
    def accounted_ns(self) -> int:
        """Attributed to agents plus every named overhead."""
        return self.agents_ns + sum(self.overhead_ns.values())

    @property
    def unattributed_ns(self) -> int:
        """The kernel's count minus what the books hold (threads that ended, the gap between readings)."""
        return self.kernel_ns - self.accounted_ns

    @property
    def relative_error(self) -> float:
        """``|accounted - kernel| / kernel`` (0 when nothing ran)."""
        return abs(self.unattributed_ns) / self.kernel_ns if self.kernel_ns else 0.0

    @property
    def agents_share(self) -> float:
        """The part of the kernel's count attributed to agents."""
        return self.agents_ns / self.kernel_ns if self.kernel_ns else 0.0


def _thread_names() -> dict[int, str]:
    names = {t.native_id: _kind(t.name) for t in threading.enumerate() if t.native_id is not None}
    main = threading.main_thread().native_id
    if main is not None:  # the supervisor's event loop runs in its main thread
        names[main] = "event loop"
    return names


def _kind(name: str) -> str:
    default = _DEFAULT_NAME.match(name)
    return default.group(1) if default else _NUMBERED.sub("", name)


def thread_cpu_ns() -> dict[int, tuple[str, int]]:
    """CPU nanoseconds of each live thread of this process, by native id, with the name of its kind:
    Python's name (numbers dropped), else the kernel's; the main thread is ``event loop``.

    Read from ``/proc/self/task/<tid>/schedstat`` (the clock ``thread_time_ns`` reads), else from the
    thread's ``stat`` ticks.
    """
    names = _thread_names()
    out: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        try:
            with open(f"/proc/self/task/{entry}/schedstat") as fh:
                ns = int(fh.read().split()[0])
            name = names.get(tid) or _comm(tid)
        except FileNotFoundError:  # the thread ended, or the kernel keeps no schedstat
            try:
                with open(f"/proc/self/task/{entry}/stat") as fh:
                    stat = fh.read()
            except FileNotFoundError:
                continue
            rest = stat[stat.rindex(")") + 2 :].split()
            ns = (int(rest[11]) + int(rest[12])) * _TICK_NS
            name = names.get(tid) or _NUMBERED.sub("", stat[stat.index("(") + 1 : stat.rindex(")")])
        out[tid] = (name, ns)
    return out


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as fh:
            return _NUMBERED.sub("", fh.read().strip()) or "thread"
    except FileNotFoundError:
        return "thread"
