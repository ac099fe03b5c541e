"""What ``docker stats`` shows, from inside: the container's CPU, memory, network and CPU throttling
from its cgroup and net namespace, pressure (PSI) where the kernel has it, and per agent what it did
and was charged. ``Meter.snapshot`` is the one place a status snapshot is built: the live view,
``status.json`` and ``python -m runtime.status`` all show one; a new figure goes there once.

The container is this process's own cgroup and everything below it (the workers' cgroups are its
children): in a container that is the container; on a host, whatever cgroup the supervisor runs in
(the source names the file, so a root cgroup that counts the whole host is visible as such).
Percentages are of the container's CPU capacity (100% = every core it may use), over the interval
since the previous sample. An agent's CPU is what it was charged, which lands when a task finishes:
a long think shows up in the interval it ended in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec
import psutil
from msgspec import Struct

from runtime.economy.charging import Economy
from runtime.economy.thinking import ThinkFigures
from runtime.host import cgroups as cg
from runtime.host.limits import Limits, Sizing
from runtime.host.volume import Volume
from runtime.pool import WorkerPool

#: The share of the memory limit above which the container counts as short of memory (the seed's 90%).
MEMORY_HIGH = 0.9
#: The share of CFS periods throttled above which the CPU quota counts as overrun: demand above the quota
#: in nearly every period. A run held at its target under a quota throttles many periods on its own —
#: bursty thinks under 0.5 CPU throttled 47–65% of them at 70–80% of the quota (measured by
#: ``tests/integration/test_limits.py``) — and that is the quota doing its job, not a rate too high.
THROTTLED_HIGH = 0.9


class NetCounters(Struct, frozen=True):
    """Bytes and packets received and sent (since the interfaces came up)."""

    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int


class Network(Struct, frozen=True):
    """The container's network, from its net namespace (``/proc/net/dev``, this process's): every
    interface but loopback, loopback apart (traffic between processes in the container), and the
    outside traffic's rate over the last interval (None before a second sample)."""

    external: NetCounters
    loopback: NetCounters
    bytes_in_per_s: float | None
    bytes_out_per_s: float | None
    source: str = "/proc/net/dev of the supervisor's net namespace"


def read_network() -> tuple[NetCounters, NetCounters]:
    """(every interface but loopback, loopback) of this process's net namespace, now."""
    outside = [0, 0, 0, 0]
    loop = [0, 0, 0, 0]
    for name, c in psutil.net_io_counters(pernic=True).items():
        into = loop if name == "lo" else outside
        for i, v in enumerate((c.bytes_recv, c.bytes_sent, c.packets_recv, c.packets_sent)):
            into[i] += v
    return NetCounters(*outside), NetCounters(*loop)


class ContainerStats(Struct, frozen=True):
    """The container's CPU, memory, throttling, pressure and network, from its cgroup and net namespace."""

    #: Cores the container may use (the 100% of ``cpu_percent``).
    cpu_capacity: float
    #: CPU used over the last interval, in percent of ``cpu_capacity`` (None before a second sample).
    cpu_percent: float | None
    #: CPU-seconds used since the cgroup was made (None: no cgroup CPU counter).
    cpu_seconds: float | None
    cpu_source: str
    memory_bytes: int | None
    memory_limit_bytes: int | None
    memory_source: str
    interval_s: float
    #: Memory used over the limit (None without one); ``memory_high`` from ``MEMORY_HIGH`` of it.
    memory_share: float | None = None
    memory_high: bool = False
    throttling: cg.Throttling | None = None
    #: Throttled periods over periods in the last interval (None before a second sample or without any).
    throttled_share: float | None = None
    pressure: dict[str, cg.Pressure] = {}
    pressure_source: str = ""
    network: Network | None = None


