"""``WorkerPoolExecutor`` passes the same generic executor tests as ProcessPoolExecutor."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import pytest

from runtime.errors import AecoError
from runtime.pool import UsageFuture, WorkerCrashed, WorkerPool, WorkerPoolExecutor
from runtime.pool import process as process_module
from runtime.protocol import Echo
from tests.harness import begun

F = TypeVar("F", bound=cf.Future[Any])


class CustomError(Exception):
    """An exception type the caller must get back as itself."""


def square(x: int) -> int:
    return x * x


def slow_square(x: int, delay: float = 0.05) -> int:
    time.sleep(delay)
    return x * x


def started(fut: F) -> F:
    """``fut`` once it runs (a worker holds it: it can no longer be cancelled); fails after 30 s."""
    deadline = time.monotonic() + 30
    while not fut.running():
        assert not fut.done() and time.monotonic() < deadline, fut
        time.sleep(0.001)
    return fut


def fail(message: str) -> None:
    raise CustomError(message)


def _exit_here() -> None:
    sys.exit(3)


class ExitWhenUnpickled:
    """A result whose unpickling raises SystemExit (in the supervisor, not in the worker)."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _exit_here, ()


def exit_when_unpickled() -> ExitWhenUnpickled:
    return ExitWhenUnpickled()


def failing_init(message: str) -> None:
    raise ValueError(message)


