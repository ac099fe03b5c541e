"""The supervisor forms think batches (``runtime.agents.batcher``) on the real path: real workers, the
tiny random GGUF, the LMDB ledger; and thinks against a remote server made from the supervisor, up to
``llm.remote_inflight`` at once, holding no worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from runtime.agents.batcher import ThinkBatcher
from runtime.agents.loop import DEFAULT_PERSONA, RULES, Agent
from runtime.agents.schema import ACTION_SCHEMA_BYTES, parse_action
from runtime.config import AgentConfig, Config, EconomyConfig, LlmConfig, PoolConfig
from runtime.economy.buckets import Estimator
from runtime.economy.charging import Economy
from runtime.economy.ledger import RecordUsage
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.node import Node
from runtime.ops.live import frame, plain
from runtime.ops.stats import Meter
from runtime.ops.status import Status
from runtime.pool import TaskFailed, WorkerPool
from runtime.protocol import Echo, Think, ThinkReport
from tests.integration.conftest import wait_until
from tests.integration.test_budget import _Completions, stand_in
from tests.integration.test_think_batch import thinkers

T = TypeVar("T")
SYSTEM = f"{DEFAULT_PERSONA}\n{RULES}"
AGENTS = [f"a{i}" for i in range(8)]


def _think(model: Path | str, agent: str, turn: int, **kw: object) -> Think:
    fields: dict[str, object] = {
        "system": SYSTEM,
        "prompt": f"You are {agent}. Scrip: {10 + turn}. News: none.\nReply with one action as JSON.",
        "schema": ACTION_SCHEMA_BYTES,
        "max_tokens": 200,
        "seed": turn,
        "model": str(model),
        **kw,
    }
    return msgspec.convert(fields, Think)


def _with_batcher(
    tmp: Path, agents: list[str], body: Callable[[ThinkBatcher], Awaitable[T]], **batcher: object
) -> tuple[T, list[RecordUsage], float]:
    """A ledger, buckets, two real workers, an economy and a batcher expecting ``agents``; run
    ``body(batcher)``; return what it returned, the usage records, and the CPU the workers' books charged."""
    ledger, buckets = thinkers(tmp, agents)
    charged = 0.0

    async def main() -> T:
        nonlocal charged
        async with WorkerPool(size=2) as pool:
            eco = Economy(pool, ledger, buckets, Estimator(0.01))
            b = ThinkBatcher(eco, **{"think_batch": 8, "lanes": 2, "wait_s": 2.0, **batcher})  # type: ignore[arg-type]
            b.expect(agents)
            try:
                return await asyncio.wait_for(body(b), 240)
            finally:
                await b.close()
                charged = pool.accounts.charged()

    try:
        out = asyncio.run(main())
        records = list(ledger.usage_records())
        report = check(ledger)
        assert report.ok, report.problems
    finally:
        ledger.close()
    return out, records, charged


def test_a_task_runs_on_the_idle_worker_it_prefers() -> None:
    """The pool's hint the batcher uses for affinity: with every worker idle, each task goes to the one
    it names (a hint only: a pid that is not a worker, or not idle, changes nothing)."""

    async def main() -> None:
        async with WorkerPool(size=2) as pool:
            pids = pool.pids()
            await wait_until(lambda: pool.status().idle == 2, 30)
            for pid in [*pids, *reversed(pids), pids[1], pids[1]]:
                assert (await pool.run(Echo(data="x"), prefer=pid)).usage.worker_pid == pid
            assert (await pool.run(Echo(data="x"), prefer=1)).usage.worker_pid in pids

    asyncio.run(main())


def _by_batch(records: list[RecordUsage]) -> dict[str, list[RecordUsage]]:
    out: dict[str, list[RecordUsage]] = {}
    for r in records:
        out.setdefault(r.batch, []).append(r)
    return out


