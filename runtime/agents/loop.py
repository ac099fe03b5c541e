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
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from msgspec import Struct

from runtime.actions import (
    AcceptOffer,
    AgentAction,
    DeleteArtifact,
    Performed,
    SleepFor,
    SubmitTask,
    TransferScrip,
    WriteArtifact,
    perform,
)
from runtime.agents.batcher import ThinkBatcher
from runtime.agents.schema import ACTION_SCHEMA_BYTES, InvalidAction, parse_action
from runtime.economy.charging import Economy
from runtime.economy.dollars import RunBudgetSpent
from runtime.errors import AecoError, ErrorCode
from runtime.protocol import Burn, Think, decode_think
from runtime.world.events import Event, Events
from runtime.world.world import World

_MB = 1 << 20

DEFAULT_PERSONA = (
    "You are an agent in a small economy. You earn scrip when others invoke your code artifacts, and "
    "you pay for every CPU-second and token you use. Act to grow your scrip."
)
#: What every LLM agent is told of the economy's rules, after its persona: one line per way to earn or trade.
RULES = (
    "Earn scrip by solving tasks: write code, then submit it (kind submit, task, id). "
    "Trade rights (cpu_rate, llm_rate, disk_quota, memory_quota, llm_budget): transfer with an asset, "
    "offer some for a price, or accept_offer one by its id. "
    "write_artifact may set readable: public, owner, price:N, allow:agent or contract:artifact. "
    "subscribe runs your code on each event of a kind, at your cost; unsubscribe ends it. "
    "sponsor pays CPU for others' runs of your code; invoke_artifact with charge_to owner uses that."
)
#: What every think is asked for, last in the system prompt: constant, so it is never evaluated again
#: after the lines of the context that change every turn.
REPLY = "Reply with one action as JSON."


def system_prompt(persona: str) -> str:
    """An LLM agent's system prompt, laid out stable first: the rules (the same for every agent, so a
    worker evaluates them once for all the agents of a batch: ``native.batch``'s shared prefix), then
    the agent's persona (kept with its last prompt), then what to reply."""
    return f"{RULES}\n{persona}\n{REPLY}"


log = logging.getLogger("runtime.agents")
#: The wait after a turn the world could not record, doubled each time up to the cap.
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 10.0
#: The turns between two looks at what changes slowly in an agent's prompt (its limits, the market).
_SLOW_EVERY = 10
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


class BudgetSpent(AecoError):
    """The agent has no ``llm_budget`` left for a paid model."""

    default_code: ErrorCode = "budget_spent"


class LlmBrain:
    """Thinks with the worker's llama.cpp model (or an OpenAI-compatible server), constrained to the
    action schema: through ``batcher`` (in a batch with other agents' thinks, or a request from the
    supervisor to a server) when there is one, else as a ``think`` task of its own."""

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
        batcher: ThinkBatcher | None = None,
    ) -> None:
        self.economy = economy
        self.batcher = batcher
        self.persona = persona
        self.model = model
        self.max_tokens = max_tokens
        self.endpoint = endpoint
        self.prices = (price_prompt_per_1k, price_completion_per_1k)
        self._seed = itertools.count(1)

    async def think(self, agent: str, context: str) -> Thought:
        """Generate one action; output that does not parse is a thought without an action."""
        if any(self.prices) and await self.economy.ledger.balance_async(agent, "llm_budget") <= 0:
            raise BudgetSpent(f"{agent} has no llm_budget left for {self.model or 'the paid model'}")
        spec = Think(
            system=system_prompt(self.persona),
            prompt=context,
            schema=ACTION_SCHEMA_BYTES,
            max_tokens=self.max_tokens,
            seed=next(self._seed),
            model=self.model,
            endpoint=self.endpoint,
            price_prompt_per_1k=self.prices[0],
            price_completion_per_1k=self.prices[1],
        )
        if self.batcher is not None:
            report = await self.batcher.think(agent, spec)
        else:
            report = decode_think((await self.economy.run(agent, spec)).output)
        try:
            return Thought(parse_action(report.text), tokens=report.tokens)
        except InvalidAction as exc:
            return Thought(None, str(exc), report.tokens)