def kwargs_echo(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


@pytest.fixture(params=["ProcessPoolExecutor", "WorkerPoolExecutor"])
def make(request: pytest.FixtureRequest) -> Iterator[type[cf.Executor]]:
    yield cf.ProcessPoolExecutor if request.param == "ProcessPoolExecutor" else WorkerPoolExecutor


def test_submit_returns_the_result(make: type[cf.Executor]) -> None:
    with make(2) as ex:  # type: ignore[call-arg]
        assert ex.submit(square, 7).result(timeout=30) == 49
        assert ex.submit(kwargs_echo, 1, b=2).result(timeout=30) == ((1,), {"b": 2})


def test_map_keeps_order(make: type[cf.Executor]) -> None:
    with make(2) as ex:  # type: ignore[call-arg]
        delays = [0.05 * ((7 * i) % 5) for i in range(20)]  # finishing order differs from input order
        assert list(ex.map(slow_square, range(20), delays, timeout=60)) == [i * i for i in range(20)]
        assert list(ex.map(square, [])) == []


def test_exceptions_propagate_with_their_type(make: type[cf.Executor]) -> None:
    with make(2) as ex:  # type: ignore[call-arg]
        fut = ex.submit(fail, "boom")
        with pytest.raises(CustomError, match="boom"):
            fut.result(timeout=30)
        assert isinstance(fut.exception(), CustomError)
        with pytest.raises(ZeroDivisionError):
            ex.submit(divmod, 1, 0).result(timeout=30)
        results = ex.map(fail, ["first"])
        with pytest.raises(CustomError, match="first"):
            list(results)


def test_shutdown_wait_waits_for_every_future(make: type[cf.Executor]) -> None:
    ex = make(2)  # type: ignore[call-arg]
    futs = [ex.submit(slow_square, i, 0.1) for i in range(6)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == [i * i for i in range(6)]


def test_submit_after_shutdown_raises(make: type[cf.Executor]) -> None:
    ex = make(1)  # type: ignore[call-arg]
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)


def test_pending_futures_can_be_cancelled(make: type[cf.Executor]) -> None:
    with make(1) as ex:  # type: ignore[call-arg]
        first = ex.submit(slow_square, 1, 0.5)
        started(first)  # it holds the one worker
        # ProcessPoolExecutor moves up to max_workers + 1 items to its call queue ahead of time;
        # those can no longer be cancelled, so look at the last few of a longer queue.
        pending = [ex.submit(slow_square, i, 0.2) for i in range(10)]
        cancelled = [f.cancel() for f in pending[-5:]]
        assert all(cancelled)
        assert first.result(timeout=30) == 1
        for f in pending[-5:]:
            assert f.cancelled()
            with pytest.raises(cf.CancelledError):
                f.result()
        assert not first.cancel()  # already finished


def test_shutdown_cancel_futures(make: type[cf.Executor]) -> None:
    ex = make(1)  # type: ignore[call-arg]
    running = started(ex.submit(slow_square, 3, 0.4))
    queued = [ex.submit(slow_square, i, 0.4) for i in range(8)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 9
    assert sum(f.cancelled() for f in queued) >= 5
    assert all(f.done() for f in queued)


def import_module(name: str) -> str:
    importlib.import_module(name)
    return name


def test_a_call_that_imports_numpy_charges_nothing_to_the_next_call() -> None:
    """Importing numpy starts OpenBLAS's threads unless told otherwise: they spin on after the call that
    imported it returned, and the next task on the worker would be charged their CPU."""
    with WorkerPoolExecutor(1) as ex:
        assert ex.submit(import_module, "numpy").result(timeout=60) == "numpy"
        naps = [ex.submit(time.sleep, 0.2) for _ in range(2)]
        for fut in naps:
            fut.result(timeout=30)
            assert fut.usage is not None and fut.usage.cpu_seconds < 0.005, fut.usage


def test_usage_is_attached_to_each_future() -> None:
    with WorkerPoolExecutor(1) as ex:
        # The first call in a worker imports this test module (and pytest): that CPU is real and is
        # charged to it. Measure a second call.
        first = ex.submit(slow_square, 4, 0.0)
        assert first.result(timeout=30) == 16 and first.usage is not None
        fut = ex.submit(slow_square, 4, 0.2)
        assert fut.result(timeout=30) == 16
        assert isinstance(fut, UsageFuture) and fut.usage is not None
        assert fut.usage.wall_seconds >= 0.2
        assert fut.usage.cpu_seconds < 0.02  # sleeping costs (almost) nothing
        assert first.usage.cpu_seconds > fut.usage.cpu_seconds
        assert fut.usage.worker_pid > 0
        failed = ex.submit(fail, "x")
        assert isinstance(failed.exception(timeout=30), CustomError)
        assert failed.usage is not None


def test_an_unpicklable_argument_fails_its_future() -> None:
    with WorkerPoolExecutor(1) as ex:
        fut = ex.submit(square, lambda: 1)
        with pytest.raises(Exception, match="pickle"):
            fut.result(timeout=30)
        assert ex.submit(square, 2).result(timeout=30) == 4


def test_max_workers_must_be_positive() -> None:
    with pytest.raises(ValueError):
        WorkerPoolExecutor(0)


# ------------------------------------------------------------------------- ProcessPoolExecutor's ways


def test_a_result_that_exits_when_unpickled_fails_its_future_and_the_executor_lives_on() -> None:
    with WorkerPoolExecutor(1) as ex:
        err = ex.submit(exit_when_unpickled).exception(timeout=30)
        assert isinstance(err, BrokenProcessPool) and isinstance(err.__cause__, SystemExit)
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32  # its loop still runs
        assert not ex._broken


def test_a_dead_worker_breaks_the_executor_with_a_broken_process_pool_that_has_code_and_usage() -> None:
    ex = WorkerPoolExecutor(1)  # one worker: the one busy is the one running `running`, the rest wait
    try:
        running = begun(ex, ex.submit(time.sleep, 30))
        queued = [ex.submit(time.sleep, 30) for _ in range(3)]
        # The moment the future fails (its callbacks run then), the executor is already broken: code
        # that sees the failure never submits into it (CPython's test_killed_child raced on this).
        refused: list[bool] = []

        def at_failure(_: object) -> None:
            try:
                ex.submit(pow, 2, 3)
            except BrokenProcessPool:
                refused.append(True)
            else:
                refused.append(False)

        running.add_done_callback(at_failure)
        busy = [w for w in ex.pool._workers.values() if w.state == "busy"]
        os.kill(busy[0].pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool) as err:
            running.result(timeout=30)
        assert refused == [True]
        assert isinstance(err.value, WorkerCrashed) and err.value.code == "worker_crashed"
        assert err.value.usage is not None and err.value.usage.worker_pid == busy[0].pid
        for fut in queued:  # every other pending future fails too, as with ProcessPoolExecutor
            assert isinstance(fut.exception(timeout=30), BrokenProcessPool)
        with pytest.raises(BrokenProcessPool, match="died"):
            ex.submit(pow, 2, 3)
    finally:
        ex.shutdown(wait=True)
    assert not ex._executor_manager_thread.is_alive()


def test_a_failing_initializer_breaks_the_executor(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        ex = WorkerPoolExecutor(2, initializer=failing_init, initargs=("no setup today",))
    try:
        assert ex._broken and "initializer" in ex._broken
        assert any("ValueError: no setup today" in r.getMessage() for r in caplog.records)
        with pytest.raises(BrokenProcessPool):
            ex.submit(pow, 2, 3)
    finally:
        ex.shutdown(wait=True)


def test_map_sends_chunksize_inputs_per_task_and_refuses_a_chunksize_below_one() -> None:
    with WorkerPoolExecutor(2) as ex:
        assert list(ex.map(pow, range(25), [2] * 25, chunksize=10)) == [i * i for i in range(25)]
        assert ex.pool.accounts.agents["executor"].tasks == 3  # 10 + 10 + 5
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(pow, [1], [1], chunksize=0)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        WorkerPoolExecutor(1, max_tasks_per_child=0)


def test_dropping_the_last_reference_shuts_the_executor_down() -> None:
    ex = WorkerPoolExecutor(1)
    assert ex.submit(pow, 3, 2).result(timeout=30) == 9
    thread, pids = ex._executor_manager_thread, ex.pool.pids()
    del ex
    gc.collect()
    thread.join(timeout=15)
    assert not thread.is_alive()
    for pid in pids:  # reaped by the pool, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_asyncio_pool_says_clearly_when_it_is_used_out_of_order() -> None:
    async def main() -> None:
        pool = WorkerPool(size=1)
        with pytest.raises(AecoError, match="not started") as before:
            await pool.run(Echo(data="x"))
        assert before.value.code == "closed"
        await pool.start()
        await pool.close()
        with pytest.raises(AecoError, match="cannot be started again") as after:
            await pool.start()
        assert after.value.code == "pool_closed"

    asyncio.run(main())


_ARMED = (
    "import ctypes, signal, time; ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0); "  # as workers.worker does
    "print('armed', flush=True); time.sleep(60)"
)


def test_workers_parent_death_signal_is_tied_to_the_process_not_to_the_thread_that_started_them() -> None:
    procs: list[subprocess.Popen[bytes]] = []

    def start_both() -> None:  # a thread that ends at once, as an executor's loop thread does at shutdown
        argv = [sys.executable, "-c", _ARMED]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE))  # control: forked by this thread
        procs.append(process_module._spawner.popen(argv, stdout=subprocess.PIPE))  # as the pool forks workers
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == b"armed\n"

    thread = threading.Thread(target=start_both)
    thread.start()
    thread.join()
    control, worker = procs
    try:
        assert control.wait(timeout=30) == -signal.SIGKILL  # its forking thread ended: the kernel killed it
        assert worker.poll() is None  # signalled at the same moment, had it been tied to that thread
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def exit_at(x: int, at: int) -> int:
    """``x``, except that the worker dies (exit 3) at ``at``."""
    if x == at:
        os._exit(3)
    return x


def test_a_worker_that_dies_under_a_maps_calls_fails_each_pending_one_and_its_cpu_is_charged_once() -> None:
    ex = WorkerPoolExecutor(1)
    try:
        assert list(ex.map(square, range(3))) == [0, 1, 4]  # the worker has imported this module
        got: list[int] = []
        with pytest.raises(BrokenProcessPool):  # from a result, or from a submit if it dies meanwhile
            got.extend(ex.map(exit_at, range(3000), [2000] * 3000))  # more than wait at a worker at once
        assert got == list(range(len(got))) and len(got) <= 2000
        with pytest.raises(BrokenProcessPool):
            ex.submit(pow, 2, 3)
    finally:
        ex.shutdown(wait=True)
    acct = ex.pool.accounts
    # Each call that ran was charged once, the one the worker died under from the kernel's count, those
    # that never ran nothing: the books of the dead worker are its kernel count, to the rounding.
    assert acct.agents["executor"].tasks >= 3 + len(got) + 1 and acct.agents["executor"].failed == 1
    rec = acct.reconcile({}, retired=True)
    assert rec.workers == 1 and rec.kernel > 0 and rec.relative_error < 0.02, rec