def test_eight_agents_think_in_batches_back_on_the_worker_that_kept_their_prompts(tiny: Path, tmp_path: Path) -> None:
    """8 agents × 3 thinks on 2 workers: every think gets its own valid report and one charge; batches of
    more than one think ran, all 8 at once; the charges add up to what the workers' books measured; an
    agent's later thinks went back to the worker that kept its prompt (prefix-cache hits)."""
    turns = 3

    homes: dict[str, list[int]] = {a: [] for a in AGENTS}

    async def body(b: ThinkBatcher) -> tuple[dict[str, list[ThinkReport]], int, int, list[int]]:
        async def agent(name: str) -> list[ThinkReport]:
            out = []
            for t in range(turns):
                out.append(await b.think(name, _think(tiny, name, t)))
                homes[name].append(b.home[name])
            return out

        reports = await asyncio.gather(*(agent(a) for a in AGENTS))
        t = b.economy.thinking
        return dict(zip(AGENTS, reports, strict=True)), t.batched_peak, t.prefix_hits, b.economy.pool.pids()

    (reports, peak, hits, pids), records, charged = _with_batcher(tmp_path, AGENTS, body)
    for got in reports.values():
        assert len(got) == turns
        for r in got:  # the random model may ramble to max_tokens; what it finishes is an action
            assert r.valid or r.finish_reason == "length", r
            if r.valid:
                parse_action(r.text)
    assert sum(r.valid for got in reports.values() for r in got) >= len(AGENTS) * turns // 2
    thinks = [r for r in records if r.kind == "think"]
    assert sorted(r.agent for r in thinks) == sorted(AGENTS * turns)  # each think charged once
    assert len({r.task_id for r in thinks}) == len(thinks)
    batches = _by_batch(thinks)
    assert all(b for b in batches) and max(len(rs) for rs in batches.values()) > 1
    for name, shares in batches.items():  # <batch>.<i>, i = 0 .. size - 1
        assert sorted(int(r.task_id.rsplit(".", 1)[1]) for r in shares) == list(range(len(shares))), name
    # Each batch's shares sum to its measurement in whole microseconds; the workers' books hold the
    # measurements, so the charges differ from them by the rounding to a microsecond, at most.
    total = sum(r.cpu_seconds for r in thinks)
    assert total > 0 and abs(total - charged) <= 1e-6 * len(batches), (total, charged)
    assert peak == len(AGENTS)  # all eight thought at once
    # Affinity: each agent stayed on the worker that kept its prompt, and so every later think started
    # from it (the first ones found nothing kept: the workers were new).
    assert all(len(set(h)) == 1 and h[0] in pids for h in homes.values()), homes
    assert len({h[0] for h in homes.values()}) == 2  # spread over both workers
    assert hits == len(AGENTS) * (turns - 1)


def test_a_failed_batch_fails_each_agents_think_with_its_code_and_charges_each_once(tmp_path: Path) -> None:
    three = AGENTS[:3]

    async def body(b: ThinkBatcher) -> list[BaseException | ThinkReport]:
        missing = tmp_path / "no-such-model.gguf"
        return await asyncio.gather(*(b.think(a, _think(missing, a, 0)) for a in three), return_exceptions=True)

    outcomes, records, _ = _with_batcher(tmp_path, three, body, lanes=1)
    assert all(isinstance(o, TaskFailed) and o.code == "task_error" for o in outcomes), outcomes
    thinks = [r for r in records if r.kind == "think"]
    assert sorted(r.agent for r in thinks) == three
    assert all(not r.ok and r.error == "task_error" and r.batch == thinks[0].batch for r in thinks)


def test_one_agent_stopping_does_not_lose_the_others_thinks(tiny: Path, tmp_path: Path) -> None:
    """An agent cancelled while its think is in a running batch: its sequence stops, the batch goes on,
    the others get their reports, and all three are charged their shares of it."""
    three = AGENTS[:3]

    async def body(b: ThinkBatcher) -> list[ThinkReport]:
        await b.think(three[0], _think(tiny, three[0], 9, max_tokens=4))  # the worker loads the model
        # Free text, greedy: the random model runs long on these prompts (to max_tokens on most).
        tasks = [
            asyncio.create_task(b.think(a, _think(tiny, a, 0, schema=b"", temperature=0.0, max_tokens=600)))
            for a in three
        ]
        await wait_until(lambda: b.economy.thinking.batched_now == 3 and b.economy.pool.status().busy == 1, 30)
        await asyncio.sleep(0.2)  # a few decode steps in
        tasks[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return [await tasks[0], await tasks[2]]

    finished, records, _ = _with_batcher(tmp_path, three, body, lanes=1, wait_s=0.2)
    assert all(r.completion_tokens > 0 for r in finished), finished
    (shared,) = [rs for rs in _by_batch([r for r in records if r.kind == "think"]).values() if len(rs) == 3]
    assert sorted(r.agent for r in shared) == three and all(r.ok and r.cpu_seconds > 0 for r in shared)
    stopped = next(r for r in shared if r.agent == three[1])
    assert stopped.llm_tokens < max(r.llm_tokens for r in shared), shared  # its sequence ended early


def _node_config(tmp: Path, agents: list[AgentConfig], llm: LlmConfig) -> Config:
    data = tmp / "data"
    data.mkdir(mode=0o700)
    return Config(
        data_dir=str(data), pool=PoolConfig(workers=2), economy=EconomyConfig(burst_seconds=30), llm=llm, agents=agents
    )


def _llm_agent(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "brain": "llm", "cpu_rate": 100, "llm_rate": 5000, **kw}, AgentConfig)


