"""The economy: agents' rights in the ledger, their buckets, and charging every task.

``open_economy`` opens (or re-opens) every configured agent's ledger account with its initial rights,
checks that the CPU rights fit the container, and builds the buckets from the ledger: the ledger is
the truth, so a restart neither refills nor empties a bucket and keeps every trade.

``Economy.run`` is the one path by which an agent's task reaches the pool: wait for the bucket to
admit the estimate, run, then charge the measured cost — the usage record and the new bucket levels
in one ledger operation keyed by the task id, so a replay never charges twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from collections.abc import Callable
from typing import Literal

from runtime import cgroups as cg
from runtime.accounting import TaskUsage
from runtime.buckets import Buckets, BucketState, Estimator
from runtime.config import AgentConfig, Config
from runtime.events import Events
from runtime.ledger import Asset, Ledger, OpenAccount, Receipt, RecordUsage, SetBuckets, Transfer
from runtime.limits import CapacityError as CapacityError  # raised here; callers import it from here
from runtime.limits import Sizing, cpu_millicores, detect, find_calibration, plan
from runtime.pool import Outcome, Serve, TaskFailed, WorkerPool
from runtime.protocol import Invoke, TaskSpec, Think, kind_of

log = logging.getLogger("runtime.economy")

Resource = Literal["cpu", "llm_tokens"]
#: Which ledger right sets the rate of which bucket, and the rate per unit of right.
RATE_RIGHTS: dict[Asset, tuple[Resource, float]] = {
    "cpu_rate": ("cpu", 1 / 1000),
    "llm_rate": ("llm_tokens", 1.0),
}
_MB = 1 << 20


def capacity_millicores(cfg: Config, info: cg.CgroupInfo) -> int:
    """The CPU the agents may hold rights to: the container's capacity × target utilisation."""
    return cpu_millicores(cfg, cg.cpu_capacity(info))


def initial_cpu_rates(agents: list[AgentConfig], available: int) -> dict[str, int]:
    """Millicores for each new agent: explicit rates as configured, ``auto`` ones share the rest evenly."""
    explicit = {a.id: a.cpu_rate for a in agents if a.cpu_rate != "auto"}
    auto = [a.id for a in agents if a.cpu_rate == "auto"]
    asked = sum(int(r) for r in explicit.values())
    if asked > available:
        raise CapacityError(
            f"agents ask for {asked} millicores of cpu_rate ({', '.join(f'{k}: {v}' for k, v in explicit.items())}),"
            f" but only {available} are available"
        )
    share = (available - asked) // len(auto) if auto else 0
    if auto and share <= 0:
        raise CapacityError(f"no cpu_rate left for the `auto` agents {', '.join(auto)} ({available - asked} left)")
    return {**{k: int(v) for k, v in explicit.items()}, **dict.fromkeys(auto, share)}


def open_economy(
    cfg: Config,
    ledger: Ledger,
    info: cg.CgroupInfo,
    buckets: Buckets,
    sizing: Sizing | None = None,
    *,
    node: bool = False,
) -> int:
    """Open accounts for new agents, check capacity, and add every agent's buckets. Returns the
    capacity in millicores. Raises ``CapacityError`` with the numbers when rights do not fit.

    ``sizing`` (``runtime.limits.plan``) gives the capacity and the new agents' ``llm_rate`` and
    ``memory_quota``; without it, it is planned here from ``info`` and the calibration file.

    One container (``node=False``): every agent account in the ledger shares this container's CPU.
    A node of a scale-out deployment (``node=True``) runs only ``cfg.agents``, so only their rights
    share its CPU; rights traded in from other nodes may take them over its capacity, which is
    reported (the CPU a trade moves is freed on the other node) rather than refused.
    """
    if sizing is None:
        sizing = plan(cfg, detect(info), find_calibration(cfg))
    capacity = sizing.cpu_millicores

    def held_here() -> int:
        """Millicores held by the agents whose rights this container carries."""
        held = ledger.balances()
        accounts = ledger.accounts()
        mine = [a.id for a in cfg.agents] if node else [a for a, kind in accounts.items() if kind == "agent"]
        return sum(held.get(a, {}).get("cpu_rate", 0) for a in mine)

    existing = ledger.accounts()
    taken = held_here()
    new = [a for a in cfg.agents if a.id not in existing]
    rates = initial_cpu_rates(new, capacity - taken) if new else {}
    futures = [
        ledger.submit(
            OpenAccount(
                id=f"open:{a.id}",
                account=a.id,
                grants={
                    "cpu_rate": rates[a.id],
                    "llm_rate": sizing.llm_rates[a.id],
                    "scrip": a.scrip,
                    "memory_quota": sizing.memory_quotas[a.id],
                    "disk_quota": a.disk_quota_mb * _MB,
                    "llm_budget": round(a.llm_budget_usd * 1e6),
                },
            )
        )
        for a in new
    ]
    for f in futures:
        f.result()
    total = held_here()
    if total > capacity:
        over = (
            f"agents hold {total} millicores of cpu_rate but the container offers {capacity} "
            f"(its CPU capacity × target utilisation {cfg.economy.target_utilisation:g})"
        )
        if not node:
            raise CapacityError(over)
        log.warning("%s: rights traded in from other nodes; this node's workers are oversubscribed", over)
    held = ledger.balances()
    for a in cfg.agents:
        persisted = ledger.buckets(a.id)
        for asset, (resource, per_unit) in RATE_RIGHTS.items():
            rate = held.get(a.id, {}).get(asset, 0) * per_unit
            buckets.add(a.id, resource, rate, cfg.economy.burst_seconds, persisted.get(resource))
    return capacity


