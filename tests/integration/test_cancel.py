"""Cancelling a running task stops it, frees its worker and records it once as ``cancelled``; holding a
worker is paid for (its occupancy), so agents that sleep in confined code cannot starve the others."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from native.tiny_model import write_tiny_model
from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.node import Node
from runtime.pool import TaskFailed, WorkerPool, WorkerPoolExecutor
from runtime.pool.inflight import InflightLog
from runtime.protocol import Burn, Echo, Sleep, Think, decode_think
from runtime.world.world import InvokeError, World
from tests.crash import descendants_of_uid
from tests.harness import begun

T = TypeVar("T")
NOBODY = 65534


def _agent(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "workload": [{"kind": "echo"}], **kw}, AgentConfig)


def with_world(tmp: Path, agents: list[AgentConfig], body: Callable[[World], Awaitable[T]], burst_s: float = 20) -> T:
    """A node's world on a 2-worker pool with a real ledger and store."""
    data = tmp / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    cfg = Config(
        data_dir=str(data),
        pool=PoolConfig(workers=2),
        economy=EconomyConfig(burst_seconds=burst_s, default_estimate_s=0.01),
        agents=agents,
    )

    async def main() -> T:
        async with Node(cfg) as node:
            return await body(node.world)

    return asyncio.run(main())


async def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``cond`` (a kernel counter or a process list: no event to wait on) until it holds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _busy_pid(pool: WorkerPool) -> int:
    (pid,) = [int(x["pid"]) for x in pool.status().workers if x["state"] == "busy"]
    return pid


async def _begun(pool: WorkerPool) -> None:
    """Until the one busy worker's burn is using CPU. A task reaches its worker (busy) before the worker
    begins it, and one cancelled in between never ran and is charged nothing: CI's loaded host once
    cancelled in that window a test that asserts a charge."""
    pid = _busy_pid(pool)
    start = pool.kernel_cpu()[pid]
    await _until(lambda: pool.kernel_cpu()[pid] > start + 0.05, "the burn to use CPU")


# ------------------------------------------------------------------------------------ cancellation


def test_a_cancelled_burn_stops_at_once_is_recorded_cancelled_once_and_frees_its_worker(tmp_path: Path) -> None:
    stop_cpu: list[float] = []

    async def body(w: World) -> None:
        eco, pool = w.economy, w.economy.pool
        task = asyncio.create_task(eco.run("alice", Burn(ms=20_000)))
        await _until(lambda: any(x["state"] == "busy" for x in pool.status().workers), "the burn to start")
        pid = _busy_pid(pool)
        start = pool.kernel_cpu()[pid]
        await _until(lambda: pool.kernel_cpu()[pid] > start + 0.3, "the burn to use 0.3 s of CPU")
        at_cancel = pool.kernel_cpu()[pid]  # the kernel's count (cgroup, else /proc), as the books use
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 2.0
        (dead,) = [a for a in pool.accounts.retired if a.pid == pid]
        assert dead.final_kernel is not None
        stop_cpu.append(dead.final_kernel - at_cancel)
        # The worker is free (replaced) for the next task, served at once.
        t1 = time.monotonic()
        await eco.run("bob", Echo(data="next"))
        assert time.monotonic() - t1 < 10.0
        assert pool.crashed == 0  # a cancel is not a crash

    with_world(tmp_path, [_agent("alice", cpu_rate=800), _agent("bob", cpu_rate=200)], body)
    print(f"CPU used by the burn after its cancel: {stop_cpu[0] * 1000:.1f} ms")
    assert stop_cpu[0] < 0.05
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        records = [r for r in ledger.usage_records() if r.agent == "alice"]
        assert len(records) == 1
        (rec,) = records
        assert rec.error == "cancelled" and not rec.ok and rec.kind == "burn"
        assert rec.cpu_seconds >= 0.3  # what it used before the cancel, from the kernel
        assert check(ledger).ok
    inflight = InflightLog(tmp_path / "data" / "run" / "inflight", readonly=True)
    try:
        assert inflight.pending() == []  # charged durably once: nothing left for a recovery to charge again
    finally:
        inflight.close()