class Agent:
    """One agent's loop, run as an asyncio task by the supervisor."""

    def __init__(self, agent_id: str, brain: Brain, world: World) -> None:
        assert world.events is not None, "an agent reads its news from the event log"
        self.id = agent_id
        self.brain = brain
        self.world = world
        self.events: Events = world.events
        self.state: AgentStatus = "waiting"
        self.actions = 0
        self.rejected = 0
        #: Why recent actions were rejected (the most recent 100), for status displays and tests.
        self.reasons: collections.deque[str] = collections.deque(maxlen=100)
        self.last = ""
        self._recalled: list[str] = []
        #: The last event the agent's context showed it; its cursor moves there after the turn.
        self._seen = 0
        #: Its durable cursor, once read: only the agent moves it while it runs.
        self._cursor: int | None = None
        self._others: list[str] = []
        self._first_turn = True
        self._n_context = itertools.count(1)
        #: Bytes the agent owns in the store, as last read: re-read after its own writes and deletes
        #: (the only way it changes but a rollback) and now and then, not on every turn.
        self._disk_used: int | None = None
        self._n_constraints = itertools.count(1)
        #: Its holdings of rights and the market's lines as last looked at (None: look at the next turn).
        self._held: dict[str, int] | None = None
        self._market_lines: list[str] | None = None
        self._n_slow = itertools.count(1)
        self._container: str | None = None
        #: Set while the agent may take turns; an operator's pause clears it (between two turns).
        self._go = asyncio.Event()
        self._go.set()
        #: The last turn's ``action`` event and cursor update while they may not be durable yet (``settle``).
        self._behind: tuple[asyncio.Future[Event], asyncio.Future[int] | None] | None = None

    @property
    def economy(self) -> Economy:
        """The economy the agent's tasks are charged through."""
        return self.world.economy

    @property
    def status(self) -> str:
        """``blocked`` while a bucket holds it back, ``paused`` by the operator, else its own state."""
        if self.economy.buckets.blocked(self.id):
            return "blocked"
        return "paused" if not self._go.is_set() and self.state != "stopped" else self.state

    @property
    def paused(self) -> bool:
        """Whether the operator has paused the agent (it finishes the turn it is in, then waits)."""
        return not self._go.is_set()

    def pause(self) -> None:
        """Take no further turn until ``resume`` (the caller journals why: an ``agent_paused`` event)."""
        self._go.clear()

    def resume(self) -> None:
        """Take turns again."""
        self._go.set()

    async def run(self, max_actions: int | None = None) -> None:
        """Think and act until cancelled (or ``max_actions`` actions have been decided).

        A turn the world cannot even record (the event log or the ledger refuses to commit: a full
        disk, a server gone) is not the agent's doing: it waits, longer each time, and tries again,
        so that the agent carries on once the storage does."""
        pause = _RETRY_FIRST_S
        try:
            while max_actions is None or self.actions + self.rejected < max_actions:
                await self._go.wait()
                try:
                    await self.step()
                except AecoError as exc:
                    if pause == _RETRY_FIRST_S:
                        log.warning("%s: a turn could not be recorded (%s); retrying", self.id, exc)
                    self.state = "waiting"
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RETRY_MAX_S)
                else:
                    pause = _RETRY_FIRST_S
            await self.settle()
        finally:
            self.state = "stopped"
            if self._behind is not None:  # stopped meanwhile: the record is still committed, unawaited
                for fut in self._behind:
                    if fut is not None:
                        fut.cancel()
                self._behind = None

    async def step(self) -> None:
        """One turn: context, think, check, act, publish. The supervisor's CPU spent on the turn is the
        agent's to pay (``runtime.economy.metering``)."""
        await self.economy.meter.metered(self.id, self._step())

    async def _step(self) -> None:
        before = await self._fingerprint()
        context = await self.context(before)
        self.state = "thinking"
        try:
            thought = await self.brain.think(self.id, context)
        except AecoError as exc:
            if not isinstance(exc, (BudgetSpent, RunBudgetSpent)) and exc.code != "quota_exceeded":
                return await self._reject("think", f"thinking failed: {exc.code}: {exc.message[:200]}")
            # Nothing to think with (no budget, or no memory_quota left) until someone gives it some:
            # sleep on it, not in a loop.
            await self._reject("think", str(exc))
            self.state = "sleeping"
            await self.events.wait(
                self.id, kinds={"transfer", "system_reset"}, since=await self.events.last_seq_async(), timeout=60
            )
            return None
        if thought.action is None:
            return await self._reject("think", thought.error)
        # The previous turn's record, if it was left behind, is durable before this turn acts (it was
        # committed while this one thought).
        await self.settle()
        if await self._fingerprint() != before:
            return await self._reject(_kind(thought.action), "the world changed while you thought; look again")
        self.state = "acting"
        try:
            done = await self.act(thought.action)
        except AecoError as exc:
            return await self._reject(_kind(thought.action), str(exc)[:300])
        self.actions += 1
        self.last = f"{_kind(thought.action)}: {done.text}"[:120]
        fields = {"action": _kind(thought.action), "ok": True, "result": done.text[:200]}
        await self._recorded(fields, wait=not done.durable)

    async def _recorded(self, fields: dict[str, Any], *, wait: bool = True) -> None:
        """The turn's ``action`` event, and the agent's durable cursor moved past the news it has been shown
        (it survives a restart): queued together, so they share a commit and one wake-up.

        A turn waits for one durable record of what it did. For an action whose effect is durable already
        (``Performed.durable``: its ledger operation or store commit is that record) the event is not
        waited for here (``wait=False``): it is committed while the agent's next turn thinks, and that turn
        waits for it (``settle``) before it acts — so an agent has at most one event not yet durable, its
        events are committed in the order of its turns, and one that cannot be recorded fails the next turn.
        """
        await self.settle()
        event = self.events.submit_async("action", self.id, fields)
        cursor = None
        if self._seen > await self._read_cursor():
            cursor = self.events.set_cursor_async(self.id, self._seen)
            # Queued behind every event the agent was shown: committed before anything it queues next.
            self._cursor = self._seen
        self._behind = (event, cursor)
        if wait:
            await self.settle()

    async def settle(self) -> None:
        """Wait until the agent's last ``action`` event (and cursor update) is durable; raise the event log's
        error if it could not be recorded. Drivers of ``step`` call it once they stop stepping."""
        if self._behind is None:
            return
        event, cursor = self._behind
        self._behind = None
        try:
            await event
        finally:
            if cursor is not None:
                self._cursor = None  # read again should the update fail
                self._cursor = await cursor

    async def _read_cursor(self) -> int:
        if self._cursor is None:
            self._cursor = await self.events.cursor_async(self.id)
        return self._cursor

    async def _reject(self, kind: str, why: str) -> None:
        self.rejected += 1
        self.reasons.append(f"{kind}: {why}")
        self.last = f"{kind} rejected: {why}"[:120]
        await self._recorded({"action": kind, "ok": False, "reason": why[:300]})

    async def _fingerprint(self) -> tuple[int, int]:
        """What the agent's decision rests on: its scrip and the newest event addressed to it. On a shared
        deployment both usually come from the node's caches, kept true by its own operations and the
        event stream (``runtime.economy.ledger.cache``, ``runtime.world.events.postgres``)."""
        scrip = await self.economy.ledger.balance_async(self.id, "scrip")
        return scrip, await self.events.last_addressed_async(self.id, _ADDRESSED)

    async def context(self, fingerprint: tuple[int, int] | None = None) -> str:
        """The prompt: the time, the agent's holdings and buckets, news, what it can see, its memories.
        ``fingerprint`` is what ``_fingerprint`` just read, if the caller has it (its reads are not repeated)."""
        buckets = self.economy.buckets
        scrip, addressed = fingerprint if fingerprint is not None else await self._fingerprint()
        cursor = await self._read_cursor()
        # News is what others did that concerns this agent. Reading scans every event since the cursor,
        # so only when there is some (or on the first turn, for what arrived while the runtime was down).
        fresh = self._first_turn or addressed > cursor
        self._first_turn = False
        news = await self.events.read_async(cursor, agent=self.id, kinds=_ADDRESSED, limit=20) if fresh else []
        self._seen = news[-1].seq if news else self._seen
        news = news[-5:]
        visible = [a.id for a in await self.world.list_artifacts(self.id, limit=10)]
        if not self._others or next(self._n_context) % 100 == 0:  # accounts change rarely: look now and then
            self._others = [a for a in await self.world.agent_ids(11) if a != self.id][:10]
        others = self._others
        if next(self._n_slow) % _SLOW_EVERY == 0:
            # Its holdings of rights and the market change slowly, and each look is a read of the (maybe
            # shared) ledger: looked at every few turns, and after its own actions that change them.
            self._held = self._market_lines = None
        if self._market_lines is None:
            self._market_lines = await self._market()
        limits_line, market = await self.constraints(), self._market_lines
        # Stable first, what changes every turn last: a worker that kept this agent's last prompt
        # (``native.batch``) evaluates only from the first line that differs. The date heads the prompt
        # and the last line holds only the time of day, to the minute (SmolLM2 spells digits one token each:
        # the whole timestamp at the end cost 25 tokens a turn, 9 now); the balances' labels are short, the
        # CPU budget has one decimal and news is ``kind k=v ...``, for the same reason: the changing tail
        # (~60-70 tokens a turn) is most of a batched think's CPU (~80% of a batch of 8 kept prompts).
        now = time.gmtime()
        lines = [
            f"You are {self.id}. Today (UTC): {time.strftime('%Y-%m-%d', now)}.",
            limits_line,
            "Other agents: " + (", ".join(others) or "none"),
            *market,
            "Artifacts you can see: " + (", ".join(visible) or "none"),
        ]
        if self._recalled:
            lines.append("You remember: " + " | ".join(self._recalled))
        if self.last:
            lines.append(f"Your last action: {self.last}")
        lines += [
            "News: " + ("; ".join(_describe(e) for e in news) or "none"),
            f"Scrip {scrip}, CPU budget {buckets.level(self.id, 'cpu'):.1f} s, "
            f"tokens {buckets.level(self.id, 'llm_tokens'):.0f}.",
            f"Time: {time.strftime('%H:%M', now)}",
        ]
        return "\n".join(lines)

    async def constraints(self) -> str:
        """The agent's own limits in one line: disk used of its quota, the memory one task may add, its
        paid-model budget left, its rates, and the container's CPUs and memory."""
        if self._held is None:
            self._held = await self.economy.ledger.holdings_async(self.id)
        held = self._held
        if self._disk_used is None or next(self._n_constraints) % 100 == 0:
            self._disk_used = await asyncio.to_thread(self.world.store.owned_bytes, self.id)
        if self._container is None:  # the container's limits do not change while it runs: read them once
            pool = self.economy.pool.status()
            memory = f"{pool.memory_limit / _MB:.0f} MB" if pool.memory_limit else "no memory limit"
            self._container = f"Container: {pool.cpu_capacity:g} CPUs, {memory}."
        return (
            f"Your limits: disk {self._disk_used / 1024:.0f}/{held.get('disk_quota', 0) / 1024:.0f} KB, "
            f"memory {held.get('memory_quota', 0) / _MB:.0f} MB per task, "
            f"paid-model budget ${held.get('llm_budget', 0) / 1e6:.2f}, "
            f"CPU rate {held.get('cpu_rate', 0)} millicores, LLM rate {held.get('llm_rate', 0)} tokens/s. "
            + self._container
        )

    async def _market(self) -> list[str]:
        """The open offers and tasks, a line each (none when there are none): what there is to trade or earn."""
        lines = []
        # A few offers, whoever's: reading them all would make every turn cost as much as the market is big.
        offers = [o for o in await self.economy.ledger.offers_async(limit=6) if o.seller != self.id][:5]
        if offers:
            lines.append("Offers: " + "; ".join(f"{o.offer}: {o.amount} {o.asset} for {o.price}" for o in offers))
        mint = self.world.mint
        if mint is not None and (tasks := mint.open_tasks()[:3]):
            lines.append("Tasks: " + "; ".join(f"{t.id} (+{t.reward}): {t.description}" for t in tasks))
        return lines

    async def act(self, action: AgentAction) -> Performed:
        """Carry out an action as this agent; raise the world's ``AecoError`` when it is refused."""
        if isinstance(action, SleepFor):
            self.state = "sleeping"
        done = await perform(self.world, self.id, action)
        if isinstance(action, (WriteArtifact, DeleteArtifact)):
            self._disk_used = None
        # Posting or withdrawing its own offer changes neither its holdings (an offer holds nothing back)
        # nor the market it is shown (others' offers only: the first few of them are the same).
        if isinstance(action, (AcceptOffer, SubmitTask)):  # the market and its holdings changed
            self._held = self._market_lines = None
        elif isinstance(action, TransferScrip) and action.asset != "scrip":  # it gave a right away
            self._held = None
        if done.recalled is not None:
            self._recalled = list(done.recalled)
        return done


#: Events addressed to an agent that change what it should decide.
_ADDRESSED = frozenset({"transfer", "artifact_invoked", "system_reset"})


def _kind(action: AgentAction) -> str:
    return str(action.__struct_config__.tag)


def _describe(e: Event) -> str:
    """One event as news: its kind and first three fields, ``transfer from=a3 asset=scrip amount=3``
    (15 tokens with SmolLM2, where ``transfer(from=a3, asset=scrip, amount=3)`` took 19)."""
    return " ".join([e.kind, *(f"{k}={v}" for k, v in list(e.fields.items())[:3])])
