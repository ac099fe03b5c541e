"""What ``docker stats`` shows, from inside: the container's CPU and memory from its cgroup, and the
same per agent from what it was charged.

The container is this process's own cgroup and everything below it (the workers' cgroups are its
children): in a container that is the container; on a host, whatever cgroup the supervisor runs in
(the source names the file, so a root cgroup that counts the whole host is visible as such).
Percentages are of the container's CPU capacity (100% = every core it may use), over the interval
since the previous sample. An agent's CPU is what it was charged, which lands when a task finishes:
a long think shows up in the interval it ended in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from msgspec import Struct

from runtime.economy.charging import Economy
from runtime.host import cgroups as cg
from runtime.host.limits import Limits, Sizing
from runtime.pool import WorkerPool


class ContainerStats(Struct, frozen=True):
    """The container's CPU and memory, from its cgroup."""

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


class Snapshot(Struct, frozen=True):
    """Everything structured the status shows: the limits, what was sized from them, and usage."""

    limits: Limits
    sizing: Sizing
    container: ContainerStats
    agents: list[AgentStats]


class MeteredAgent(Protocol):
    """What the meter reads of an agent."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...


class Meter:
    """Samples the container and the agents; each sample's percentages cover the time since the last."""

    def __init__(self, info: cg.CgroupInfo, clock: Callable[[], float] = time.monotonic) -> None:
        self.info = info
        self.capacity = cg.cpu_capacity(info)
        self._clock = clock
        self._last_at: float | None = None
        self._last_cpu: float | None = None
        self._last_agents: dict[str, float] = {}

    def container(self) -> ContainerStats:
        """The container now, with its CPU percent since the previous call."""
        now = self._clock()
        cpu = cg.cpu_usage(self.info)
        mem = cg.memory_usage(self.info)
        interval = now - self._last_at if self._last_at is not None else 0.0
        percent = None
        if cpu is not None and self._last_cpu is not None and interval > 0:
            percent = 100 * (cpu.value - self._last_cpu) / (interval * self.capacity)
        self._last_at, self._last_cpu = now, cpu.value if cpu else None
        return ContainerStats(
            cpu_capacity=self.capacity,
            cpu_percent=percent,
            cpu_seconds=cpu.value if cpu else None,
            cpu_source=cpu.source if cpu else "no cgroup CPU counter",
            memory_bytes=int(mem.value) if mem else None,
            memory_limit_bytes=cg.memory_limit_bytes(self.info),
            memory_source=mem.source if mem else "no cgroup memory counter",
            interval_s=interval,
        )

    def agents(
        self, pool: WorkerPool, agents: Sequence[MeteredAgent], economy: Economy | None, interval_s: float
    ) -> list[AgentStats]:
        """Each agent now; its CPU percent is what it was charged over the last ``interval_s``."""
        balances = economy.ledger.balances() if economy else {}
        out: list[AgentStats] = []
        for a in agents:
            t = pool.accounts.agents.get(a.id)
            cpu = t.cpu_seconds if t else 0.0
            before = self._last_agents.get(a.id, cpu)
            self._last_agents[a.id] = cpu
            held = balances.get(a.id, {})
            out.append(
                AgentStats(
                    id=a.id,
                    state=a.status,
                    tasks=t.tasks if t else 0,
                    failed=t.failed if t else 0,
                    cpu_seconds=cpu,
                    cpu_percent=100 * (cpu - before) / (interval_s * self.capacity) if interval_s > 0 else 0.0,
                    tokens=economy.tokens.get(a.id, 0) if economy else 0,
                    llm_rate=held.get("llm_rate", 0),
                    cpu_rate=held.get("cpu_rate", 0),
                    memory_peak_bytes=t.max_task_memory_bytes if t else 0,
                    memory_quota_bytes=held.get("memory_quota", 0),
                )
            )
        return out


__all__ = ["AgentStats", "ContainerStats", "Meter", "MeteredAgent", "Snapshot"]