class AgentStats(Struct, frozen=True):
    """One agent's share: what it was charged, and its rights as the ledger holds them."""

    id: str
    state: str
    tasks: int
    failed: int
    cpu_seconds: float
    #: CPU charged over the last interval, in percent of the container's capacity.
    cpu_percent: float
    tokens: int
    llm_rate: int
    cpu_rate: int
    #: The largest memory one of its tasks added, and the most a task may add (its ``memory_quota``).
    memory_peak_bytes: int
    memory_quota_bytes: int
    #: Actions applied and refused (a placeholder agent's tasks count as its actions), and how many
    #: per second over the last interval.
    actions: int = 0
    rejected: int = 0
    actions_per_s: float = 0.0
    #: The share of the last interval it spent blocked by a bucket.
    blocked_share: float = 0.0
    #: Dollars paid models charged it in this run, and what is left of its ``llm_budget``.
    spent_usd: float = 0.0
    budget_left_usd: float = 0.0
    #: Scrip held, the CPU bucket's level (seconds; negative: debt) and capacity, and the last action.
    scrip: int = 0
    cpu_bucket_s: float = 0.0
    cpu_bucket_capacity_s: float = 0.0
    last: str = ""
    #: Bytes its commits wrote into the artifact store's retained history (operator-only; bounded by
    #: ``retention``), as the store counts them (``Store.history_usage``).
    history_bytes: int = 0


class Totals(Struct, frozen=True):
    """Every agent's figures added up (``blocked``: agents blocked now)."""

    agents: int = 0
    blocked: int = 0
    tasks: int = 0
    actions: int = 0
    rejected: int = 0
    actions_per_s: float = 0.0
    cpu_seconds: float = 0.0
    tokens: int = 0
    spent_usd: float = 0.0
    budget_left_usd: float = 0.0


def totals(agents: Sequence[AgentStats]) -> Totals:
    """The sum over ``agents``."""
    return Totals(
        agents=len(agents),
        blocked=sum(1 for a in agents if a.state == "blocked"),
        tasks=sum(a.tasks for a in agents),
        actions=sum(a.actions for a in agents),
        rejected=sum(a.rejected for a in agents),
        actions_per_s=sum(a.actions_per_s for a in agents),
        cpu_seconds=sum(a.cpu_seconds for a in agents),
        tokens=sum(a.tokens for a in agents),
        spent_usd=sum(a.spent_usd for a in agents),
        budget_left_usd=sum(a.budget_left_usd for a in agents),
    )


class Snapshot(Struct, frozen=True):
    """Everything structured the status shows: the limits, what was sized from them, and usage."""

    limits: Limits
    sizing: Sizing
    container: ContainerStats
    agents: list[AgentStats]
    totals: Totals = Totals()
    #: The data volume's size, free space and the data directory's bytes (None: not measured).
    volume: Volume | None = None
    #: Batched and remote thinking so far (None: no economy).
    thinking: ThinkFigures | None = None