def test_a_cancelled_think_stops_between_tokens_and_keeps_its_worker_and_model(tmp_path: Path) -> None:
    # Big enough that a token takes ~20 ms and this generation (seed 0: 338 tokens) several seconds of CPU.
    model = write_tiny_model(tmp_path / "slow.gguf", hidden=512, n_layers=8)
    spec = Think(system="s", prompt="tell me everything", max_tokens=1500, temperature=1.0, model=str(model))

    async def main() -> None:
        async with WorkerPool(PoolConfig(workers=1, cancel_grace_s=30.0)) as pool:
            # A first think loads the model, so what follows measures generation only.
            warm = await pool.run(msgspec.structs.replace(spec, max_tokens=4))
            pid = warm.usage.worker_pid
            task = pool.begin(spec)
            start = pool.kernel_cpu()[pid]
            await _until(lambda: pool.kernel_cpu()[pid] > start + 0.3, "the generation to use 0.3 s of CPU")
            t0 = time.monotonic()
            await task.stop()
            stop_s = time.monotonic() - t0
            err = task.ended.exception()
            assert isinstance(err, TaskFailed) and err.code == "cancelled", err
            assert "between two tokens" in str(err)
            assert err.usage is not None and err.usage.cpu_seconds >= 0.3
            # It reports the tokens it spent (charged to the agent's token bucket): the prompt and
            # the ~20 ms tokens generated in the 0.3 s before the stop.
            spent = decode_think(err.payload)
            assert spent.finish_reason == "cancelled" and not spent.valid
            assert spent.tokens > decode_think(warm.output).prompt_tokens + 3
            # Stopped by the worker itself (a kill would come after the 30 s grace): same process.
            assert stop_s < 5.0 and pool.pids() == [pid] and pool.started == 1
            after = await pool.run(msgspec.structs.replace(spec, max_tokens=8, seed=3))
            assert after.usage.worker_pid == pid and after.usage.cpu_seconds < 5.0
            print(f"think stopped {stop_s * 1000:.0f} ms after it was asked")

    asyncio.run(main())


def test_a_cancelled_invocation_kills_its_confined_child_and_keeps_its_worker(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        pool = w.economy.pool
        await w.write_artifact("alice", "sleeper", b"import time\ntime.sleep(60)", kind="code")
        task = asyncio.create_task(w.invoke_artifact("bob", "sleeper", cpu_seconds=60, wall_seconds=60))
        await _until(lambda: bool(descendants_of_uid(NOBODY)), "the confined child to start")
        pid = _busy_pid(pool)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 5.0
        assert not descendants_of_uid(NOBODY)
        assert pid in pool.pids() and pool.started == pool.size  # the worker stopped it and lives on
        await w.write_artifact("alice", "ok", b"world.result(1)", kind="code")
        assert (await w.invoke_artifact("bob", "ok")).value == 1

    with_world(tmp_path, [_agent("alice", cpu_rate=400), _agent("bob", cpu_rate=400)], body)
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        bob = sorted((r for r in ledger.usage_records() if r.agent == "bob"), key=lambda r: r.task_id)
        assert [r.error for r in bob] == ["cancelled", ""]
        assert check(ledger).ok


def test_cancelling_pool_run_stops_the_task_and_a_queued_one_never_runs() -> None:
    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            running = asyncio.create_task(pool.run(Burn(ms=20_000), agent="a"))
            await _until(lambda: pool.status().busy == 1, "the burn to reach its worker")
            await _begun(pool)
            queued = pool.begin(Burn(ms=20_000), agent="b")
            assert pool.status().queued == 1
            await queued.stop()
            err = queued.ended.exception()
            assert isinstance(err, TaskFailed) and err.code == "cancelled" and err.usage is None
            assert pool.status().queued == 0 and "b" not in pool.accounts.agents  # never ran, costs nothing
            t0 = time.monotonic()
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert time.monotonic() - t0 < 2.0
            a = pool.accounts.agents["a"]
            assert a.tasks == 1 and a.failed == 1 and a.cpu_seconds > 0  # charged what it used, once
            assert (await pool.run(Echo(data="x"))).output == b"x"
            assert pool.crashed == 0

    asyncio.run(main())


def test_pool_run_leaves_no_unretrieved_failure_behind_however_its_call_ends() -> None:
    """``run`` waits on a future of its own beside the task's ``ended``: a failure reaches the caller
    once, and neither future is left holding an exception nobody looked at (asyncio reports those
    when they are collected), whether the call succeeded, failed or was cancelled."""
    reported: list[str] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx["message"]))
        async with WorkerPool(size=1) as pool:
            assert (await pool.run(Echo(data="x"))).output == b"x"
            with pytest.raises(TaskFailed) as failed:
                await pool.run(Burn(ms=5_000), timeout_s=0.2)
            assert failed.value.code == "deadline_exceeded" and failed.value.usage is not None
            running = asyncio.create_task(pool.run(Burn(ms=20_000), agent="a"))
            await _until(lambda: pool.status().busy == 1, "the burn to reach its worker")
            await _begun(pool)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert pool.accounts.agents["a"].failed == 1
            del failed, running
            gc.collect()

    asyncio.run(main())
    gc.collect()
    assert reported == []


