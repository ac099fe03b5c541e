"""``runtime.economy.metering`` alone: what a metered coroutine is charged, on a plain event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

from runtime.economy.metering import AgentMeter, SupervisorBooks


def _spin(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


def test_a_nested_metered_coroutine_is_counted_once() -> None:
    meter = AgentMeter()

    async def inner() -> int:
        _spin(20)
        await asyncio.sleep(0)
        _spin(20)
        return 1

    async def outer() -> int:
        _spin(20)
        return await meter.metered("a", inner()) + 1

    async def main() -> SupervisorBooks:
        first = meter.books()
        assert await meter.metered("a", outer()) == 2
        return meter.books().minus(first)

    books = asyncio.run(main())
    assert set(meter.totals) == {"a"}
    # 60 ms spun; counted twice it would be 100 ms, more than the thread used.
    assert 0.055e9 < books.agents_ns < 0.075e9
    assert books.agents_ns <= books.agents_ns + books.overhead_ns["event loop"]


def test_what_other_coroutines_do_while_a_metered_one_waits_is_not_billed_to_it() -> None:
    meter = AgentMeter()

    async def agent() -> None:
        for _ in range(5):
            _spin(2)
            await asyncio.sleep(0)  # the loop runs the burner here

    async def burner() -> None:
        for _ in range(5):
            _spin(20)
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(meter.metered("a", agent()), burner())

    asyncio.run(main())
    assert 0.009e9 < meter.totals["a"] < 0.02e9  # its own 10 ms, not the burner's 100 ms


def test_cancelling_a_metered_coroutine_reaches_it_and_keeps_what_it_used() -> None:
    meter = AgentMeter()
    entered, cleaned = asyncio.Event(), asyncio.Event()

    async def agent() -> None:
        _spin(10)
        entered.set()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    async def main() -> None:
        task = asyncio.ensure_future(meter.metered("a", agent()))
        await entered.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert cleaned.is_set() and task.cancelled()

    asyncio.run(main())
    assert meter.take("a") >= 0.009
    assert meter.take("a") == 0.0  # taken once


def test_a_call_in_a_thread_is_billed_with_the_threads_clock() -> None:
    meter = AgentMeter()

    async def main() -> None:
        await meter.to_thread("a", _spin, 15)

    asyncio.run(main())
    assert 0.014e9 < meter.totals["a"] < 0.03e9
    books = meter.books()
    assert books.agents_ns == meter.totals["a"]


def test_off_the_meter_returns_the_coroutine_itself() -> None:
    meter = AgentMeter(enabled=False)

    async def job() -> int:
        return 3

    coro = job()
    assert meter.metered("a", coro) is coro
    assert asyncio.run(coro) == 3 and meter.totals == {}


def test_what_waits_too_long_for_a_task_is_listed_for_its_own_charge() -> None:
    now = [100.0]
    meter = AgentMeter(clock=lambda: now[0])

    async def act() -> None:
        _spin(1)

    asyncio.run(meter.run("a", act()))
    assert meter.waiting(5.0) == []
    now[0] += 5.0
    assert meter.waiting(5.0) == ["a"]
    assert meter.take("a") > 0 and meter.waiting(0.0) == [] and meter.pending() == 0.0
