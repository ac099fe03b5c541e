"""Pipelining (``pool.prefetch``): tasks wait at a busy worker, run one at a time, each measured alone."""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest

from runtime.pool import TaskFailed, WorkerPool
from runtime.protocol import Burn, Call, Echo, Invoke, Sleep
from tests.integration.conftest import with_pool


def _waiting(pool: WorkerPool) -> int:
    return sum(int(w["waiting"]) for w in pool.status().workers)


def test_a_task_waits_at_a_busy_worker_and_is_measured_and_held_from_its_own_start() -> None:
    async def body(pool: WorkerPool) -> None:
        first = pool.begin(Burn(ms=300), agent="a")
        second = pool.begin(Echo(data="x"), agent="b")
        assert _waiting(pool) == 1  # sent behind the running burn, not kept in the supervisor's queue
        burn, echo = await first.ended, await second.ended
        assert echo.output == b"x" and echo.usage.attempts == 1
        assert burn.usage.cpu_seconds == pytest.approx(0.3, rel=0.2)
        # The echo's own delta, not the burn's: and its 0.3 s in the socket is not held against it.
        assert echo.usage.cpu_seconds < 0.02
        assert echo.usage.occupancy_seconds < 0.1 and echo.usage.wall_seconds < 0.1
        assert pool.accounts.agents["b"].cpu_seconds == pytest.approx(echo.usage.cpu_seconds)

    with_pool(body, size=1, prefetch=1)


def test_without_prefetch_a_busy_worker_is_sent_nothing() -> None:
    async def body(pool: WorkerPool) -> None:
        first = pool.begin(Sleep(ms=200))
        second = pool.begin(Echo())
        assert _waiting(pool) == 0 and pool.status().queued == 1
        await asyncio.gather(first.ended, second.ended)

    with_pool(body, size=1, prefetch=0)


def test_a_task_waiting_at_a_worker_that_dies_is_requeued_uncharged() -> None:
    async def body(pool: WorkerPool) -> None:
        crash = pool.begin(Call(payload=pickle.dumps((os._exit, (3,), {}))), agent="a")
        after = pool.begin(Echo(data="y"), agent="b")
        assert _waiting(pool) == 1
        with pytest.raises(TaskFailed) as err:
            await crash.ended
        assert err.value.code == "worker_crashed" and err.value.usage is not None
        out = await after.ended  # ran on the replacement worker, as its first attempt
        assert out.output == b"y" and out.usage.attempts == 1
        assert out.usage.worker_pid != err.value.usage.worker_pid
        # The crash charged the running task only; the waiting one is charged once, for its own run.
        assert pool.accounts.agents["a"].failed == 1 and pool.accounts.agents["b"].tasks == 1
        assert pool.accounts.agents["b"].cpu_seconds == pytest.approx(out.usage.cpu_seconds)

    with_pool(body, size=1, prefetch=1)


def test_a_task_cancelled_while_it_waits_at_a_worker_is_stopped_when_it_starts() -> None:
    async def body(pool: WorkerPool) -> None:
        first = pool.begin(Sleep(ms=200))
        second = pool.begin(Sleep(ms=5000))
        assert _waiting(pool) == 1
        await second.stop()  # it starts once the first answered, and is stopped then (its worker killed)
        err = second.ended.exception()
        assert isinstance(err, TaskFailed) and err.code == "cancelled" and err.usage is not None
        assert err.usage.wall_seconds < 2.0
        assert (await first.ended).usage.attempts == 1  # the task ahead of it is not disturbed
        assert (await pool.run(Echo(data="z"))).output == b"z"

    with_pool(body, size=1, prefetch=1)


def test_invocations_never_wait_at_a_worker_nor_are_overtaken() -> None:
    async def body(pool: WorkerPool) -> None:
        first = pool.begin(Sleep(ms=200))
        invoke = pool.begin(Invoke(code="def main(args):\n    return 1\n"))
        echo = pool.begin(Echo())
        # The invocation stays queued (a signal to stop the task ahead would reach it), and the echo,
        # queued after it, is not sent ahead of it.
        assert _waiting(pool) == 0 and pool.status().queued == 2
        await invoke.stop()
        await asyncio.gather(first.ended, echo.ended)

    with_pool(body, size=1, prefetch=1)
