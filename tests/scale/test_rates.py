"""A rate right traded to an agent on another node re-rates its bucket there.

Two ``Node``s in one process, sharing nothing in memory: each has its own ledger, event log and Redis
relay connections on the same database and Redis namespace, its own pool, buckets and economy, and
runs one agent. Alice (node A) gives Bob (node B) some of
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
from runtime.config import AgentConfig, Config, EconomyConfig, NodeConfig, PoolConfig
from runtime.economy.ledger import SetBuckets, Transfer
from runtime.node import Node


def _node(name: str, position: int, pg_url: str, redis_url: str, namespace: str, data: Path) -> Node:
    """Node ``name`` of a two-node deployment sharing the database: alice is agent 1, bob agent 2."""
    cfg = Config(
        data_dir=str(data),
        economy=EconomyConfig(burst_seconds=1.0),  # Bob's bucket can be drained: he waits for CPU
        pool=PoolConfig(workers=1),
        agents=[
            AgentConfig(id="alice", brain="scripted", policy=[Noop()], cpu_rate=1600),
            AgentConfig(id="bob", brain="scripted", policy=[Noop()], cpu_rate=200),
        ],
        node=NodeConfig(
            agent_range=f"{position}-{position}", id=name, postgres_url=pg_url, redis_url=redis_url, namespace=namespace
        ),
        metrics_port=0,
    )
    return Node(cfg)


def test_a_rate_right_traded_across_nodes_rerates_the_recipient_there(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        a = await _node("node-a", 1, pg_url, redis_url, namespace, tmp_path / "a").start()
        b = await _node("node-b", 2, pg_url, redis_url, namespace, tmp_path / "b").start()
        try:
            follower = asyncio.create_task(b.world.follow_rates("bob"))
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
            ledger = b.backends.ledger
            assert ledger.balance("bob", "cpu_rate") == 1400
            persisted = [e.op for e in ledger.journal() if isinstance(e.op, SetBuckets) and e.op.agent == "bob"]
            assert [op.id for op in persisted] == ["rate:trade-1:bob"]
            assert b.backends.relay is not None and b.backends.relay.delivered >= 1
            follower.cancel()
        finally:
            await a.close()
            await b.close()
        # Node B restarts: Bob's bucket is built at the rate he now holds.
        async with _node("node-b", 2, pg_url, redis_url, namespace, tmp_path / "b") as again:
            assert again.buckets.get("bob", "cpu").rate == pytest.approx(1.4)

    asyncio.run(body())
