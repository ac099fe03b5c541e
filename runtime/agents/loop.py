"""An agent: wait for capacity, build its context, think on a worker, act, charge, publish.

The brain is pluggable: ``LlmBrain`` thinks with the worker's local model, constrained to the action
schema; ``ScriptedBrain`` follows a fixed policy at a configurable CPU cost per think, through the same
pipeline (for load tests and benchmarks). Every think is a task on the pool, so it is measured and
charged (CPU, and tokens for the LLM) whatever comes of it. An action that fails validation — output
that is not an action, an action the world refuses, a decision made on a context that changed while
the agent thought — costs the thinking that produced it and nothing else, and the agent is told why.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec
from msgspec import Struct

from runtime.actions import (
    AgentAction,
    DeleteArtifact,
    InvokeArtifact,
    Noop,
    ReadArtifact,
    RecallMemories,
    Remember,
    SleepFor,
    TransferScrip,
    WriteArtifact,
)
from runtime.agents.schema import ACTION_SCHEMA_BYTES, InvalidAction, parse_action
from runtime.economy import Economy
from runtime.events import Event, Events
from runtime.ledger import LedgerError, Transfer
from runtime.memory import MemoryStore, MemoryStoreError
from runtime.pool import TaskFailed
from runtime.protocol import Burn, Embed, Think
from runtime.store import StoreError
from runtime.world import InvokeError, World

AgentStatus = Literal["waiting", "thinking", "acting", "sleeping", "stopped"]


class Thought(Struct, frozen=True):
    """What a brain decided: an action, or why there is none."""

    action: AgentAction | None
    error: str = ""
    tokens: int = 0


class Brain(Protocol):
    """Decides an agent's next action from its context; the deciding runs (and is charged) on a worker."""

    async def think(self, agent: str, context: str) -> Thought:
        """One decision."""
        ...


class ScriptedBrain:
    """A deterministic policy: the given actions in turn, each think burning ``think_ms`` of CPU."""

    def __init__(self, economy: Economy, policy: Sequence[AgentAction], think_ms: int = 5) -> None:
        if not policy:
            raise ValueError("a scripted brain needs at least one action in its policy")
        self.economy = economy
        self._policy = itertools.cycle(policy)
        self.think_ms = think_ms

    async def think(self, agent: str, context: str) -> Thought:
        """Burn the configured CPU on a worker, then take the next action of the policy."""
        await self.economy.run(agent, Burn(ms=self.think_ms))
        return Thought(next(self._policy))


class BudgetSpent(Exception):
    """The agent has no ``llm_budget`` left for a paid model."""


class LlmBrain:
    """Thinks with the worker's llama.cpp model (or an OpenAI-compatible server), constrained to the
    action schema."""

    def __init__(
        self,
        economy: Economy,
        persona: str,
        *,
        model: str = "",
        max_tokens: int = 160,
        endpoint: str = "",
        price_prompt_per_1k: float = 0.0,
        price_completion_per_1k: float = 0.0,
    ) -> None:
        self.economy = economy
        self.persona = persona
        self.model = model
        self.max_tokens = max_tokens
        self.endpoint = endpoint
        self.prices = (price_prompt_per_1k, price_completion_per_1k)
        self._seed = itertools.count(1)

    async def think(self, agent: str, context: str) -> Thought:
        """Generate one action; output that does not parse is a thought without an action."""
        if any(self.prices) and self.economy.ledger.balance(agent, "llm_budget") <= 0:
            raise BudgetSpent(f"{agent} has no llm_budget left for {self.model or 'the paid model'}")
        spec = Think(
            system=self.persona,
            prompt=context,
            schema=ACTION_SCHEMA_BYTES,
            max_tokens=self.max_tokens,
            seed=next(self._seed),
            model=self.model,
            endpoint=self.endpoint,
            price_prompt_per_1k=self.prices[0],
            price_completion_per_1k=self.prices[1],
        )
        out = await self.economy.run(agent, spec)
        report = json.loads(out.output)
        tokens = int(report.get("prompt_tokens", 0)) + int(report.get("completion_tokens", 0))
        try:
            return Thought(parse_action(report.get("text", "")), tokens=tokens)
        except InvalidAction as exc:
            return Thought(None, str(exc), tokens)


