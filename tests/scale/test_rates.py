"""A rate right traded to an agent on another node re-rates its bucket there.

Two nodes in one process, wired as their supervisors wire them but sharing nothing in memory: each
has its own ``PostgresLedger``, ``PostgresEventLog`` and ``RedisRelay`` on the same database and Redis
namespace, its own buckets and economy, and runs one agent. Alice (node A) gives Bob (node B) some of
her ``cpu_rate``: node A re-rates Alice at once; node B learns of the trade only through the event
relayed by Redis, reads Bob's new holding from the shared ledger and re-rates his bucket, waking him
if he was waiting for CPU. A restarted node B builds Bob's bucket at the new rate from the ledger.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from runtime.actions import Noop
from runtime.buckets import Buckets, Estimator
from runtime.config import AgentConfig, Config, EconomyConfig
from runtime.economy import Economy, open_economy
from runtime.events.postgres import PostgresEventLog
from runtime.events.redis import RedisRelay
from runtime.ledger import SetBuckets, Transfer
from runtime.ledger.postgres import PostgresLedger
from runtime.pool import WorkerPool
from runtime.store.git import GitStore
from runtime.supervisor import emitter
from runtime.world import World


def _config(agent: str, millicores: int) -> Config:
    # A small burst: Bob's bucket can be drained, so that he waits for CPU when the trade arrives.
    return Config(
        economy=EconomyConfig(burst_seconds=1.0),
        agents=[AgentConfig(id=agent, brain="scripted", policy=[Noop()], cpu_rate=millicores)],
    )


class Side:
    """One node: its own connections to the shared servers, its buckets and its economy."""

    def __init__(self, name: str, cfg: Config, pg_url: str, redis_url: str, namespace: str, store: Path) -> None:
        self.ledger = PostgresLedger(pg_url)
        self.events = PostgresEventLog(pg_url)
        self.relay = RedisRelay(redis_url, self.events, namespace=namespace, node=name)
        self.store = GitStore(store)
        self.buckets = Buckets()
        pool = WorkerPool(cfg.pool)  # never started: a trade runs no task
        open_economy(cfg, self.ledger, pool.info, self.buckets, node=True)
        self.economy = Economy(pool, self.ledger, self.buckets, Estimator(0.05), node=name)
        self.world = World(self.store, self.economy, emitter(self.events))

    def close(self) -> None:
        self.relay.close()
        self.events.close()
        self.store.close()
        self.ledger.close()


def test_a_rate_right_traded_across_nodes_rerates_the_recipient_there(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        a = Side("node-a", _config("alice", 1600), pg_url, redis_url, namespace, tmp_path / "a.git")
        b = Side("node-b", _config("bob", 200), pg_url, redis_url, namespace, tmp_path / "b.git")
        try:
            follower = asyncio.create_task(b.economy.follow_rates(b.events, "bob"))
            # Bob owes 2 CPU-seconds: at 0.2 CPU/s he would wait 10 s for a 0.05 s task.
            b.buckets.charge("bob", "cpu", 2.0 + b.buckets.level("bob", "cpu"))
            bob_waits = asyncio.create_task(b.buckets.acquire("bob", "cpu", 0.05))
            await asyncio.sleep(0.2)
            assert b.buckets.blocked("bob")
            await a.world.transfer(Transfer(id="trade-1", src="alice", dst="bob", asset="cpu_rate", amount=1200))
            assert a.buckets.get("alice", "cpu").rate == pytest.approx(0.4)  # her own node: at once
            async with asyncio.timeout(30):
                while b.buckets.get("bob", "cpu").rate != pytest.approx(1.4):
                    await asyncio.sleep(0.05)
                # 2 CPU-seconds of debt at 1.4 CPU/s: admitted soon after the trade, not ten seconds on.
                await bob_waits
            assert b.ledger.balance("bob", "cpu_rate") == 1400
            persisted = [e.op for e in b.ledger.journal() if isinstance(e.op, SetBuckets) and e.op.agent == "bob"]
            assert [op.id for op in persisted] == ["rate:trade-1:bob"]
            assert b.relay.delivered >= 1
            follower.cancel()
        finally:
            a.close()
            b.close()
        # Node B restarts: Bob's bucket is built at the rate he now holds.
        again = Side("node-b", _config("bob", 200), pg_url, redis_url, namespace, tmp_path / "b.git")
        try:
            assert again.buckets.get("bob", "cpu").rate == pytest.approx(1.4)
        finally:
            again.close()

    asyncio.run(body())
