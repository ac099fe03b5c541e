"""The composition root: a ``Node`` builds one supervisor's runtime from its configuration, once, and
owns the order in which the parts start and stop. Nothing else wires the runtime: the supervisor's
command line, calibration, the benchmarks and the tests all open a ``Node``.

Start (each step needs the ones before it)::

    limits, sizing   the container's cgroup limits → pool size, quotas, rates (refused before anything
                     is created when the configuration does not fit)
    backends         ledger, artifact store, event log, observers' PUB socket (``runtime.backends``)
    buckets          per agent, restored from the ledger by ``open_economy`` (which opens new accounts)
    recovery         tasks a killed supervisor left in flight are charged — before the pool starts,
                     because the pool's start-up sweep removes the dead workers' cgroups, which hold
                     their final CPU
    pool             workers spawned and connected
    economy, world   charging every task; the agent-facing surface
    memory, agents   built, not yet running (``start_agents``), LLM agents thinking through one
                     ``ThinkBatcher``; those the operator left paused are
                     paused again, a rollback made while stopped announced
                     (``replay_operator``)

Stop, in reverse: the agents are cancelled; the pool closes first, ending the tasks in flight (finished
or killed, and charged), which lets each cancelled agent record its last task's usage; then memory,
the backends (queued writes committed), and last the in-flight log, once the charges the close made
durable have cleared their records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from runtime import config as config_mod
from runtime.actions import RecallMemories, Remember
from runtime.agents.batcher import ThinkBatcher
from runtime.agents.loop import DEFAULT_PERSONA, Agent, Brain, LlmBrain, ScriptedBrain
from runtime.agents.placeholder import PlaceholderAgent
from runtime.backends import Backends, open_backends
from runtime.config import AgentConfig, Config
from runtime.economy.buckets import Buckets, Estimator
from runtime.economy.charging import Economy
from runtime.economy.dollars import DollarCap
from runtime.economy.metering import AgentMeter
from runtime.economy.recovery import recover
from runtime.economy.rights import open_economy
from runtime.host import cgroups as cg
from runtime.host import limits as limits_mod
from runtime.host.limits import Limits, Sizing
from runtime.pool import WorkerPool
from runtime.pool.inflight import InflightLog
from runtime.world.events import Emit, Events, emitter
from runtime.world.events.controls import PAUSE_KINDS, paused
from runtime.world.memory import MemoryStore
from runtime.world.store import Store
from runtime.world.tasks import TaskMint, post_tasks
from runtime.world.world import World

log = logging.getLogger("runtime.node")

AnyAgent = PlaceholderAgent | Agent

#: The states of an agent that will ask for a think soon (``Node._coming``).
_COMING = frozenset({"waiting", "thinking", "acting"})
#: How long stopped agents get to record their last charge once the pool has closed.
AGENT_STOP_S = 5.0


async def replay_operator(store: Store, events: Events, emit: Emit, agents: Sequence[AnyAgent]) -> list[str]:
    """Carry the operator's controls over a restart; the ids of the agents paused again.

    - A rollback: ``python -m runtime.admin rollback`` needs the store to itself, so the supervisor learns
      of it when it starts (HEAD is then the operator's reset commit) and announces it as a
      ``system_reset``, unless one was announced for that commit already (a rollback made while running).
    - Pause and resume are ``agent_paused``/``agent_resumed`` events (``runtime.world.events.controls``):
      each agent's latest one decides, as if the controls were sent again.
    """
    found = await events.read_async(0, kinds=(*PAUSE_KINDS, "system_reset"))
    head = store.last_commit()
    if head.action == "reset" and head.commit not in {e.fields.get("commit") for e in found}:
        emit("system_reset", {"commit": head.commit, "by": head.author})
    held = paused(found)
    again = [a for a in agents if isinstance(a, Agent) and a.id in held]
    for a in again:
        a.pause()
    return [a.id for a in again]


def make_agent(a: AgentConfig, cfg: Config, world: World, batcher: ThinkBatcher | None = None) -> AnyAgent:
    """The configured kind of agent, with its brain (an LLM's thinks through ``batcher`` when given)."""
    if a.brain == "placeholder":
        return PlaceholderAgent(a, world)
    brain: Brain
    if a.brain == "scripted":
        brain = ScriptedBrain(world.economy, a.policy, a.think_ms)
    else:
        price = cfg.llm.prices.get(cfg.llm.model, config_mod.ModelPrice())
        brain = LlmBrain(
            world.economy,
            a.persona or DEFAULT_PERSONA,
            model=cfg.llm.model,
            max_tokens=cfg.llm.max_tokens,
            endpoint=cfg.llm.endpoint,
            price_prompt_per_1k=price.prompt_per_1k,
            price_completion_per_1k=price.completion_per_1k,
            batcher=batcher,
        )
    return Agent(a.id, brain, world)


def _remembers(a: AgentConfig) -> bool:
    """Whether the agent may use its memory: an LLM may decide to; a scripted policy says so."""
    return a.brain == "llm" or (
        a.brain == "scripted" and any(isinstance(x, Remember | RecallMemories) for x in a.policy)
    )


def _quiet(line: str) -> None:
    log.info("%s", line)


class Node:
    """One supervisor's runtime, built from ``cfg`` (see the module docstring for the order).

    Use ``async with Node(cfg) as node:``; the parts are attributes once started. ``say`` hears the
    start-up lines meant for a person (recovery). ``memory``: open the vector memory
    (True), never (False), or when some agent may use it (None: an LLM, or a policy that remembers).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        say: Callable[[str], None] = _quiet,
        memory: bool | None = None,
    ) -> None:
        self.data = Path(cfg.data_dir)
        #: This node's view: the agents of its AGENT_RANGE (all of them on a single node).
        self.cfg = msgspec.structs.replace(cfg, agents=config_mod.local_agents(cfg))
        self.node_id = config_mod.node_id(cfg)
        self.say = say
        self._memory = memory
        self.info: cg.CgroupInfo = cg.discover()
        self.limits: Limits = limits_mod.detect(self.info)
        #: Raises CapacityError/ConfigError here, before anything is created, when the config does not fit.
        self.sizing: Sizing = limits_mod.plan(self.cfg, self.limits, limits_mod.find_calibration(self.cfg))
        self.capacity = 0
        self.agents: list[AnyAgent] = []
        self.runners: list[asyncio.Task[None]] = []
        self.memory: MemoryStore | None = None
        self._stack = contextlib.AsyncExitStack()
        self._stopper: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._started = False
        self.batcher: ThinkBatcher | None = None

    # The parts, set by ``start``.
    backends: Backends
    buckets: Buckets
    inflight: InflightLog
    pool: WorkerPool
    economy: Economy
    world: World
    emit: Emit

    @property
    def events(self) -> Events:
        """The event log."""
        return self.backends.events

    async def start(self) -> Node:
        """Open and start everything in order; on any failure close what was opened and re-raise."""
        assert not self._started, "a Node starts once"
        self._started = True
        cfg, data = self.cfg, self.data
        try:
            data.mkdir(parents=True, exist_ok=True)
            data.chmod(0o700)  # the ledger, the repository and memory are the operator's alone
            self.inflight = InflightLog(data / "run" / "inflight")
            self._stack.push_async_callback(self._close_inflight)
            self.backends = open_backends(cfg, data)
            self._stack.callback(self.backends.close)
            self.emit = emitter(self.backends.events)
            emit = self.emit
            self.buckets = Buckets(
                on_event=lambda kind, agent, res, lvl: emit(kind, {"agent": agent, "resource": res, "level": lvl})
            )
            # Confined code must not see the data directory (repository, ledger, memory).
            self.pool = WorkerPool(
                cfg.pool, size=self.sizing.workers, hide=[str(data.resolve())], inflight=self.inflight
            )
            ledger = self.backends.ledger
            self.capacity = open_economy(
                cfg, ledger, self.pool.info, self.buckets, self.sizing, node=bool(cfg.node.agent_range)
            )
            recover(self.inflight, ledger, self.buckets, self.backends.events, say=self.say)
            self._stack.callback(self._close_memory)
            await self.pool.start()
            self.economy = Economy(
                self.pool,
                ledger,
                self.buckets,
                Estimator(cfg.economy.default_estimate_s),
                node=self.node_id,
                meter=AgentMeter(enabled=cfg.economy.metering),
            )
            if cfg.budget.max_usd is not None:
                spent = await asyncio.to_thread(lambda: sum(r.llm_cost_microusd for r in ledger.usage_records()))
                self.economy.dollars = DollarCap(cfg.budget.max_usd, emit, spent)
            if self._memory if self._memory is not None else any(_remembers(a) for a in cfg.agents):
                # Imported here: the vector store's client is heavy, and most scripted runs never need it.
                from runtime.world.memory.qdrant import QdrantMemory

                self.memory = QdrantMemory(url=cfg.memory_url) if cfg.memory_url else QdrantMemory(path=data / "memory")
            self.world = World(self.backends.store, self.economy, self.backends.events, self.memory)
            # Always a mint: the operator may post tasks into the ledger, before a start or while it runs.
            post_tasks(ledger, cfg.tasks)
            self.world.mint = TaskMint(self.world, cfg.tasks, cfg.budget.scrip_supply_cap, emit)
            # LLM agents' thinks go in batches, one per worker at a time (or, for a server, from here).
            self.batcher = ThinkBatcher(
                self.economy,
                think_batch=self.sizing.think_batch,
                lanes=self.pool.size,
                wait_s=cfg.llm.think_batch_wait_s,
                remote_inflight=cfg.llm.remote_inflight,
            )
            self.agents = [make_agent(a, cfg, self.world, self.batcher) for a in cfg.agents]
            self.batcher.expect(self._coming)
            # What agents left standing in an earlier run: sponsorships, and this node's agents' triggers.
            self.world.restore({a.id for a in self.agents})
            if paused := await replay_operator(self.backends.store, self.backends.events, emit, self.agents):
                self.say(f"paused by the operator: {', '.join(paused)} (python -m runtime.admin control resume AGENT)")
        except BaseException:
            await self.close()
            raise
        return self

    def _coming(self) -> list[str]:
        """The LLM agents that may ask for a think soon: acting, thinking, or not started yet (a think
        batch waits for them), not asleep, blocked by a bucket or paused (it does not)."""
        return [
            a.id for a in self.agents if isinstance(a, Agent) and isinstance(a.brain, LlmBrain) and a.status in _COMING
        ]

    def start_agents(self) -> None:
        """Run every agent's loop (and, on a node of a shared deployment, follow the rate rights other
        nodes trade to its agents) as asyncio tasks, until ``close``."""
        self.runners = [asyncio.create_task(a.run(), name=f"agent:{a.id}") for a in self.agents]
        if self.economy.meter.enabled:
            period = self.cfg.economy.supervisor_flush_s
            self._flusher = asyncio.create_task(self.economy.flush_supervisor_every(period), name="supervisor-flush")
        if self.cfg.node.postgres_url:
            self.runners += [
                asyncio.create_task(self.world.follow_rates(a.id), name=f"rates:{a.id}") for a in self.agents
            ]

    async def stop(self) -> None:
        """Stop what runs — the agents and the pool, every task ended and charged — and leave the state
        open to read (a final status, a summary, checks). Idempotent; ``close`` calls it."""
        if hasattr(self, "world"):  # triggers end as agents do: cancelled, charged once the pool closed
            self.runners += [t for t in self.world.triggers.tasks if t not in self.runners]
        for r in self.runners:
            r.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
        if self._stopper is None:
            self._stopper = asyncio.ensure_future(self._stop_running())
        await self._stopper

    async def _stop_running(self) -> None:
        if hasattr(self, "pool"):
            await self.pool.close()
        if self.batcher is not None:  # its batches ended with the pool, charged
            await self.batcher.close()
        if self.runners:
            _, stuck = await asyncio.wait(self.runners, timeout=AGENT_STOP_S)
            for r in stuck:
                log.error("%s did not stop within %g s after the pool closed", r.get_name(), AGENT_STOP_S)
        if hasattr(self, "economy"):
            # The agents are stopped: what the supervisor did for them since their last task is charged now.
            try:
                await self.economy.flush_supervisor()
            except Exception:  # the close goes on; the ledger's own error says why
                log.exception("could not charge the supervisor CPU measured for agents")

    async def close(self) -> None:
        """Stop everything in reverse order (see the module docstring). Idempotent."""
        await self.stop()
        await self._stack.aclose()

    def _close_memory(self) -> None:
        if self.memory is not None:
            self.memory.close()

    async def _close_inflight(self) -> None:
        # Charges the close made durable clear their in-flight records: two turns of the loop (the
        # ledger's future lands, then its callbacks run).
        for _ in range(2):
            await asyncio.sleep(0)
        self.inflight.close()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
