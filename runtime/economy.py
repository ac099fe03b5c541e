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
from runtime.ledger import Asset, Ledger, OpenAccount, Receipt, RecordUsage, SetBuckets, Transfer
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


class CapacityError(ValueError):
    """The agents' CPU rights exceed what the container can give."""


def capacity_millicores(cfg: Config, info: cg.CgroupInfo) -> int:
    """The CPU the agents may hold rights to: the container's capacity × target utilisation."""
    return int(cg.cpu_capacity(info) * 1000 * cfg.economy.target_utilisation)


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


def open_economy(cfg: Config, ledger: Ledger, info: cg.CgroupInfo, buckets: Buckets) -> int:
    """Open accounts for new agents, check capacity, and add every agent's buckets. Returns the
    capacity in millicores. Raises ``CapacityError`` with the numbers when rights do not fit."""
    capacity = capacity_millicores(cfg, info)
    existing = ledger.accounts()
    held = ledger.balances()
    taken = sum(held.get(a, {}).get("cpu_rate", 0) for a, kind in existing.items() if kind == "agent")
    new = [a for a in cfg.agents if a.id not in existing]
    rates = initial_cpu_rates(new, capacity - taken) if new else {}
    futures = [
        ledger.submit(
            OpenAccount(
                id=f"open:{a.id}",
                account=a.id,
                grants={
                    "cpu_rate": rates[a.id],
                    "llm_rate": a.llm_rate,
                    "scrip": a.scrip,
                    "memory_quota": a.memory_quota_mb * _MB,
                    "disk_quota": a.disk_quota_mb * _MB,
                    "llm_budget": round(a.llm_budget_usd * 1e6),
                },
            )
        )
        for a in new
    ]
    for f in futures:
        f.result()
    held = ledger.balances()
    total = sum(held.get(a, {}).get("cpu_rate", 0) for a, k in ledger.accounts().items() if k == "agent")
    if total > capacity:
        raise CapacityError(
            f"agents hold {total} millicores of cpu_rate but the container offers {capacity} "
            f"({cg.cpu_capacity(info):g} CPUs × target utilisation {cfg.economy.target_utilisation:g})"
        )
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
    ) -> None:
        self.pool, self.ledger, self.buckets, self.estimator = pool, ledger, buckets, estimator
        #: Tokens an agent's next think is expected to use (prompt + completion).
        self.token_estimator = Estimator(default=256.0)
        #: LLM tokens charged per agent in this run (the ledger's usage records hold them durably).
        self.tokens: dict[str, int] = {}
        #: Task ids are ``<run>-<n>``: unique across restarts without asking the ledger.
        self.run_id = uuid.uuid4().hex[:12]
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
        """Transfer an asset; a rate right moves both agents' bucket rates with it, at once."""
        receipt = await asyncio.wrap_future(self.ledger.submit(op))
        if op.asset in RATE_RIGHTS and receipt.fresh:
            resource, per_unit = RATE_RIGHTS[op.asset]
            for agent in (op.src, op.dst):
                if agent in self.buckets.agents():
                    rate = self.ledger.balance(agent, op.asset) * per_unit
                    state: BucketState = self.buckets.set_rate(agent, resource, rate)
                    await asyncio.wrap_future(
                        self.ledger.submit(
                            SetBuckets(id=f"rate:{op.id}:{agent}", agent=agent, buckets={resource: state})
                        )
                    )
        return receipt
