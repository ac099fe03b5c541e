"""Pipelining (``pool.prefetch``): tasks wait at a busy worker, run one at a time, each measured alone."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import sys
import time
from pathlib import Path

import msgspec
import pytest

from runtime import protocol as p
from runtime.config import PoolConfig
from runtime.pool import Outcome, TaskFailed, WorkerCrashed, WorkerPool
from runtime.pool.inflight import InflightLog
from runtime.protocol import Burn, Call, Echo, Invoke, Sleep
from tests.integration.conftest import wait_until, with_pool


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
        asked = time.monotonic()
        await second.stop()  # it starts once the first answered, and is stopped then (its worker killed)
        err = second.ended.exception()
        assert isinstance(err, TaskFailed) and err.code == "cancelled"
        assert time.monotonic() - asked < 2.0  # not the 5 s it would have slept
        # The kill can land before the worker began it (uncharged: "cancelled before it ran") or after
        # (charged what it used): which one is the host's scheduling, and both are right.
        assert err.usage is None or err.usage.wall_seconds < 2.0, err.usage
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


def test_a_tracked_task_waits_and_is_recorded_in_flight_from_where_the_task_ahead_ended(tmp_path: Path) -> None:
    """Tracked tasks (the economy's) wait at a worker too; the one that waited is recorded in flight once
    its turn comes, counting from the running one's baseline plus the CPU it was charged: after a crash the
    two records would charge the worker's kernel count once, neither twice nor with a gap."""
    log = InflightLog(tmp_path / "inflight")

    async def main() -> None:
        async with WorkerPool(msgspec.structs.replace(PoolConfig(), prefetch=1), size=1, inflight=log) as pool:
            first = pool.begin(Burn(ms=200), agent="a", track="t1")
            second = pool.begin(Burn(ms=100), agent="b", track="t2")
            assert _waiting(pool) == 1
            assert [r.task_id for r in log.pending()] == ["t1"]  # sent, not begun: not in flight yet
            a = await first.ended
            recs = {r.task_id: r for r in log.pending()}  # t2 began when t1 answered: recorded with t1's end
            assert recs["t1"].finished is not None and recs["t1"].finished.cpu_seconds == a.usage.cpu_seconds
            assert recs["t2"].finished is None and recs["t2"].worker_id == recs["t1"].worker_id
            assert recs["t2"].baseline_cpu == pytest.approx(recs["t1"].baseline_cpu + a.usage.cpu_seconds, abs=1e-9)
            b = await second.ended
            kernel = pool.kernel_cpu()[b.usage.worker_pid]
            # What a recovery would charge t2 from its record covers what t2 measured (its worker's
            # overhead between the two tasks included): nothing of the worker's CPU is missed.
            assert kernel - recs["t2"].baseline_cpu >= b.usage.cpu_seconds - 0.02
            assert b.usage.cpu_seconds == pytest.approx(0.1, rel=0.3) and b.usage.occupancy_seconds < 0.2

    try:
        asyncio.run(main())
    finally:
        log.close()


def _count_frames(pool: WorkerPool) -> list[int]:
    """Record, for every frame of tasks the pool sends from now on, how many tasks it carries."""
    wire = pool._wire
    assert wire is not None
    sizes: list[int] = []
    send = wire.send

    def counting(ident: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Task | p.Tasks):
            sizes.append(len(msg.tasks) if isinstance(msg, p.Tasks) else 1)
        send(ident, msg)

    wire.send = counting  # type: ignore[method-assign]  # the real send, counted
    return sizes


def test_a_burst_travels_several_tasks_to_a_frame_each_measured_alone_and_the_books_match_the_kernel() -> None:
    """Tasks that may wait deep (``depth``) go to a worker several per frame as its answers come back;
    the worker still runs them one at a time and measures each alone: burns are charged their CPU,
    echoes next to nothing, and charges plus named overhead are the kernel's count of the worker."""

    async def body(pool: WorkerPool) -> None:
        sizes = _count_frames(pool)
        rng = random.Random(3)
        specs: list[p.TaskSpec] = [Burn(ms=rng.randint(2, 6)) if rng.random() < 0.3 else Echo() for _ in range(600)]
        outs = await asyncio.gather(*(pool.run(s, agent=f"a{i % 3}", depth=16) for i, s in enumerate(specs)))
        assert max(sizes) > 1 and sum(sizes) == len(specs), sizes
        for spec, out in zip(specs, outs, strict=True):
            if isinstance(spec, Burn):
                assert out.usage.cpu_seconds >= spec.ms / 1000 * 0.95
            else:
                assert out.usage.cpu_seconds < 0.005  # not the burns it waited behind
        assert sum(o.usage.cpu_seconds for o in outs) == pytest.approx(pool.accounts.charged(), rel=1e-9)
        await wait_until(lambda: pool.status().idle == pool.size)
        rec = pool.accounts.reconcile(pool.kernel_cpu())
        assert rec.charged > 0.3 and rec.relative_error < 0.01, rec

    with_pool(body, size=1)


def test_a_task_in_hand_its_worker_died_before_beginning_runs_elsewhere_charged_once(tmp_path: Path) -> None:
    """The worker dies between its last answer and the task it was just sent (its tally says it never
    began it): the task, though not idempotent, runs on the replacement as its first attempt, charged
    there alone; what the dead worker used since its last answer is its own overhead, and the tasks
    that waited behind follow in order."""
    marker = tmp_path / "died"
    argv = [sys.executable, "-m", "tests.integration.forging_worker", "die_before_begin", str(marker)]
    log = InflightLog(str(tmp_path / "inflight"))

    async def main() -> None:
        cfg = PoolConfig(workers=1, prefetch=2, restart_backoff_s=0.05)
        async with WorkerPool(cfg, size=1, worker_command=argv, inflight=log) as pool:
            assert (await pool.run(Echo(data="before"), agent="a")).usage.attempts == 1
            specs = [Echo(data="die-before-begin"), Echo(data="next"), Echo(data="last")]
            outs = await asyncio.gather(*(pool.run(s, agent="b", track=f"t{i}") for i, s in enumerate(specs)))
            assert [o.output for o in outs] == [b"die-before-begin", b"next", b"last"]
            assert [o.usage.attempts for o in outs] == [1, 1, 1] and marker.exists() and pool.crashed == 1
            b = pool.accounts.agents["b"]
            assert b.tasks == 3 and b.failed == 0
            assert b.cpu_seconds == pytest.approx(sum(o.usage.cpu_seconds for o in outs))
            assert pool.accounts.agents["a"].tasks == 1
            log.sample([])  # commits what finished
            recs = {r.task_id: r for r in log.pending()}  # each recorded once, on the worker it ran on
            assert set(recs) == {"t0", "t1", "t2"}
            for i, out in enumerate(outs):
                done = recs[f"t{i}"].finished
                assert recs[f"t{i}"].worker_pid == out.usage.worker_pid and done is not None
                assert done.cpu_seconds == out.usage.cpu_seconds
            rec = pool.accounts.reconcile({}, retired=True)  # the dead worker: charges + named overhead
            assert rec.workers == 1 and rec.relative_error < 0.02, rec

    asyncio.run(main())
    log.close()


def test_a_worker_that_dies_holding_a_frame_of_tasks_charges_its_cpu_once_and_runs_no_task_twice() -> None:
    """The worker dies in the middle of a frame of several tasks. Its last answers may die with it (queued
    in its socket): the tasks it began (by its tally) that have no answer fail ``worker_crashed`` rather
    than run again, the first charged what the kernel counted since its last answer, the others nothing;
    the tasks it held but never began — all after the one that killed it — run on its replacement. No
    task runs twice (the one that kills its worker kills one), the others all succeed once, and the dead
    worker's books are its kernel count."""
    die = pickle.dumps((os._exit, (3,), {}))

    async def body(pool: WorkerPool) -> None:
        sizes = _count_frames(pool)
        specs: list[p.TaskSpec] = [Call(payload=die) if i == 150 else Echo(data=str(i)) for i in range(300)]
        ended = await asyncio.gather(*(pool.run(s, depth=16) for s in specs), return_exceptions=True)
        assert max(sizes) > 1
        failed = [i for i, e in enumerate(ended) if not isinstance(e, Outcome)]
        assert 150 in failed and all(isinstance(ended[i], WorkerCrashed) for i in failed)
        assert failed == list(range(failed[0], 151)) and len(failed) <= 17  # began there, answers lost
        charged = [ended[i] for i in failed if ended[i].usage is not None]  # type: ignore[union-attr]
        assert len(charged) == 1  # the first it held, for all it used since its last answer
        for i, e in enumerate(ended):
            if isinstance(e, Outcome):
                assert e.output == str(i).encode() and e.usage.attempts == 1
        assert pool.crashed == 1
        acct = pool.accounts.agents["default"]
        assert acct.tasks == 300 - len(failed) + 1 and acct.failed == 1
        rec = pool.accounts.reconcile({}, retired=True)
        assert rec.workers == 1 and rec.kernel > 0 and rec.relative_error < 0.02, rec

    with_pool(body, size=1)