def test_a_node_of_eight_llm_agents_shows_them_thinking_at_once(tiny: Path, tmp_path: Path) -> None:
    """Through the Node the supervisor builds: 8 LLM agents, 2 workers, ``think_batch: auto``. The live
    view and the status show the agents thinking at once; every turn's think is charged once, as its
    share of a batch."""
    cfg = _node_config(tmp_path, [_llm_agent(a) for a in AGENTS], LlmConfig(model=str(tiny), max_tokens=120))

    async def main() -> tuple[int, str, Status, dict[str, int]]:
        async with Node(cfg) as node:
            assert node.sizing.think_batch >= 4 and node.batcher is not None  # 2 workers: all 8 at once
            meter = Meter(node.info)
            node.start_agents()
            most, shown = 0, ""
            crowd = [a for a in node.agents if isinstance(a, Agent)]
            deadline = time.monotonic() + 180
            while min(a.actions + a.rejected for a in crowd) < 3:
                assert time.monotonic() < deadline, [a.actions + a.rejected for a in crowd]
                now = sum(1 for a in crowd if a.status == "thinking")
                if now > most:
                    most, shown = now, frame(node.pool, node.agents, 0.0, node.world).line
                await asyncio.sleep(0.01)
            snap = meter.snapshot(node.limits, node.sizing, node.pool, node.agents, node.economy)
            status = Status.of(snap, plain(frame(node.pool, node.agents, 1.0, node.world, snapshot=snap)), True)
            await node.stop()
            return most, shown, status, {a.id: a.actions + a.rejected for a in crowd}

    most, shown, status, turns = asyncio.run(main())
    assert most == len(AGENTS) and f"{most} thinking" in shown
    assert status.thinking is not None and status.thinking.batched_peak >= 5
    assert status.thinking.largest > 1 and status.thinking.batches > 0
    assert "thinking in batches now" in status.table and "prefix hits" in status.table
    decoded = msgspec.json.decode(msgspec.json.encode(status), type=Status)  # status.json carries them
    assert decoded.thinking == status.thinking
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        report = check(ledger)
        assert report.ok, report.problems
        thinks = [r for r in ledger.usage_records() if r.kind == "think"]
    assert all(r.batch for r in thinks) and max(len(rs) for rs in _by_batch(thinks).values()) > 1
    for agent, n in turns.items():  # one charge per turn, and one for a think the stop cut short
        assert n <= sum(r.agent == agent for r in thinks) <= n + 1


class _Slow(_Completions):
    """The stand-in server, holding each answer a while and counting the requests in flight at once."""

    calls = 0
    now = peak = 0
    count = threading.Lock()
    HOLD_S = 0.3

    def do_POST(self) -> None:
        cls = type(self)
        with cls.count:
            cls.now += 1
            cls.peak = max(cls.peak, cls.now)
        try:
            time.sleep(self.HOLD_S)
        finally:
            # Counted out before the answer is written: counted out after, the client's next request
            # (sent once this answer arrived) could be counted in first, one over the limit it honoured.
            with cls.count:
                cls.now -= 1
        super().do_POST()


def test_remote_thinks_run_from_the_supervisor_up_to_the_in_flight_limit(tmp_path: Path) -> None:
    """6 agents on a remote model with ``remote_inflight: 3``: 3 requests in flight at once, never more,
    and no worker held while they are; each think charged the server's tokens and no worker CPU."""
    agents = [_llm_agent(f"r{i}") for i in range(6)]
    with stand_in(_Slow) as base:
        llm = LlmConfig(model="stand-in", endpoint=base, max_tokens=64, remote_inflight=3)
        cfg = _node_config(tmp_path, agents, llm)

        async def main() -> int:
            async with Node(cfg) as node:
                node.start_agents()
                busy = 0
                while _Slow.calls < 20:
                    busy = max(busy, node.pool.status().busy)
                    await asyncio.sleep(0.01)
                assert node.economy.thinking.remote_peak == 3
                await node.stop()
                return busy

        busy = asyncio.run(main())
    assert _Slow.peak == 3  # the limit, reached and honoured
    assert busy == 0  # no worker waited on a socket
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        report = check(ledger)
        assert report.ok, report.problems
        thinks = [r for r in ledger.usage_records() if r.kind == "think"]
    assert len(thinks) >= 17 and all(r.cpu_seconds == 0 and not r.batch for r in thinks)
    assert all(r.llm_tokens > 0 for r in thinks if r.ok)
    assert sum(r.supervisor_cpu_seconds for r in thinks) > 0  # the requests' CPU here, the agents'
