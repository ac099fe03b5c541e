"""``WorkerPoolExecutor``: a ``concurrent.futures.Executor`` over a ``WorkerPool``, a drop-in for
``ProcessPoolExecutor`` (CPython's own ``test_concurrent_futures`` runs against it).

Calls are submitted from the caller's thread straight into the pool (under its lock: no event loop is
woken per call); the pool's loop runs in a background thread (``_LoopThread``) that reads results and
resolves futures where they are read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
import pickle
import subprocess
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures.process import (
    BrokenProcessPool,
    _chain_from_iterable_of_lists,
    _get_chunks,
    _process_chunk,
    _RemoteTraceback,
)
from typing import Any, Literal

import msgspec

from runtime import protocol as p
from runtime.config import PoolConfig
from runtime.pool.accounting import TaskUsage
from runtime.pool.pool import WorkerPool
from runtime.pool.task import Outcome, TaskFailed

log = logging.getLogger("runtime.pool")

#: Executors alive in this process, shut down (their pending work finished) when the interpreter exits.
_live_executors: weakref.WeakSet[WorkerPoolExecutor] = weakref.WeakSet()
_exiting = False
_LOGGER = logging.getLogger("concurrent.futures")  # where ProcessPoolExecutor reports an initializer's failure


def _python_exit() -> None:
    """At interpreter exit, before threads are joined (as the stdlib's executors do): refuse new work,
    then finish what every live executor has pending, rather than dropping it with its daemon thread."""
    global _exiting
    _exiting = True
    for ex in list(_live_executors):
        ex.shutdown(wait=True)


getattr(threading, "_register_atexit")(_python_exit)  # noqa: B009 (private: typeshed does not list it)


class UsageFuture(cf.Future[Any]):
    """A ``concurrent.futures.Future`` that also carries what its task cost once it is done."""

    usage: TaskUsage | None = None
    #: Stops the task in its worker (set by the executor that made this future).
    _stop: Callable[[], object] | None = None

    def cancel(self) -> bool:
        """Cancel the call. Unlike ``Future.cancel``, a running call is stopped too: its worker stops
        it (see ``WorkerPool.cancel``), and the future then fails with ``TaskFailed`` (code
        ``cancelled``, ``usage`` what it used), since it did run. False once the call has ended."""
        if super().cancel():
            return True
        if not self.running() or self._stop is None:
            return False
        self._stop()
        return True


def _settle_future(fut: cf.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve ``fut`` unless something else (the executor breaking, a cancel) already did."""
    with contextlib.suppress(cf.InvalidStateError):
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _remote(exc: BaseException, tb: str) -> BaseException:
    """``exc`` with the worker's traceback as its cause, as ProcessPoolExecutor shows it."""
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb}"""')  # type: ignore[arg-type]  # typeshed is wrong: a str
    return exc


class _LoopThread:
    """The pool's event loop, in a thread that holds no reference to the executor: dropping the
    executor's last reference then lets its finalizer stop the pool."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.grace_s = 2.0
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._serve, name="aeco-pool", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        main = self.loop.create_task(self._main())
        while not main.done():
            try:
                self.loop.run_until_complete(main)
            except BaseException:  # e.g. SystemExit from a user's done-callback: the pool must live on
                log.exception("the executor's event loop was interrupted; carrying on")
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.pool.start()
        except BaseException as exc:
            # An initializer that raised broke the executor (``on_broken``), which is then returned
            # broken, as ProcessPoolExecutor's is; anything else is the constructor's error.
            if not self.pool.initializer_error:
                self.start_error = exc
            return
        finally:
            self.started.set()
        await self._stop.wait()
        await self.pool.close(self.grace_s)

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop; nothing if the loop already ended."""
        with contextlib.suppress(RuntimeError):  # closed: the pool is gone and so is what fn would touch
            self.loop.call_soon_threadsafe(fn)

    def stop(self, grace_s: float = 2.0) -> None:
        """Close the pool (running tasks get ``grace_s`` to finish) and end the thread."""
        self.grace_s = min(self.grace_s, grace_s)
        if self._stop is not None:
            self.call(self._stop.set)


#: How many of ``map``'s calls may wait at a busy worker (a frame's most). Deep, because while ``map``
#: submits, its thread lets the pool's loop have the GIL only every switch interval (5 ms): the worker
#: must hold that long a supply of calls. Measured, 20,000 no-ops, 1 worker: 32 deep, 2,000 of them ran
#: while the rest were submitted and 9,700/s in all; 256 deep, 11,000 and 12,700/s; 1,024, no better.
MAP_DEPTH = p.MAX_TASKS_PER_FRAME


class _Burst(cf.Executor):
    """An executor's ``submit`` for ``map``: its calls may wait ``MAP_DEPTH`` deep at a worker
    (``Executor.map`` is the stdlib's own, over this ``submit``)."""

    def __init__(self, executor: WorkerPoolExecutor) -> None:
        self._executor = executor

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> UsageFuture:
        """Submit to the executor as a part of the burst."""
        return self._executor._submit(fn, args, kwargs, MAP_DEPTH)


class WorkerPoolExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` over a ``WorkerPool``, usable wherever ProcessPoolExecutor is
    (CPython's own ``test_concurrent_futures`` runs against it: tests/integration/test_stdlib_futures.py).

    ``submit(fn, *args, **kwargs)`` takes an importable callable (pickled by reference, as with
    ProcessPoolExecutor); the returned future has ``.usage`` (a ``TaskUsage``) once done. A call that
    raises in its worker re-raises here with its type, the worker's traceback as ``__cause__``. The
    pool's event loop runs in a background thread; the workers start with the executor.

    As ProcessPoolExecutor: ``initializer(*initargs)`` runs in each worker before any task (if it
    raises, the executor is broken); ``max_tasks_per_child`` recycles a worker after that many tasks;
    ``mp_context`` is accepted and ignored (workers are always fresh interpreters, like ``spawn``).
    A worker that dies unexpectedly breaks the executor: its task fails with ``WorkerCrashed`` (a
    ``BrokenProcessPool`` with ``code`` and ``usage``), every other pending future with
    ``BrokenProcessPool``, and ``submit`` raises ``BrokenProcessPool`` from then on; the workers are
    stopped. (The asyncio ``WorkerPool`` replaces dead workers instead.) Tasks stopped on purpose
    (``cancel``, a deadline, a memory limit) do not break it. Pending work is finished at interpreter
    exit, and dropping the last reference to the executor shuts it down.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: object = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        config: PoolConfig | None = None,
        agent: str = "executor",
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # One call waits at each worker, as ProcessPoolExecutor queues one beyond its workers.
        cfg = config or PoolConfig(prefetch=1)
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1:
                raise ValueError("max_tasks_per_child must be >= 1")
            cfg = msgspec.structs.replace(cfg, max_tasks_per_worker=max_tasks_per_child)
        boot = pickle.dumps((initializer, initargs), protocol=pickle.HIGHEST_PROTOCOL) if initializer else b""
        self._agent = agent
        self._lock = threading.Lock()
        self._shutdown = False
        #: False, or why the executor is broken (the name and meaning ProcessPoolExecutor gives it).
        self._broken: str | Literal[False] = False
        self._pending: set[UsageFuture] = set()
        self._idle = threading.Condition(self._lock)
        self._pool = WorkerPool(cfg, size=max_workers, initializer=boot)
        brk = weakref.WeakMethod(self._break)  # the pool (held by its thread) must not hold the executor

        def on_broken(reason: str) -> None:
            if (executor_break := brk()) is not None:
                executor_break(reason)

        self._pool.on_broken = on_broken
        self._max_workers = self._pool.size
        self._runner = _LoopThread(self._pool)
        self._runner.thread.start()
        self._runner.started.wait()
        if self._runner.start_error is not None:
            self._runner.thread.join()
            raise self._runner.start_error
        # Bound to the runner, not to self: the finalizer must not keep the executor alive.
        self._finalizer = weakref.finalize(self, self._runner.stop)
        _live_executors.add(self)

    @property
    def pool(self) -> WorkerPool:
        """The underlying pool (read its ``accounts`` and ``status()`` from any thread, racily)."""
        return self._pool

    @property
    def _processes(self) -> dict[int, subprocess.Popen[bytes]]:
        """ProcessPoolExecutor's name for its live worker processes by pid (read racily)."""
        return {w.pid: w.proc for w in list(self._pool._workers.values()) if w.state in ("starting", "idle", "busy")}

    @property
    def _executor_manager_thread(self) -> threading.Thread:
        """ProcessPoolExecutor's name for the thread that runs the pool (ends after ``shutdown``)."""
        return self._runner.thread

    def _break(self, reason: str) -> None:
        """The pool lost a worker or failed: fail every pending future, refuse new work, stop the workers."""
        with self._lock:
            if self._broken:
                return
            self._broken = reason
            pending = list(self._pending)
            self._pending.clear()
            self._idle.notify_all()
        if self._pool.initializer_error:
            _LOGGER.critical("Exception in initializer:\n%s", self._pool.initializer_error)
        broken = f"the worker pool is broken: {reason}"

        def fail_pending() -> None:
            for fut in pending:
                _settle_future(fut, exc=BrokenProcessPool(broken))

        # Called on the pool's loop as a worker's death is handled: its task is failed there with what it
        # cost (``WorkerCrashed``) once the executor is marked broken, and every other pending future
        # right after, by the loop. A future that fails is then never seen before ``submit`` refuses.
        self._runner.call(fail_pending)
        self._runner.stop(grace_s=0.0)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> UsageFuture:
        """Schedule ``fn(*args, **kwargs)`` on a worker; return a future with ``.usage``."""
        return self._submit(fn, args, kwargs, 0)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], depth: int) -> UsageFuture:
        """``submit``, the call allowed to wait ``depth`` deep at a busy worker (see ``WorkerPool.submit``)."""
        fut = UsageFuture()
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(f"the worker pool is broken: {self._broken}")
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self._pending.add(fut)
        try:
            payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            self._settle(fut)
            fut.set_exception(exc)
            return fut
        spec = p.Call(payload=payload)
        settle = self._settle  # the closures below must not keep the executor alive once they ran

        def done(out: Outcome | None, err: TaskFailed | None) -> None:
            try:
                if out is not None:
                    fut.usage = out.usage
                    _settle_future(fut, pickle.loads(out.output))
                elif err is not None:
                    fut.usage = err.usage
                    if err.payload:
                        _settle_future(fut, exc=_remote(pickle.loads(err.payload), err.message))
                    elif err.code == "pool_failed":
                        _settle_future(fut, exc=BrokenProcessPool(err.message))
                    else:
                        _settle_future(fut, exc=err)
            except BaseException as exc:  # a result that cannot be unpickled here, even by SystemExit
                broken = BrokenProcessPool(f"the call's result could not be unpickled: {type(exc).__name__}: {exc}")
                broken.__cause__ = exc
                _settle_future(fut, exc=broken)
            finally:
                settle(fut)

        def claim() -> bool:
            # A future failed already (the executor broke) is not started; the check and the set race
            # only with a break, whose RuntimeError is then expected.
            if fut.cancelled() or not fut.done():
                with contextlib.suppress(RuntimeError):
                    if fut.set_running_or_notify_cancel():
                        return True
            settle(fut)
            return False

        # Queued and sent to a free worker from this thread, under the pool's lock: the pool's loop is
        # not woken for it (it wakes for the result, which resolves the future where it is read).
        task_id = self._pool.submit(spec, done, agent=self._agent, claim=claim, depth=depth)
        fut._stop = functools.partial(self._pool.cancel, task_id)
        return fut

    def _settle(self, fut: UsageFuture) -> None:
        with self._lock:
            self._pending.discard(fut)
            if self._shutdown and not self._pending:  # only shutdown waits for "all settled"
                self._idle.notify_all()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Any:
        """Like ``ProcessPoolExecutor.map``: results in the order of the inputs; ``chunksize`` inputs
        are sent to a worker as one task (``ValueError`` if it is below 1). The calls are a burst: up
        to ``MAP_DEPTH`` of them wait at each busy worker, and travel to it several per frame."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        burst = _Burst(self)
        if chunksize == 1:
            return cf.Executor.map(burst, fn, *iterables, timeout=timeout)
        chunks = cf.Executor.map(
            burst, functools.partial(_process_chunk, fn), _get_chunks(*iterables, chunksize=chunksize), timeout=timeout
        )
        return _chain_from_iterable_of_lists(chunks)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what has not started; stop the workers."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        lock, idle, runner = self._lock, self._idle, self._runner
        if cancel_futures:
            # Submitting sent what a free worker could take (claimed: running), as ProcessPoolExecutor's
            # queue feeds its workers ahead of a shutdown; what is still queued is cancelled.
            for fut in pending:
                if cf.Future.cancel(fut):
                    self._settle(fut)
        if not runner.thread.is_alive():
            return

        def stop_when_idle() -> None:
            with lock:
                while self._pending:
                    idle.wait()
            runner.stop()

        if wait:
            stop_when_idle()
            runner.thread.join()
        else:
            threading.Thread(target=stop_when_idle, daemon=True).start()
