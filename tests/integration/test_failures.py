"""Workers that die, hang, overrun or misbehave: clear errors, exact charges, and a pool that serves on."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal

import pytest

from runtime.pool import TaskFailed, WorkerPool
from runtime.protocol import Burn, Call, Echo
from tests.integration.conftest import wait_until, with_pool


def _busy_worker(pool: WorkerPool) -> int:
    busy = [w for w in pool.status().workers if w["state"] == "busy"]
    assert len(busy) == 1
    return int(busy[0]["pid"])


def test_kill_9_mid_burn_fails_the_task_charges_its_cpu_and_replaces_the_worker() -> None:
    async def body(pool: WorkerPool) -> None:
        before = set(pool.pids())
        task = asyncio.create_task(pool.run(Burn(ms=5000)))
        await wait_until(lambda: pool.status().busy == 1)
        pid = _busy_worker(pool)
        cpu_at_start = pool.kernel_cpu()[pid]
        # Until the kernel counted 0.35 s of the burn, however small a share of a core the host gives it.
        await wait_until(lambda: pool.kernel_cpu()[pid] > cpu_at_start + 0.35, timeout_s=30)
        cpu_at_kill = pool.kernel_cpu()[pid]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TaskFailed) as err:
            await task
        assert err.value.code == "worker_crashed"
        assert f"pid {pid}" in str(err.value) and "signal 9" in str(err.value)
        usage = err.value.usage
        assert usage is not None and usage.worker_pid == pid
        burnt = cpu_at_kill - cpu_at_start  # the kernel's count, read independently of the charge
        assert burnt > 0.3
        assert usage.cpu_seconds == pytest.approx(burnt, rel=0.10)
        assert pool.accounts.agents["default"].failed == 1
        # A new worker takes its place, and later tasks run normally.
        await wait_until(lambda: pool.status().idle == pool.size)
        assert pid not in pool.pids() and len(set(pool.pids()) - before) == 1
        outs = await asyncio.gather(*(pool.run(Burn(ms=20)) for _ in range(6)))
        assert all(o.usage.cpu_seconds == pytest.approx(0.020, rel=0.2) for o in outs)
        assert pool.status().crashed == 1

    with_pool(body, size=2)


def test_an_idempotent_task_is_retried_once_after_a_crash() -> None:
    async def body(pool: WorkerPool) -> None:
        task = asyncio.create_task(pool.run(Burn(ms=400), idempotent=True))
        await wait_until(lambda: pool.status().busy == 1)
        pid = _busy_worker(pool)
        start = pool.kernel_cpu()[pid]
        await wait_until(lambda: pool.kernel_cpu()[pid] > start + 0.1, timeout_s=30)  # by the kernel's count
        os.kill(pid, signal.SIGKILL)
        out = await task
        assert out.usage.attempts == 2
        # Charged for both attempts: the lost first (0.1 s or more) and the full 0.4 s retry.
        assert out.usage.cpu_seconds > 0.49

    with_pool(body, size=2)


def test_a_crash_of_a_non_idempotent_task_is_not_retried() -> None:
    async def body(pool: WorkerPool) -> None:
        crash = Call(payload=pickle.dumps((os._exit, (3,), {})))
        with pytest.raises(TaskFailed) as err:
            await pool.run(crash)
        assert err.value.code == "worker_crashed" and "exit 3" in str(err.value)
        assert err.value.usage is not None and err.value.usage.attempts == 1

    with_pool(body, size=1)


def test_too_many_restarts_fail_the_pool_instead_of_looping() -> None:
    async def body(pool: WorkerPool) -> None:
        crash = Call(payload=pickle.dumps((os._exit, (1,), {})))
        codes = []
        for _ in range(5):
            try:
                await pool.run(crash)
            except TaskFailed as exc:
                codes.append(exc.code)
        assert codes[:3] == ["worker_crashed"] * 3
        assert codes[3:] == ["pool_failed"] * 2
        assert pool.failed is not None and "3 worker crashes" in pool.failed
        with pytest.raises(TaskFailed, match="pool_failed"):
            await pool.run(Echo())

    with_pool(body, size=1, max_restarts=2, restart_window_s=60, restart_backoff_s=0.01)


def test_restarts_back_off_exponentially() -> None:
    async def body(pool: WorkerPool) -> list[float]:
        crash = Call(payload=pickle.dumps((os._exit, (1,), {})))
        loop = asyncio.get_running_loop()
        gaps = []
        for _ in range(3):
            with pytest.raises(TaskFailed):
                await pool.run(crash)
            t0 = loop.time()
            await wait_until(lambda: pool.status().idle == 1)
            gaps.append(loop.time() - t0)
        return gaps

    gaps = with_pool(body, size=1, restart_backoff_s=0.2, restart_backoff_max_s=5)
    # 0.2, 0.4, 0.8 s of back-off plus a start-up each: every gap is longer than the one before.
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8
    assert gaps[2] > gaps[1] > gaps[0]


def test_a_task_over_its_deadline_is_killed_and_charged() -> None:
    async def body(pool: WorkerPool) -> None:
        task = asyncio.create_task(pool.run(Burn(ms=10_000), timeout_s=0.5))
        await wait_until(lambda: pool.status().busy == 1)
        pid = _busy_worker(pool)
        seen = pool.kernel_cpu()[pid]
        with pytest.raises(TaskFailed) as err:
            await task
        assert err.value.code == "deadline_exceeded"
        assert err.value.usage is not None
        # Charged what the kernel counted (at least what it counted from when the burn was seen running)
        # and at most the 0.5 s of wall time it had: how much of that a loaded host gave it may vary.
        (dead,) = [a for a in pool.accounts.retired if a.pid == pid]
        assert dead.final_kernel is not None
        assert dead.final_kernel - seen - 0.005 <= err.value.usage.cpu_seconds < 0.8
        assert err.value.usage.cpu_seconds > 0.02
        await wait_until(lambda: pool.status().idle == 1)
        assert (await pool.run(Echo(data="still here"))).output == b"still here"
        assert pool.status().crashed == 0  # a deadline kill is the task's fault, not a crash

    with_pool(body, size=1)


def test_a_silent_idle_worker_is_killed_and_replaced() -> None:
    async def body(pool: WorkerPool) -> None:
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # alive but silent: only heartbeats can tell
        await wait_until(lambda: pid not in pool.pids() and pool.status().idle == 1, timeout_s=10)
        assert (await pool.run(Echo(data="ok"))).output == b"ok"

    with_pool(body, size=1, heartbeat_s=0.1, heartbeat_timeout_s=1.0)


def test_workers_are_recycled_after_a_task_count() -> None:
    async def body(pool: WorkerPool) -> None:
        first = set(pool.pids())
        for _ in range(12):
            await pool.run(Echo())
        await wait_until(lambda: pool.status().idle == 1)
        assert not first & set(pool.pids())
        assert pool.status().started >= 3 and pool.status().crashed == 0
        # The retired workers' books are closed: their exit CPU is named overhead.
        assert len(pool.accounts.retired) >= 2
        assert all(a.final_kernel is not None for a in pool.accounts.retired)

    with_pool(body, size=1, max_tasks_per_worker=5)


def test_workers_are_recycled_when_they_grow() -> None:
    async def body(pool: WorkerPool) -> None:
        (first,) = pool.pids()
        keep = Call(payload=pickle.dumps((_grow, (40,), {})))
        await pool.run(keep)
        await wait_until(lambda: first not in pool.pids() and pool.status().idle == 1)

    with_pool(body, size=1, max_memory_growth_mb=20)


_HOARD: list[bytearray] = []


def _grow(mb: int) -> None:
    """Keep ``mb`` MiB alive in the worker after the task (a leak)."""
    buf = bytearray(mb << 20)
    buf[::4096] = b"\x01" * (len(buf) // 4096)
    _HOARD.append(buf)
