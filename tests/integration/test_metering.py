"""The supervisor's own CPU, charged per agent (``runtime.economy.metering``), on a real node: real
workers, LMDB ledger, Git store and local Qdrant in this process."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from runtime.actions import AgentAction, InvokeArtifact, ReadArtifact, RecallMemories, Remember, TransferScrip, perform
from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.ledger.check import check
from runtime.economy.metering import SupervisorBooks
from runtime.errors import AecoError
from runtime.node import Node
from runtime.ops.live import frame, plain

T = TypeVar("T")

AGENTS = ("alice", "bob", "carol")


def _agent(name: str) -> AgentConfig:
    return msgspec.convert(
        {"id": name, "workload": [{"kind": "echo"}], "cpu_rate": 500, "scrip": 100_000, "disk_quota_mb": 8},
        AgentConfig,
    )


def with_node(tmp: Path, body: Callable[[Node], Awaitable[T]], *, metering: bool = True) -> T:
    data = tmp / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    cfg = Config(
        data_dir=str(data),
        pool=PoolConfig(workers=2),
        economy=EconomyConfig(burst_seconds=100, metering=metering),
        agents=[_agent(a) for a in AGENTS],
    )

    async def main() -> T:
        async with Node(cfg, memory=True) as node:
            return await body(node)

    return asyncio.run(main())


def _supervisor_charged(node: Node, agent: str) -> float:
    return sum(r.supervisor_cpu_seconds for r in node.backends.ledger.usage_records() if r.agent == agent)


#: Confined code that reads a 700 KiB artifact through the world channel, again and again.
READER = b"n = 0\nfor _ in range(world.args):\n    n += len(world.read_artifact('big'))\nworld.result(n)"


def test_an_agent_whose_code_makes_the_supervisor_work_pays_for_it_with_the_task(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        w, meter = node.world, node.economy.meter
        await w.write_artifact("alice", "big", random.randbytes(700 << 10))
        await w.write_artifact("alice", "reader", READER, kind="code")
        await node.economy.flush_supervisor()  # alice's writes are charged: what follows is the invocations'
        assert node.buckets.level("bob", "cpu") == node.buckets.get("bob", "cpu").capacity  # full, so no refill
        heavy = await w.invoke_artifact("bob", "reader", 100)
        light = await w.invoke_artifact("carol", "reader", 1)
        assert heavy.value == 100 * (700 << 10) and light.value == 700 << 10
        records = {r.agent: r for r in node.backends.ledger.usage_records() if r.kind == "invoke"}
        print(
            f"supervisor CPU charged with the invocation: 100 reads of 700 KiB "
            f"{records['bob'].supervisor_cpu_seconds * 1000:.1f} ms, one read "
            f"{records['carol'].supervisor_cpu_seconds * 1000:.2f} ms"
        )
        # Serving 100 reads of 700 KiB is real work, charged in the invocation's own usage record.
        assert records["bob"].supervisor_cpu_seconds > 0.02
        assert records["bob"].supervisor_cpu_seconds > 10 * records["carol"].supervisor_cpu_seconds
        assert records["bob"].supervisor_cpu_seconds == _supervisor_charged(node, "bob")
        assert meter.pending() == 0.0  # nothing measured waits: it rode with the tasks
        view = plain(frame(node.pool, [], 1.0, w))
        assert "supervisor: agents" in view and "books vs kernel, supervisor and workers together" in view
        # The bucket paid the worker's CPU (or its occupancy) and the supervisor's, in that one operation.
        bob = records["bob"]
        paid = bob.cpu_seconds + bob.occupancy_seconds + bob.supervisor_cpu_seconds
        assert records["bob"].buckets["cpu"].level == pytest.approx(node.buckets.get("bob", "cpu").capacity - paid)

    with_node(tmp_path, body)


def _mixed(i: int, agent: str) -> AgentAction:
    """Mostly reads and transfers, with recalls and confined invocations among them."""
    match i % 20:
        case 0:
            return InvokeArtifact(id="reader", args=3)
        case 1 | 2:
            return RecallMemories(query=f"what did {agent} see at step {i}", k=3)
        case 3:
            return Remember(text=f"{agent} was here at step {i}")
        case n if n % 2:
            return ReadArtifact(id="big")
        case _:
            return TransferScrip(to=AGENTS[(AGENTS.index(agent) + 1) % len(AGENTS)], amount=1)


def test_over_a_thousand_mixed_actions_the_books_match_the_supervisors_kernel_counter(tmp_path: Path) -> None:
    n_actions = 1002

    async def act(node: Node, agent: str, count: int) -> int:
        done = 0
        for i in range(count):
            try:
                await perform(node.world, agent, _mixed(i, agent))
            except AecoError:
                continue
            done += 1
        return done

    async def body(node: Node) -> tuple[SupervisorBooks, dict[str, float], dict[str, int], int]:
        w, meter = node.world, node.economy.meter
        await w.write_artifact("alice", "big", random.randbytes(64 << 10))
        await w.write_artifact("alice", "reader", READER, kind="code")
        await w.remember("alice", "a first memory")  # the embedder and the collection are warm
        await node.economy.flush_supervisor()
        charged0 = {a: _supervisor_charged(node, a) for a in AGENTS}
        totals0 = dict(meter.totals)
        first = meter.books()
        done = await asyncio.gather(*(act(node, a, n_actions // len(AGENTS)) for a in AGENTS))
        await node.economy.flush_supervisor()
        books = meter.books().minus(first)
        charged = {a: _supervisor_charged(node, a) - charged0[a] for a in AGENTS}
        measured = {a: meter.totals.get(a, 0) - totals0.get(a, 0) for a in AGENTS}
        assert check(node.backends.ledger).ok
        return books, charged, measured, sum(done)

    books, charged, measured, done = with_node(tmp_path, body)
    print(
        f"{done} actions: supervisor {books.kernel_ns / 1e9:.3f} CPU-s (RUSAGE_SELF), agents "
        f"{books.agents_ns / 1e9:.3f} s ({books.agents_share:.1%}), overhead "
        + ", ".join(f"{k} {v / 1e9:.3f} s" for k, v in books.overhead_ns.items() if v)
        + f"; unattributed {books.unattributed_ns / 1e9:+.4f} s ({books.relative_error:.2%})"
    )
    assert done >= 0.95 * n_actions  # the mix really ran (a few transfers may be refused)
    assert books.relative_error <= 0.02
    # Every agent was charged, and exactly what was measured for it went into the ledger.
    for a in AGENTS:
        assert charged[a] > 0.01
        assert abs(charged[a] - measured[a] / 1e9) < 1e-6
    assert books.agents_ns == sum(measured.values())
    assert books.agents_share > 0.25  # most of the work done for agents is billed, not overhead


def test_metering_off_measures_nothing_and_charges_nothing(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        assert not node.economy.meter.enabled
        await node.world.write_artifact("alice", "note", b"hello")
        for _ in range(20):
            await perform(node.world, "bob", ReadArtifact(id="note"))
        await node.economy.flush_supervisor()
        assert node.economy.meter.totals == {}
        assert all(r.supervisor_cpu_seconds == 0.0 for r in node.backends.ledger.usage_records())

    with_node(tmp_path, body, metering=False)