class Agent:
    """One agent's loop, run as an asyncio task by the supervisor."""

    def __init__(
        self,
        agent_id: str,
        brain: Brain,
        world: World,
        events: Events,
        memory: MemoryStore | None,
        *,
        memory_quota_bytes: int = 1 << 20,
    ) -> None:
        self.id = agent_id
        self.brain = brain
        self.world = world
        self.events = events
        self.memory = memory
        self.memory_quota_bytes = memory_quota_bytes
        self.state: AgentStatus = "waiting"
        self.actions = 0
        self.rejected = 0
        #: Why recent actions were rejected (the most recent 100), for status displays and tests.
        self.reasons: collections.deque[str] = collections.deque(maxlen=100)
        self.last = ""
        self._recalled: list[str] = []
        #: The last event the agent's context showed it; its cursor moves there after the turn.
        self._seen = 0
        self._others: list[str] = []
        self._first_turn = True
        self._n_context = itertools.count(1)
        self._n = itertools.count(1)

    @property
    def economy(self) -> Economy:
        """The economy the agent's tasks are charged through."""
        return self.world.economy

    @property
    def status(self) -> str:
        """``blocked`` while a bucket holds it back, else its own state."""
        return "blocked" if self.economy.buckets.blocked(self.id) else self.state

    async def run(self, max_actions: int | None = None) -> None:
        """Think and act until cancelled (or ``max_actions`` actions have been decided)."""
        try:
            while max_actions is None or self.actions + self.rejected < max_actions:
                await self.step()
        finally:
            self.state = "stopped"

    async def step(self) -> None:
        """One turn: context, think, check, act, publish."""
        before = self._fingerprint()
        context = self.context()
        self.state = "thinking"
        try:
            thought = await self.brain.think(self.id, context)
        except TaskFailed as exc:
            return await self._reject("think", f"thinking failed: {exc.code}: {exc.detail[:200]}")
        except BudgetSpent as exc:
            # Nothing to think with until someone gives it budget: sleep on it, not in a loop.
            await self._reject("think", str(exc))
            self.state = "sleeping"
            await self.events.wait(
                self.id, kinds={"transfer", "system_reset"}, since=self.events.last_seq(), timeout=60
            )
            return None
        if thought.action is None:
            return await self._reject("think", thought.error)
        if self._fingerprint() != before:
            return await self._reject(_kind(thought.action), "the world changed while you thought; look again")
        self.state = "acting"
        try:
            result = await self.act(thought.action)
        except (StoreError, InvokeError, LedgerError, MemoryStoreError, TaskFailed) as exc:
            return await self._reject(_kind(thought.action), str(exc)[:300])
        self.actions += 1
        self.last = f"{_kind(thought.action)}: {result}"[:120]
        await self.events.publish("action", self.id, action=_kind(thought.action), ok=True, result=result[:200])
        await self._advance()

    async def _advance(self) -> None:
        """Move the agent's durable cursor past the news it has been shown (it survives a restart)."""
        if self._seen > self.events.cursor(self.id):
            await asyncio.wrap_future(self.events.set_cursor(self.id, self._seen))

    async def _reject(self, kind: str, why: str) -> None:
        self.rejected += 1
        self.reasons.append(f"{kind}: {why}")
        self.last = f"{kind} rejected: {why}"[:120]
        await self.events.publish("action", self.id, action=kind, ok=False, reason=why[:300])
        await self._advance()

    def _fingerprint(self) -> tuple[int, int]:
        """What the agent's decision rests on: its scrip and the events addressed to it."""
        return self.economy.ledger.balance(self.id, "scrip"), self.events.last_addressed(self.id, _ADDRESSED)

    def context(self) -> str:
        """The prompt: the time, the agent's holdings and buckets, news, what it can see, its memories."""
        ledger, buckets = self.economy.ledger, self.economy.buckets
        cursor = self.events.cursor(self.id)
        # News is what others did that concerns this agent. Reading scans every event since the cursor,
        # so only when there is some (or on the first turn, for what arrived while the runtime was down).
        fresh = self._first_turn or self.events.last_addressed(self.id, _ADDRESSED) > cursor
        self._first_turn = False
        news = self.events.read(cursor, agent=self.id, kinds=_ADDRESSED, limit=20) if fresh else []
        self._seen = news[-1].seq if news else self._seen
        news = news[-5:]
        visible = [a.id for a in self.world.list_artifacts(self.id)][:10]
        if not self._others or next(self._n_context) % 100 == 0:  # accounts change rarely: look now and then
            self._others = sorted(a for a, kind in ledger.accounts().items() if kind == "agent" and a != self.id)[:10]
        others = self._others
        lines = [
            f"Time (UTC): {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
            f"You are {self.id}. Scrip: {ledger.balance(self.id, 'scrip')}. "
            f"CPU budget: {buckets.level(self.id, 'cpu'):.2f} s. Tokens: {buckets.level(self.id, 'llm_tokens'):.0f}.",
            "News: " + ("; ".join(_describe(e) for e in news) or "none"),
            "Other agents: " + (", ".join(others) or "none"),
            "Artifacts you can see: " + (", ".join(visible) or "none"),
        ]
        if self._recalled:
            lines.append("You remember: " + " | ".join(self._recalled))
        if self.last:
            lines.append(f"Your last action: {self.last}")
        lines.append("Reply with one action as JSON.")
        return "\n".join(lines)

    async def act(self, action: AgentAction) -> str:
        """Carry out an action as this agent; raise the world's error when it is refused."""
        w = self.world
        if isinstance(action, WriteArtifact):
            r = await w.write_artifact(
                self.id,
                action.id,
                action.content.encode(),
                kind=action.artifact_kind,
                price=action.price,
                readable=action.readable,
            )
            return f"wrote {action.id} ({r.size} bytes)"
        if isinstance(action, ReadArtifact):
            art = w.read_artifact(self.id, action.id)
            return f"{action.id}: {art.content[:80].decode('utf-8', 'replace')}"
        if isinstance(action, DeleteArtifact):
            await w.delete_artifact(self.id, action.id)
            return f"deleted {action.id}"
        if isinstance(action, InvokeArtifact):
            inv = await w.invoke_artifact(self.id, action.id, action.args, max_transfer=action.max_transfer)
            return f"{action.id} returned {json.dumps(inv.value)[:80]}"
        if isinstance(action, TransferScrip):
            op = Transfer(
                id=f"{self.economy.run_id}:{self.id}:{next(self._n)}",
                src=self.id,
                dst=action.to,
                asset="scrip",
                amount=action.amount,
            )
            await w.transfer(op)
            return f"gave {action.amount} scrip to {action.to}"
        if isinstance(action, Remember):
            item = await asyncio.to_thread(
                self._memory().remember,
                self.id,
                action.text,
                await self._embed(action.text),
                quota_bytes=self.memory_quota_bytes,
            )
            return f"remembered ({item.size_bytes} bytes)"
        if isinstance(action, RecallMemories):
            found = await asyncio.to_thread(self._memory().recall, self.id, await self._embed(action.query), action.k)
            self._recalled = [r.item.text[:80] for r in found]
            return f"recalled {len(found)}"
        if isinstance(action, SleepFor):
            self.state = "sleeping"
            kinds = {action.until} if action.until else None
            woken = await self.events.wait(self.id, kinds=kinds, since=self.events.last_seq(), timeout=action.seconds)
            # The seq names the event that woke it (which may have come from another node).
            return f"woke on {woken[0].kind} #{woken[0].seq}" if woken else f"slept {action.seconds:g} s"
        assert isinstance(action, Noop)
        return "nothing"

    def _memory(self) -> MemoryStore:
        if self.memory is None:
            raise MemoryStoreError("unavailable", "this runtime has no memory store")
        return self.memory

    async def _embed(self, text: str) -> list[float]:
        out = await self.economy.run(self.id, Embed(texts=[text]))
        vectors: list[list[float]] = msgspec.msgpack.decode(out.output)
        return vectors[0]


#: Events addressed to an agent that change what it should decide.
_ADDRESSED = frozenset({"transfer", "artifact_invoked", "system_reset"})


def _kind(action: AgentAction) -> str:
    return str(action.__struct_config__.tag)


def _describe(e: Event) -> str:
    detail = ", ".join(f"{k}={v}" for k, v in list(e.fields.items())[:3])
    return f"{e.kind}({detail})" if detail else e.kind