def charge(
    buckets: Buckets,
    agent: str,
    kind: str,
    task_id: str,
    usage: TaskUsage,
    ok: bool,
    llm_tokens: int = 0,
    llm_cost_microusd: int = 0,
    error: str = "",
) -> RecordUsage:
    """Charge a finished task to its agent's buckets; return the one ledger operation that records it.

    The operation carries the bucket levels after the charge and is keyed by the task id: applying
    it again (a retry after a crash) changes nothing, and a restart restores exactly those levels.
    """
    levels = {"cpu": buckets.charge(agent, "cpu", usage.cpu_seconds)}
    if llm_tokens:
        levels["llm_tokens"] = buckets.charge(agent, "llm_tokens", float(llm_tokens))
    return RecordUsage(
        id=f"usage:{task_id}",
        task_id=task_id,
        agent=agent,
        kind=kind,
        ok=ok,
        error=error,
        cpu_seconds=usage.cpu_seconds,
        memory_bytes=usage.task_memory_bytes,
        llm_tokens=llm_tokens,
        llm_cost_microusd=llm_cost_microusd,
        wall_seconds=usage.wall_seconds,
        buckets=levels,
    )


def _tokens(spec: TaskSpec | None, out: Outcome) -> tuple[int, int]:
    """Prompt + completion tokens a ``think`` task reported (the model's own counts), and what they
    cost in micro-dollars (paid servers only)."""
    if not isinstance(spec, Think):
        return 0, 0
    try:
        report = json.loads(out.output)
        tokens = int(report.get("prompt_tokens", 0)) + int(report.get("completion_tokens", 0))
        return tokens, round(float(report.get("cost_usd", 0.0)) * 1e6)
    except (ValueError, TypeError, AttributeError):
        return 0, 0


