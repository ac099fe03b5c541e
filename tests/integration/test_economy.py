"""The economy end to end: real pool, real LMDB ledger, buckets admitting and charging every task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.buckets import Buckets
from runtime.economy.charging import Economy, charge
from runtime.economy.ledger import OpenAccount, RecordUsage, Transfer
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.economy.rights import open_economy
from runtime.host import cgroups as cg
from runtime.host.limits import CapacityError
from runtime.node import Node
from runtime.pool import TaskFailed
from runtime.pool.accounting import TaskUsage
from runtime.protocol import Alloc, Burn, Echo

T = TypeVar("T")
MB = 1 << 20


def agent(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "workload": [{"kind": "echo"}], **kw}, AgentConfig)


def config(tmp: Path, agents: list[AgentConfig], burst_s: float = 1.0) -> Config:
    return Config(
        data_dir=str(tmp),
        pool=PoolConfig(workers=2),
        economy=EconomyConfig(burst_seconds=burst_s, default_estimate_s=0.01),
        agents=agents,
    )


def with_economy(
    cfg: Config, body: Callable[[Economy], Awaitable[T]], events: list[tuple[str, str]] | None = None
) -> T:
    """Run ``body`` with the economy of a ``Node`` opened on ``cfg`` (a real pool and ledger); ``events``
    gets the (kind, agent) of every event the run logged."""

    async def main() -> T:
        async with Node(cfg) as node:
            out = await body(node.economy)
            if events is not None:
                await node.events.publish("marker")  # committed in order: every earlier event is durable
                events.extend((e.kind, e.agent or "") for e in node.events.read())
            return out

    return asyncio.run(main())


def test_cpu_is_charged_in_proportion_to_the_rate_rights(tmp_path: Path) -> None:
    """Rates 200 and 100 millicores, both burning flat out for 30 s: charged CPU 2:1 (±10%). The rates
    are low so that the buckets, not a loaded host, hold them back: at 500 and 250 a host busy with
    other work (load 7 on two cores) gave each less than its rate and the charges came out equal."""
    cfg = config(tmp_path, [agent("fast", cpu_rate=200), agent("slow", cpu_rate=100)])

    async def body(eco: Economy) -> None:
        async def burn_loop(name: str) -> None:
            while True:
                await eco.run(name, Burn(ms=40))

        loops = [asyncio.create_task(burn_loop(n)) for n in ("fast", "slow")]
        await asyncio.sleep(30)
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    with_economy(cfg, body)
    with LmdbLedger(tmp_path / "ledger") as ledger:
        cpu = {"fast": 0.0, "slow": 0.0}
        for r in ledger.usage_records():
            # What the bucket was charged: the task's CPU or occupancy, and the supervisor's work for it.
            cpu[r.agent] += r.cpu_seconds + r.occupancy_seconds + r.supervisor_cpu_seconds
        assert check(ledger).ok
    # Each is held to its rate: 30 s × rate + the 1 s burst + one task at most.
    assert cpu["fast"] == pytest.approx(0.2 * 30 + 0.2, abs=0.3)
    assert cpu["slow"] == pytest.approx(0.1 * 30 + 0.1, abs=0.2)
    assert cpu["fast"] / cpu["slow"] == pytest.approx(2.0, rel=0.10)


def test_every_task_has_one_usage_record_with_its_bucket_levels(tmp_path: Path) -> None:
    cfg = config(tmp_path, [agent("alice", cpu_rate=1000)], burst_s=5)

    async def body(eco: Economy) -> list[str]:
        outs = [await eco.run("alice", spec) for spec in (Burn(ms=50), Echo(), Alloc(mb=20), Burn(ms=20))]
        assert [o.usage.cpu_seconds > 0 for o in outs] == [True] * 4
        return [o.agent for o in outs]

    with_economy(cfg, body)
    with LmdbLedger(tmp_path / "ledger") as ledger:
        records = list(ledger.usage_records())
        assert len(records) == 4 and len({r.task_id for r in records}) == 4
        assert sorted(r.kind for r in records) == ["alloc", "burn", "burn", "echo"]
        assert sum(r.cpu_seconds for r in records) == pytest.approx(0.070 + 0.02, abs=0.05)
        assert max(r.memory_bytes for r in records) == pytest.approx(20 * MB, rel=0.1)
        persisted = ledger.buckets("alice")["cpu"]
        charged = sum(r.cpu_seconds + r.occupancy_seconds for r in records)
        assert persisted.level == pytest.approx(5.0 - charged, abs=0.3)
        # Replaying a usage operation (a retry after a crash) charges nothing more.
        first = records[0]
        again = RecordUsage(**{f: getattr(first, f) for f in first.__struct_fields__})
        assert not ledger.apply(again).fresh
        assert len(list(ledger.usage_records())) == 4
        assert check(ledger).ok


def test_a_bucket_in_debt_blocks_its_agent_until_repaid(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    cfg = config(tmp_path, [agent("spender", cpu_rate=250)], burst_s=0.4)  # capacity 0.1 CPU-s

    async def body(eco: Economy) -> float:
        await eco.run("spender", Burn(ms=300))  # admitted on the small default estimate: debt
        level = eco.buckets.level("spender", "cpu")
        assert level < -0.15
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        seen_blocked = False

        async def watch() -> None:
            nonlocal seen_blocked
            while True:
                seen_blocked |= eco.buckets.blocked("spender")
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        await eco.run("spender", Echo())
        watcher.cancel()
        assert seen_blocked
        # The debt (and the next task's estimate, learnt from the burn) is repaid at 0.25 CPU-s/s.
        return loop.time() - t0

    waited = with_economy(cfg, body, events)
    assert waited > 0.7
    assert ("agent_blocked", "spender") in events and ("agent_unblocked", "spender") in events


def test_a_restart_neither_refills_nor_empties_a_bucket(tmp_path: Path) -> None:
    cfg = config(tmp_path, [agent("alice", cpu_rate=500)], burst_s=2)  # capacity 1 CPU-s

    async def spend(eco: Economy) -> float:
        await eco.run("alice", Burn(ms=600))
        return eco.buckets.level("alice", "cpu")

    before = with_economy(cfg, spend)
    assert 0.3 < before < 0.5

    async def look(eco: Economy) -> float:
        # The level as restored: the bucket refills from then on, while the pool starts, at the
        # rate, which depends on how loaded the machine is; nothing was charged since.
        return eco.buckets.get("alice", "cpu").state.level

    after = with_economy(cfg, look)
    assert after == pytest.approx(before, abs=0.01)  # not full (1.0), not empty


def test_trading_a_rate_right_changes_both_buckets_at_once(tmp_path: Path) -> None:
    cfg = config(tmp_path, [agent("alice", cpu_rate=600), agent("bob", cpu_rate=200)], burst_s=1)

    async def body(eco: Economy) -> None:
        assert eco.buckets.get("alice", "cpu").rate == pytest.approx(0.6)
        receipt = await eco.transfer_right(
            Transfer(id="trade-1", src="alice", dst="bob", asset="cpu_rate", amount=300, memo="sold")
        )
        assert receipt.fresh
        assert eco.buckets.get("alice", "cpu").rate == pytest.approx(0.3)
        assert eco.buckets.get("bob", "cpu").rate == pytest.approx(0.5)
        assert eco.ledger.balance("bob", "cpu_rate") == 500

    with_economy(cfg, body)

    async def after_restart(eco: Economy) -> None:
        assert eco.buckets.get("bob", "cpu").rate == pytest.approx(0.5)  # the trade persisted

    with_economy(cfg, after_restart)


def test_cpu_rights_over_capacity_are_refused_at_start(tmp_path: Path) -> None:
    capacity = int(cg.cpu_capacity(cg.discover()) * 1000 * 0.9)
    cfg = config(tmp_path, [agent("greedy", cpu_rate=capacity + 1)])
    with LmdbLedger(tmp_path / "ledger") as ledger, pytest.raises(CapacityError, match="greedy"):
        open_economy(cfg, ledger, cg.discover(), Buckets())
    # Auto agents split what is left evenly.
    cfg = config(tmp_path, [agent("a"), agent("b"), agent("c", cpu_rate=300)])
    with LmdbLedger(tmp_path / "ledger") as ledger:
        open_economy(cfg, ledger, cg.discover(), Buckets())
        rates = {a: ledger.balance(a, "cpu_rate") for a in ("a", "b", "c")}
    assert rates["c"] == 300 and rates["a"] == rates["b"] == (capacity - 300) // 2


def test_a_task_over_its_agents_memory_quota_is_charged_and_fails(tmp_path: Path) -> None:
    cfg = config(tmp_path, [agent("hog", cpu_rate=1000, memory_quota_mb=64)], burst_s=5)

    async def body(eco: Economy) -> None:
        ok = await eco.run("hog", Alloc(mb=32))
        assert ok.usage.task_memory_bytes == pytest.approx(32 * MB, rel=0.1)
        with pytest.raises(TaskFailed) as err:
            await eco.run("hog", Alloc(mb=256))
        assert err.value.code == "memory_exceeded"
        assert err.value.usage is not None and err.value.usage.cpu_seconds > 0
        assert (await eco.run("hog", Echo(data="after"))).output == b"after"

    with_economy(cfg, body)
    with LmdbLedger(tmp_path / "ledger") as ledger:
        records = sorted(ledger.usage_records(), key=lambda r: r.task_id)
        assert [r.ok for r in records].count(False) == 1
        assert check(ledger).ok


def test_a_cancelled_agent_pays_for_what_its_stopped_task_used(tmp_path: Path) -> None:
    cfg = config(tmp_path, [agent("alice", cpu_rate=1000)], burst_s=5)

    async def body(eco: Economy) -> None:
        task = asyncio.create_task(eco.run("alice", Burn(ms=3000)))
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with_economy(cfg, body)
    with LmdbLedger(tmp_path / "ledger") as ledger:
        (record,) = ledger.usage_records()
        # Stopped, not run to its end: it used some of its 3 s, and is recorded as cancelled.
        assert record.error == "cancelled" and not record.ok
        assert 0.0 < record.cpu_seconds < 1.5


# ------------------------------------------------------------------ charges across retries and restarts


Step = tuple[str, float]  # ("task", cost) | ("retry", index) | ("restart", 0)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("task"), st.floats(0.0, 0.5)),
        st.tuples(st.just("retry"), st.floats(0.0, 1.0)),
        st.tuples(st.just("restart"), st.just(0.0)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_no_charge_is_lost_or_doubled_across_retries_and_restarts(
    tmp_path_factory: pytest.TempPathFactory, plan: list[Step]
) -> None:
    """Tasks charged, usage operations re-applied (retries) and supervisor restarts in any order:
    the bucket level restored from the ledger is capacity minus each task's cost exactly once."""
    path = tmp_path_factory.mktemp("ledger")
    clock = [100.0]  # a frozen clock: no refill, so the level is a pure sum of charges

    def open_all() -> tuple[LmdbLedger, Buckets]:
        ledger = LmdbLedger(path, durable=False)
        buckets = Buckets(clock=lambda: clock[0])
        buckets.add("alice", "cpu", 1.0, 2.0, ledger.buckets("alice").get("cpu"))
        return ledger, buckets

    ledger, buckets = open_all()
    ledger.apply(OpenAccount(id="open:alice", account="alice", grants={"cpu_rate": 1000}))
    applied: list[RecordUsage] = []
    costs: list[float] = []
    try:
        for kind, x in plan:
            if kind == "task":
                usage = TaskUsage(x, 0, 0, x, 1, "test")
                op = charge(buckets, "alice", "burn", f"t{len(costs)}", usage, ok=True)
                costs.append(x)
                assert ledger.apply(op).fresh
                applied.append(op)
            elif kind == "retry" and applied:
                assert not ledger.apply(applied[int(x * (len(applied) - 1))]).fresh
            elif kind == "restart":
                ledger.close()
                ledger, buckets = open_all()
        ledger.close()
        ledger, buckets = open_all()
        assert buckets.level("alice", "cpu") == pytest.approx(2.0 - sum(costs), abs=1e-9)
        assert sum(r.cpu_seconds for r in ledger.usage_records()) == pytest.approx(sum(costs), abs=1e-9)
        assert len(list(ledger.usage_records())) == len(costs)
    finally:
        ledger.close()