def test_cancelling_a_running_executor_future_stops_its_call() -> None:
    with WorkerPoolExecutor(1) as ex:
        fut = begun(ex, ex.submit(time.sleep, 60))
        assert fut.cancel()
        with pytest.raises(TaskFailed) as err:
            fut.result(timeout=10)
        assert err.value.code == "cancelled" and fut.usage is not None  # it ran: charged what it used
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32  # its worker was replaced


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True])
def test_a_bad_deadline_is_refused_before_anything_runs(bad: float) -> None:
    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            with pytest.raises(ValueError, match="timeout_s must be a positive finite number"):
                await pool.run(Echo(), timeout_s=bad)
            assert pool.accounts.agents == {}

    asyncio.run(main())
    with pytest.raises(ValueError, match=r"got 0"):
        WorkerPoolExecutor(1, config=PoolConfig(task_timeout_s=0))


# --------------------------------------------------------------------------------------- occupancy


def test_agents_sleeping_in_confined_code_pay_for_the_workers_they_hold_and_cannot_starve_a_third(
    tmp_path: Path,
) -> None:
    wall = 3.0  # each sleeper's deadline: its invocation holds a worker this long
    share: list[float] = []

    async def body(w: World) -> None:
        pool = w.economy.pool
        await w.write_artifact("alice", "nap", b"import time\ntime.sleep(60)", kind="code")
        await w.write_artifact("alice", "one", b"world.result(1)", kind="code")

        async def sleeper(name: str) -> None:
            while True:
                with contextlib.suppress(InvokeError):
                    await w.invoke_artifact(name, "nap", cpu_seconds=wall, wall_seconds=wall)

        sleepers = [asyncio.create_task(sleeper(n)) for n in ("sam", "sue")]
        await _until(lambda: len(descendants_of_uid(NOBODY)) >= 2, "both sleepers to hold a worker")
        served: list[float] = []
        for _ in range(4):
            t0 = time.monotonic()
            assert (await w.invoke_artifact("carol", "one")).value == 1
            served.append(time.monotonic() - t0)
        for t in sleepers:
            t.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
        share.append(pool.share)
        print(f"carol served in {', '.join(f'{s:.2f}' for s in served)} s; share {pool.share:g}")
        # The first call waits for a sleeper's deadline at most; after that the sleepers are in debt
        # for what they held and wait for their buckets, so the workers are carol's.
        assert served[0] < wall + 3.0
        # A call starts a sandboxed process: 0.1-0.2 s on a quiet host, near a second on a loaded one;
        # one behind a sleeper would wait for the rest of its 3 s hold.
        assert max(served[1:]) < 1.5, served

    sleepy = {"cpu_rate": 100}  # 0.1 CPU-s per s, 2 CPU-s of burst: less than one held deadline
    with_world(tmp_path, [_agent("alice"), _agent("sam", **sleepy), _agent("sue", **sleepy), _agent("carol")], body, 20)
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        naps = [r for r in ledger.usage_records() if r.agent in ("sam", "sue") and r.error != "cancelled"]
        assert naps
        print(
            "sleepers charged (CPU + occupancy) per 3 s hold:",
            [f"{r.cpu_seconds:.2f}+{r.occupancy_seconds:.2f}" for r in naps],
        )
        for r in naps:
            charged = r.cpu_seconds + r.occupancy_seconds
            # Held about its deadline (the share is 1 on a pool no larger than the container's CPUs),
            # less the time its worker waited for a CPU to wake up and watch the sandbox: on a
            # loaded host a good part of a second, which the kernel counts and the rule leaves out.
            assert charged >= 0.6 * wall * share[0], r
            assert r.occupancy_seconds > 0.5 * wall * share[0] and r.cpu_seconds < 0.5 * wall, r
        assert check(ledger).ok


def test_a_sleeping_task_pays_its_workers_share_and_a_computing_one_its_cpu() -> None:
    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            nap = await pool.run(Sleep(ms=500), agent="sleepy")
            assert nap.usage.cpu_seconds < 0.1
            assert nap.usage.charged_seconds >= 0.9 * 0.5 * pool.share
            assert nap.usage.occupancy_seconds == pytest.approx(nap.usage.charged_seconds - nap.usage.cpu_seconds)
            burn = await pool.run(Burn(ms=400), agent="busy")
            # Computing all along it pays its CPU, and a surcharge only for time the host's other load
            # kept it off the CPU while it held the worker (its wall, plus the messages around it).
            u = burn.usage
            assert u.cpu_seconds <= u.charged_seconds <= max(u.cpu_seconds, (u.wall_seconds + 0.1) * pool.share)
            sleepy = pool.accounts.agents["sleepy"]
            assert sleepy.occupancy_seconds == pytest.approx(nap.usage.occupancy_seconds)
            # The kernel's books hold CPU only: the surcharge is not a CPU measurement.
            assert pool.accounts.charged() == pytest.approx(nap.usage.cpu_seconds + burn.usage.cpu_seconds)

    asyncio.run(main())
