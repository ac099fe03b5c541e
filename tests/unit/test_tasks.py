"""Unit tests for ``workers.tasks``: each task kind, and how ``call`` carries exceptions back."""

from __future__ import annotations

import gc
import operator
import pickle
import resource
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.protocol import Alloc, Burn, Call, Echo, Sleep
from workers.measure import ProcStatusMeter
from workers.tasks import TaskError, run

MiB = 1 << 20


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def call_payload(fn: Any, *args: Any, **kwargs: Any) -> Call:
    return Call(payload=pickle.dumps((fn, args, kwargs)))


# --- importable callables used by the ``call`` tests (module level so that pickle finds them) -----


class CustomError(Exception):
    pass


def raise_custom(message: str) -> None:
    raise CustomError(message)


def raise_key_error() -> None:
    table: dict[str, int] = {}
    table.pop("missing")


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled: ``__init__`` needs two arguments, ``args`` holds one."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def raise_two_arg() -> None:
    raise TwoArgError(1, 2)


def raise_holding_lock() -> None:
    raise ValueError(threading.Lock())


class BadStrError(Exception):
    """Unpicklable (holds a lock) and its ``str()`` fails."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())

    def __str__(self) -> str:
        raise RuntimeError("str() of BadStrError failed")


def raise_bad_str() -> None:
    raise BadStrError()


def raise_system_exit() -> None:
    raise SystemExit(3)


def return_unpicklable() -> Any:
    return threading.Lock()


def failing_task(spec: Call) -> TaskError:
    with pytest.raises(TaskError) as info:
        run(spec)
    return info.value


# --- echo, sleep ---------------------------------------------------------------------------------


def test_echo() -> None:
    assert run(Echo(data="x")) == b"x"
    assert run(Echo()) == b""
    assert run(Echo(data="héllo")) == "héllo".encode()


def test_sleep_uses_wall_time_not_cpu() -> None:
    cpu0, t0 = process_cpu(), time.perf_counter()
    assert run(Sleep(ms=100)) == b""
    wall, cpu = time.perf_counter() - t0, process_cpu() - cpu0
    assert wall >= 0.099
    assert cpu < 0.02


# --- burn ----------------------------------------------------------------------------------------


def test_burn_one_thread() -> None:
    before = process_cpu()
    assert run(Burn(ms=100)) == b""
    assert process_cpu() - before == pytest.approx(0.1, rel=0.10)


def test_burn_two_threads_costs_twice() -> None:
    before = process_cpu()
    assert run(Burn(ms=100, threads=2)) == b""
    assert process_cpu() - before == pytest.approx(0.2, rel=0.10)


def test_burn_threads_are_joined() -> None:
    n = threading.active_count()
    run(Burn(ms=10, threads=4))
    assert threading.active_count() == n


# --- alloc ---------------------------------------------------------------------------------------


def test_alloc_touches_then_frees() -> None:
    meter = ProcStatusMeter()
    gc.collect()
    rss_before = vm_rss()
    baseline = meter.start()
    assert run(Alloc(mb=64)) == b""
    # every page was touched: the high-water mark rose by the whole 64 MiB ...
    assert meter.peak() - baseline == pytest.approx(64 * MiB, rel=0.05)
    # ... and it was given back
    gc.collect()
    assert abs(vm_rss() - rss_before) < 4 * MiB


def test_alloc_holds() -> None:
    t0 = time.perf_counter()
    run(Alloc(mb=1, hold_ms=100))
    assert time.perf_counter() - t0 >= 0.099


# --- call ----------------------------------------------------------------------------------------


def test_call_returns_pickled_result() -> None:
    out = run(call_payload(operator.add, 2, 3))
    assert pickle.loads(out) == 5


def test_call_with_kwargs() -> None:
    assert pickle.loads(run(call_payload(int, "ff", base=16))) == 255
    assert pickle.loads(run(call_payload(sorted, [3, 1, 2], reverse=True))) == [3, 2, 1]


def test_call_returning_none() -> None:
    assert pickle.loads(run(call_payload(time.sleep, 0))) is None


def test_call_exception_keeps_type_and_message() -> None:
    err = failing_task(call_payload(raise_custom, "it broke: 42"))
    exc = pickle.loads(err.payload)
    assert type(exc) is CustomError
    assert str(exc) == "it broke: 42"
    # the TaskError's own message is the formatted traceback
    assert "CustomError: it broke: 42" in str(err)
    assert "raise_custom" in str(err)


def test_call_builtin_exception() -> None:
    err = failing_task(call_payload(int, "not a number"))
    exc = pickle.loads(err.payload)
    assert type(exc) is ValueError
    assert str(exc) == "invalid literal for int() with base 10: 'not a number'"


def test_call_key_error() -> None:
    exc = pickle.loads(failing_task(call_payload(raise_key_error)).payload)
    assert type(exc) is KeyError
    assert exc.args == ("missing",)


def test_call_base_exception_is_carried_too() -> None:
    exc = pickle.loads(failing_task(call_payload(raise_system_exit)).payload)
    assert type(exc) is SystemExit
    assert exc.code == 3


def test_call_unpicklable_exception_becomes_runtime_error() -> None:
    err = failing_task(call_payload(raise_holding_lock))
    exc = pickle.loads(err.payload)
    assert type(exc) is RuntimeError
    assert str(exc).startswith("unpicklable ValueError: ")
    assert "ValueError" in str(err)


def test_call_exception_that_does_not_unpickle_becomes_runtime_error() -> None:
    exc = pickle.loads(failing_task(call_payload(raise_two_arg)).payload)
    assert type(exc) is RuntimeError
    assert str(exc) == "unpicklable TwoArgError: 1-2"


def test_call_unpicklable_result_is_a_task_error() -> None:
    exc = pickle.loads(failing_task(call_payload(return_unpicklable)).payload)
    assert isinstance(exc, TypeError)
    assert "lock" in str(exc)


def test_call_bad_payload_is_a_task_error() -> None:
    # As ProcessPoolExecutor: a call its worker cannot read breaks the pool, saying why.
    err = failing_task(Call(payload=b"not a pickle"))
    exc = pickle.loads(err.payload)
    assert isinstance(exc, BrokenProcessPool) and "could not be unpickled" in str(exc)
    assert err.raised == "UnpicklingError"


def test_call_payload_of_wrong_shape_is_a_task_error() -> None:
    err = failing_task(Call(payload=pickle.dumps((len,))))
    exc = pickle.loads(err.payload)
    assert isinstance(exc, BrokenProcessPool) and "not enough values to unpack" in str(exc)
    assert err.raised == "ValueError"


def test_call_unpicklable_exception_with_failing_str_is_still_a_task_error() -> None:
    try:
        run(call_payload(raise_bad_str))
    except TaskError as err:
        assert type(pickle.loads(err.payload)) is RuntimeError
    except Exception as exc:
        pytest.fail(f"call() raised {type(exc).__name__}: {exc}, not TaskError")
    else:
        pytest.fail("call() did not fail")


def test_task_error_defaults() -> None:
    err = TaskError("boom")
    assert str(err) == "boom"
    assert err.payload == b""


def test_unknown_spec_is_a_task_error() -> None:
    with pytest.raises(TaskError) as info:
        run(cast(Any, object()))
    assert "unknown task kind object" in str(info.value)