class MeteredAgent(Protocol):
    """What the meter reads of an agent."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...


class Meter:
    """Samples the container and the agents; each sample's rates and shares cover the time since the last."""

    def __init__(self, info: cg.CgroupInfo, clock: Callable[[], float] = time.monotonic) -> None:
        self.info = info
        self.capacity = cg.cpu_capacity(info)
        self._clock = clock
        self._last_at: float | None = None
        self._last_cpu: float | None = None
        self._last_throttling: cg.Throttling | None = None
        self._last_net: NetCounters | None = None
        #: Per agent at the previous sample: (CPU-seconds charged, actions + refusals, seconds blocked).
        self._last_agents: dict[str, tuple[float, int, float]] = {}

    def snapshot(
        self,
        limits: Limits,
        sizing: Sizing,
        pool: WorkerPool,
        agents: Sequence[MeteredAgent],
        economy: Economy | None,
        volume: Volume | None = None,
        history: Mapping[str, int] | None = None,
    ) -> Snapshot:
        """The status now: the container, each agent and the totals, rates over the time since the last;
        with the data ``volume`` and the store's ``history`` bytes per agent when given."""
        container = self.container()
        per_agent = self.agents(pool, agents, economy, container.interval_s)
        if history:
            per_agent = [msgspec.structs.replace(a, history_bytes=history.get(a.id, 0)) for a in per_agent]
        thinking = None
        if economy is not None:  # a copy: the economy's figures go on changing
            thinking = msgspec.structs.replace(economy.thinking, sizes=dict(economy.thinking.sizes))
        return Snapshot(limits, sizing, container, per_agent, totals(per_agent), volume, thinking)

    def container(self) -> ContainerStats:
        """The container now, with its CPU percent, throttled share and network rate since the previous call."""
        now = self._clock()
        cpu = cg.cpu_usage(self.info)
        mem = cg.memory_usage(self.info)
        limit = cg.memory_limit_bytes(self.info)
        thr = cg.throttling(self.info)
        psi, psi_source = cg.pressure(self.info)
        outside, loop = read_network()
        interval = now - self._last_at if self._last_at is not None else 0.0
        percent = None
        if cpu is not None and self._last_cpu is not None and interval > 0:
            percent = 100 * (cpu.value - self._last_cpu) / (interval * self.capacity)
        throttled_share = thr.share_since(self._last_throttling) if thr is not None else None
        rate_in = rate_out = None
        if self._last_net is not None and interval > 0:
            rate_in = (outside.bytes_in - self._last_net.bytes_in) / interval
            rate_out = (outside.bytes_out - self._last_net.bytes_out) / interval
        self._last_at, self._last_cpu = now, cpu.value if cpu else None
        self._last_throttling, self._last_net = thr, outside
        share = mem.value / limit if mem is not None and limit else None
        return ContainerStats(
            cpu_capacity=self.capacity,
            cpu_percent=percent,
            cpu_seconds=cpu.value if cpu else None,
            cpu_source=cpu.source if cpu else "no cgroup CPU counter",
            memory_bytes=int(mem.value) if mem else None,
            memory_limit_bytes=limit,
            memory_source=mem.source if mem else "no cgroup memory counter",
            interval_s=interval,
            memory_share=share,
            memory_high=share is not None and share >= MEMORY_HIGH,
            throttling=thr,
            throttled_share=throttled_share,
            pressure=psi,
            pressure_source=psi_source,
            network=Network(outside, loop, rate_in, rate_out),
        )

    def agents(
        self, pool: WorkerPool, agents: Sequence[MeteredAgent], economy: Economy | None, interval_s: float
    ) -> list[AgentStats]:
        """Each agent now; its CPU percent, actions per second and blocked share cover the last ``interval_s``."""
        balances = economy.ledger.balances() if economy else {}
        known = set(economy.buckets.agents()) if economy else set()
        out: list[AgentStats] = []
        for a in agents:
            t = pool.accounts.agents.get(a.id)
            cpu = t.cpu_seconds if t else 0.0
            tasks = t.tasks if t else 0
            done, refused = getattr(a, "actions", None), getattr(a, "rejected", None)
            if not (isinstance(done, int) and isinstance(refused, int)):
                done, refused = tasks, 0  # a placeholder agent: each step is a task
            has_buckets = economy is not None and a.id in known
            blocked_s = economy.buckets.blocked_seconds(a.id) if economy is not None and has_buckets else 0.0
            cpu0, decided0, blocked0 = self._last_agents.get(a.id, (cpu, done + refused, blocked_s))
            self._last_agents[a.id] = (cpu, done + refused, blocked_s)
            held = balances.get(a.id, {})
            per_s = 1 / interval_s if interval_s > 0 else 0.0
            out.append(
                AgentStats(
                    id=a.id,
                    state=a.status,
                    tasks=tasks,
                    failed=t.failed if t else 0,
                    cpu_seconds=cpu,
                    cpu_percent=100 * (cpu - cpu0) * per_s / self.capacity,
                    tokens=economy.tokens.get(a.id, 0) if economy else 0,
                    llm_rate=held.get("llm_rate", 0),
                    cpu_rate=held.get("cpu_rate", 0),
                    memory_peak_bytes=t.max_task_memory_bytes if t else 0,
                    memory_quota_bytes=held.get("memory_quota", 0),
                    actions=done,
                    rejected=refused,
                    actions_per_s=(done + refused - decided0) * per_s,
                    blocked_share=min(1.0, (blocked_s - blocked0) * per_s),
                    spent_usd=economy.spent_microusd.get(a.id, 0) / 1e6 if economy else 0.0,
                    budget_left_usd=held.get("llm_budget", 0) / 1e6,
                    scrip=held.get("scrip", 0),
                    cpu_bucket_s=economy.buckets.level(a.id, "cpu") if economy is not None and has_buckets else 0.0,
                    cpu_bucket_capacity_s=(
                        economy.buckets.get(a.id, "cpu").capacity if economy is not None and has_buckets else 0.0
                    ),
                    last=str(getattr(a, "last", "")),
                )
            )
        return out


__all__ = [
    "MEMORY_HIGH",
    "THROTTLED_HIGH",
    "AgentStats",
    "ContainerStats",
    "Meter",
    "MeteredAgent",
    "NetCounters",
    "Network",
    "Snapshot",
    "Totals",
    "read_network",
    "totals",
]
