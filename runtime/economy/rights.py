"""Agents' rights: opening accounts with their initial rights, fitting the CPU rights to the container,
and building each agent's buckets from what the ledger holds.

``open_economy`` opens (or re-opens) every configured agent's ledger account with its initial rights,
checks that the CPU rights fit the container, and builds the buckets from the ledger: the ledger is
the truth, so a restart neither refills nor empties a bucket and keeps every trade.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Literal

from runtime.config import AgentConfig, Config
from runtime.economy.buckets import Buckets
from runtime.economy.ledger import Asset, Ledger, OpenAccount
from runtime.host import cgroups as cg
from runtime.host.limits import CapacityError, Sizing, cpu_millicores, detect, find_calibration, plan

log = logging.getLogger("runtime.economy.rights")

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


def cpu_rate_held(ledger: Ledger, agents: Collection[str] | None = None) -> int:
    """Millicores of ``cpu_rate`` that ``agents`` hold (None: every agent account of the ledger, which
    all share one container's CPU)."""
    held = ledger.balances()
    mine = agents if agents is not None else [a for a, kind in ledger.accounts().items() if kind == "agent"]
    return sum(held.get(a, {}).get("cpu_rate", 0) for a in mine)


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

    ``sizing`` (``runtime.host.limits.plan``) gives the capacity and the new agents' ``llm_rate`` and
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
        return cpu_rate_held(ledger, [a.id for a in cfg.agents] if node else None)

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