class Economy:
    """Charges every task of every agent: admission on an estimate, charge on the measurement."""

    def __init__(
        self,
        pool: WorkerPool,
        ledger: Ledger,
        buckets: Buckets,
        estimator: Estimator,
        clock: Callable[[], float] | None = None,
        node: str = "",
    ) -> None:
        self.pool, self.ledger, self.buckets, self.estimator = pool, ledger, buckets, estimator
        #: Tokens an agent's next think is expected to use (prompt + completion).
        self.token_estimator = Estimator(default=256.0)
        #: LLM tokens charged per agent in this run (the ledger's usage records hold them durably).
        self.tokens: dict[str, int] = {}
        #: Task ids are ``<run>-<n>``: unique across restarts without asking the ledger; a node's runs
        #: carry its name (``n1-50.<hex>``), so ids are unique across nodes and tell where a task ran.
        self.run_id = f"{node}.{uuid.uuid4().hex[:12]}" if node else uuid.uuid4().hex[:12]
        self._n = itertools.count(1)

    async def run(
        self, agent: str, spec: TaskSpec, *, timeout_s: float | None = None, serve: Serve | None = None
    ) -> Outcome:
        """Run one task for ``agent`` once its CPU bucket admits it, and charge what it used.

        Raises ``TaskFailed`` (after charging) when the task failed. If the caller is cancelled while
        the task runs, the task's cost is still recorded before the cancellation propagates.
        """
        kind = kind_of(spec)
        await self.buckets.acquire(agent, "cpu", self.estimator.estimate(agent, kind))
        if isinstance(spec, Think):
            await self.buckets.acquire(agent, "llm_tokens", self.token_estimator.estimate(agent, kind))
        task_id = f"{self.run_id}-{next(self._n)}"
        # A task's memory limit is its agent's memory_quota, as the ledger holds it now. Confined code
        # gets its limit from the sandbox's own cgroup instead: a second limit on the worker around it
        # could make the kernel pick the worker, not the sandbox, when memory runs out.
        quota = 0 if isinstance(spec, Invoke) else self.ledger.balance(agent, "memory_quota")
        inner = asyncio.ensure_future(
            self.pool.run(spec, agent=agent, timeout_s=timeout_s, memory_limit=quota, serve=serve, track=task_id)
        )
        try:
            out = await asyncio.shield(inner)
        except asyncio.CancelledError:
            # The task goes on in its worker (or is ended by the pool's close); its cost is the
            # agent's all the same.
            await self._settle(agent, spec, task_id, inner)
            raise
        except TaskFailed as exc:
            await self._charge(agent, kind, task_id, exc.usage, ok=False, error=exc.code)
            raise
        await self._charge(agent, kind, task_id, out.usage, True, *_tokens(spec, out))
        return out

    async def _settle(self, agent: str, spec: TaskSpec, task_id: str, inner: asyncio.Future[Outcome]) -> None:
        kind = kind_of(spec)
        try:
            out = await inner
        except TaskFailed as exc:
            await self._charge(agent, kind, task_id, exc.usage, ok=False, error=exc.code)
        else:
            await self._charge(agent, kind, task_id, out.usage, True, *_tokens(spec, out))

    async def _charge(
        self,
        agent: str,
        kind: str,
        task_id: str,
        usage: TaskUsage | None,
        ok: bool,
        llm_tokens: int = 0,
        llm_cost_microusd: int = 0,
        error: str = "",
    ) -> None:
        if usage is None:
            return  # the task never reached a worker: nothing was used
        self.estimator.observe(agent, kind, usage.cpu_seconds)
        if llm_tokens:
            self.token_estimator.observe(agent, kind, float(llm_tokens))
            self.tokens[agent] = self.tokens.get(agent, 0) + llm_tokens
        record = charge(self.buckets, agent, kind, task_id, usage, ok, llm_tokens, llm_cost_microusd, error)
        durable = asyncio.wrap_future(self.ledger.submit(record))
        inflight = self.pool.inflight
        if inflight is not None:  # once durable, a recovery must not charge it again; even if we are
            # cancelled meanwhile (the shield keeps the future going), which is how agents are stopped
            durable.add_done_callback(lambda f: None if f.cancelled() or f.exception() else inflight.clear(task_id))
        await asyncio.shield(durable)

    async def transfer_right(self, op: Transfer) -> Receipt:
        """Transfer an asset; a rate right moves both agents' bucket rates with it, at once (for the
        agents whose buckets are here: another node re-rates its own, see ``follow_rates``)."""
        receipt = await asyncio.wrap_future(self.ledger.submit(op))
        if op.asset in RATE_RIGHTS and receipt.fresh:
            for agent in (op.src, op.dst):
                if agent in self.buckets.agents():
                    await self.rerate(agent, op.asset, op.id)
        return receipt

    async def rerate(self, agent: str, asset: Asset, op_id: str) -> None:
        """Set ``agent``'s bucket rate to its holding of the rate right ``asset`` in the ledger, and
        persist the bucket under an id derived from the trade ``op_id`` (so a replay changes nothing)."""
        resource, per_unit = RATE_RIGHTS[asset]
        rate = self.ledger.balance(agent, asset) * per_unit
        if rate == self.buckets.get(agent, resource).rate:
            return
        state: BucketState = self.buckets.set_rate(agent, resource, rate)
        await asyncio.wrap_future(
            self.ledger.submit(SetBuckets(id=f"rate:{op_id}:{agent}", agent=agent, buckets={resource: state}))
        )

    async def follow_rates(self, events: Events, agent: str) -> None:
        """Re-rate ``agent``'s buckets whenever another node trades it a rate right (the ``rate_changed``
        events ``World.transfer`` addresses to a recipient it does not run), until the log closes.

        Trades made while this node was down need no event: the buckets are built from the ledger's
        holdings when the node starts.
        """
        since = events.last_seq()
        while news := await events.wait(agent, kinds={"rate_changed"}, since=since):
            since = news[-1].seq
            for e in news:
                asset, op_id = e.fields.get("asset"), e.fields.get("op")
                if asset in RATE_RIGHTS and isinstance(op_id, str):
                    await self.rerate(agent, asset, op_id)
