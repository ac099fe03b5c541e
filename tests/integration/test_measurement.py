"""Per-task CPU and memory charges, checked against what the tasks really did."""

from __future__ import annotations

import asyncio
import random

import pytest

from runtime.pool import WorkerPool
from runtime.protocol import Alloc, Burn, Echo, Sleep, TaskSpec
from tests.integration.conftest import wait_until, with_pool

MB = 1 << 20
PROBES = ["auto", "off"]  # per-worker cgroups when writable, and the /proc fallback


@pytest.mark.parametrize("cgroups", PROBES)
def test_single_thread_burn_is_charged_its_cpu(cgroups: str) -> None:
    async def body(pool: WorkerPool) -> None:
        for _ in range(3):
            out = await pool.run(Burn(ms=200))
            assert out.usage.cpu_seconds == pytest.approx(0.200, rel=0.05)

    with_pool(body, cgroups=cgroups)


def test_two_threads_releasing_the_gil_are_charged_twice() -> None:
    async def body(pool: WorkerPool) -> None:
        ratios: list[float] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while loop.time() < end and not (ratios and max(ratios) > 1.3):
            u = (await pool.run(Burn(ms=300, threads=2))).usage
            assert u.cpu_seconds == pytest.approx(0.600, rel=0.05)
            ratios.append(u.cpu_seconds / u.wall_seconds)
        # Both threads ran at once: more CPU than wall time, which one thread can never show (both are
        # counted to the microsecond; the worker's idle ZeroMQ thread adds nothing to speak of), and no
        # more than two cores' worth. Other processes on this 2-core host take cores for a while (a
        # busy host showed 0.8 for a dozen runs in a row), so runs go on until one shows a clear
        # overlap, and a minute of a host that never gave both cores at once needs only some; a quiet
        # host shows 1.9-2.0 at the first.
        assert 1.05 < max(ratios) <= 2.1, ratios

    with_pool(body, size=1)


def test_sleep_costs_almost_no_cpu() -> None:
    async def body(pool: WorkerPool) -> None:
        out = await pool.run(Sleep(ms=500))
        assert out.usage.cpu_seconds < 0.010
        assert out.usage.wall_seconds >= 0.5

    with_pool(body, size=1)


@pytest.mark.parametrize("cgroups", PROBES)
def test_memory_peak_is_the_task_and_is_not_charged_twice(cgroups: str) -> None:
    async def body(pool: WorkerPool) -> None:
        big = await pool.run(Alloc(mb=200, hold_ms=50))
        assert big.usage.task_memory_bytes == pytest.approx(200 * MB, rel=0.05)
        assert big.usage.memory_probe == ("cgroup-v1" if cgroups == "auto" else "vmhwm") or (
            cgroups == "auto" and big.usage.memory_probe in ("cgroup-v2", "vmhwm")
        )
        small = await pool.run(Echo(data="after"))
        assert small.usage.worker_pid == big.usage.worker_pid
        assert small.usage.task_memory_bytes < 2 * MB
        assert small.usage.peak_memory_bytes < big.usage.peak_memory_bytes - 150 * MB

    with_pool(body, size=1, cgroups=cgroups)


def _mixed(rng: random.Random) -> TaskSpec:
    r = rng.random()
    if r < 0.4:
        return Burn(ms=rng.randint(1, 15), threads=rng.choice([1, 1, 2]))
    if r < 0.55:
        return Alloc(mb=rng.randint(1, 16))
    if r < 0.65:
        return Sleep(ms=rng.randint(0, 5))
    return Echo(data="x" * rng.randint(0, 100))


@pytest.mark.parametrize("cgroups", PROBES)
def test_charges_plus_overhead_equal_the_workers_cpu(cgroups: str) -> None:
    """Over 1,000 mixed tasks, per-task charges + named overhead == kernel CPU within 1%."""

    async def body(pool: WorkerPool) -> None:
        import asyncio

        rng = random.Random(7)
        agents = [f"a{i}" for i in range(4)]
        specs = [_mixed(rng) for _ in range(1000)]
        outs = await asyncio.gather(*(pool.run(s, agent=agents[i % 4]) for i, s in enumerate(specs)))
        charged = sum(o.usage.cpu_seconds for o in outs)
        assert charged == pytest.approx(pool.accounts.charged(), rel=1e-9)
        # Let every worker's last report land (they report at the end of each task).
        await wait_until(lambda: pool.status().idle == pool.size)
        rec = pool.accounts.reconcile(pool.kernel_cpu())
        assert rec.workers == pool.size
        assert rec.charged > 1.0  # the tasks did burn CPU: the comparison is not 0 against 0
        assert rec.relative_error < 0.01, rec
        assert set(rec.overhead) == {"startup", "idle", "measurement", "exit"}

    with_pool(body, size=2, cgroups=cgroups)


def test_the_queue_is_fair_across_agents() -> None:
    """An agent with 100 tasks queued does not make another agent's 3 tasks wait behind them."""

    async def body(pool: WorkerPool) -> list[str]:
        import asyncio

        order: list[str] = []

        async def one(agent: str) -> None:
            await pool.run(Burn(ms=2), agent=agent)
            order.append(agent)

        hog = [asyncio.create_task(one("hog")) for _ in range(100)]
        await asyncio.sleep(0)  # the hog's tasks are queued first
        light = [asyncio.create_task(one("light")) for _ in range(3)]
        await asyncio.gather(*hog, *light)
        return order

    order = with_pool(body, size=1)
    last_light = max(i for i, a in enumerate(order) if a == "light")
    assert last_light < 10, order[:12]
