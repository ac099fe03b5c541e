"""Prometheus metrics at ``/metrics``: read from the live state when scraped, so the hot paths pay nothing.

Exported: the container's CPU, memory and memory limit (from this process's cgroup), its CPU throttling
(``cpu.stat`` of the cgroup with the quota), pressure (PSI) where the kernel has it, and its network
(``/proc/net/dev`` of this process's net namespace, loopback apart); per agent the actions taken and
rejected, whether it is blocked and for how long in all, the LLM tokens, CPU and dollars charged to it
and the dollars left of its budget; the pool's queue depth,
worker utilisation (busy / live), named overhead, and the unattributed CPU — what the kernel counted
for the live workers that neither a charge nor a named overhead explains yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.economy.charging import Economy
from runtime.host import cgroups as cg
from runtime.ops.ecology import EcologyMeter
from runtime.ops.stats import read_network
from runtime.pool import WorkerPool


class MetricAgent(Protocol):
    """What the metrics read of an agent."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...


class RuntimeCollector(Collector):
    """Collects every metric from the pool, the economy and the agents at scrape time."""

    def __init__(
        self,
        pool: WorkerPool,
        economy: Economy,
        agents: Callable[[], Sequence[MetricAgent]],
        ecology: EcologyMeter | None = None,
    ) -> None:
        self.pool, self.economy, self.agents, self.ecology = pool, economy, agents, ecology

    def collect(self) -> Iterator[Metric]:
        """One scrape."""
        info = self.pool.info
        cpu = CounterMetricFamily("aeco_container_cpu_seconds", "CPU used by the container (cgroup)")
        if (c := cg.cpu_usage(info)) is not None:
            cpu.add_metric([], c.value)
        yield cpu
        mem = GaugeMetricFamily("aeco_container_memory_bytes", "Memory charged to the container (cgroup)")
        if (m := cg.memory_usage(info)) is not None:
            mem.add_metric([], m.value)
        yield mem
        yield GaugeMetricFamily("aeco_container_cpu_capacity", "CPUs the container may use", cg.cpu_capacity(info))
        yield from self._container(info)

        actions = CounterMetricFamily("aeco_agent_actions", "Actions decided by an agent", labels=["agent", "outcome"])
        blocked = GaugeMetricFamily("aeco_agent_blocked", "1 while a bucket holds the agent back", labels=["agent"])
        tokens = CounterMetricFamily("aeco_agent_llm_tokens", "LLM tokens charged to an agent", labels=["agent"])
        agent_cpu = CounterMetricFamily("aeco_agent_cpu_seconds", "CPU charged to an agent", labels=["agent"])
        occupancy = CounterMetricFamily(
            "aeco_agent_occupancy_seconds", "Worker occupancy charged to an agent beyond its CPU", labels=["agent"]
        )
        blocked_s = CounterMetricFamily(
            "aeco_agent_blocked_seconds", "Time an agent spent blocked by a bucket", labels=["agent"]
        )
        spent = CounterMetricFamily(
            "aeco_agent_llm_spent_usd", "Dollars paid models charged an agent in this run", labels=["agent"]
        )
        left = GaugeMetricFamily(
            "aeco_agent_llm_budget_left_usd", "Dollars left of an agent's llm_budget", labels=["agent"]
        )
        balances = self.economy.ledger.balances()
        buckets = set(self.economy.buckets.agents())
        for a in self.agents():
            done, rejected = getattr(a, "actions", None), getattr(a, "rejected", None)
            if isinstance(done, int) and isinstance(rejected, int):
                actions.add_metric([a.id, "applied"], done)
                actions.add_metric([a.id, "rejected"], rejected)
            blocked.add_metric([a.id], 1.0 if a.status == "blocked" else 0.0)
            tokens.add_metric([a.id], self.economy.tokens.get(a.id, 0))
            totals = self.pool.accounts.agents.get(a.id)
            agent_cpu.add_metric([a.id], totals.cpu_seconds if totals else 0.0)
            occupancy.add_metric([a.id], totals.occupancy_seconds if totals else 0.0)
            blocked_s.add_metric([a.id], self.economy.buckets.blocked_seconds(a.id) if a.id in buckets else 0.0)
            spent.add_metric([a.id], self.economy.spent_microusd.get(a.id, 0) / 1e6)
            left.add_metric([a.id], balances.get(a.id, {}).get("llm_budget", 0) / 1e6)
        yield from (actions, blocked, tokens, agent_cpu, occupancy, blocked_s, spent, left)
        yield from self._thinking()

        st = self.pool.status()
        yield GaugeMetricFamily("aeco_pool_queue_depth", "Tasks waiting for a worker", st.queued)
        yield GaugeMetricFamily("aeco_pool_workers", "Live workers", st.live)
        yield GaugeMetricFamily(
            "aeco_pool_utilisation", "Busy workers / live workers", st.busy / st.live if st.live else 0.0
        )
        yield CounterMetricFamily("aeco_pool_worker_crashes", "Workers that died unexpectedly", st.crashed)
        over = CounterMetricFamily("aeco_overhead_cpu_seconds", "Worker CPU not charged to a task", labels=["kind"])
        for kind, secs in self.pool.accounts.overhead().items():
            over.add_metric([kind], secs)
        yield over
        yield CounterMetricFamily(
            "aeco_charged_cpu_seconds", "Worker CPU charged to tasks", self.pool.accounts.charged()
        )
        if self.economy.meter.enabled:
            sup = self.economy.meter.books()
            part = GaugeMetricFamily(
                "aeco_supervisor_cpu_seconds",
                "The supervisor's CPU: attributed to agents (kind=agents) or a named overhead (one per thread kind)",
                labels=["kind"],
            )
            part.add_metric(["agents"], sup.agents_ns / 1e9)
            for kind, ns in sup.overhead_ns.items():
                part.add_metric([kind], ns / 1e9)
            yield part
            yield GaugeMetricFamily(
                "aeco_supervisor_kernel_cpu_seconds", "The supervisor's RUSAGE_SELF (all threads)", sup.kernel_ns / 1e9
            )
        rec = self.pool.accounts.reconcile(self.pool.kernel_cpu())
        yield GaugeMetricFamily(
            "aeco_unattributed_cpu_seconds",
            "Kernel CPU of live workers not yet explained by charges or named overhead (tasks in flight)",
            max(0.0, rec.kernel - rec.accounted),
        )
        if self.ecology is not None:
            yield from self.ecology.metrics()

    def _thinking(self) -> Iterator[Metric]:
        """Batched thinking: batch sizes, thinks at once, prefix-cache hits, prompt tokens evaluated vs reused."""
        t = self.economy.thinking
        sizes = CounterMetricFamily("aeco_think_batches", "think_batch tasks ended, by their size", labels=["size"])
        for size, n in sorted(t.sizes.items()):
            sizes.add_metric([str(size)], n)
        yield sizes
        yield GaugeMetricFamily("aeco_thinks_batched_now", "Thinks in think_batch tasks running now", t.batched_now)
        yield CounterMetricFamily(
            "aeco_think_prefix_hits", "Batched thinks that started from tokens their worker kept", t.prefix_hits
        )
        prompt = CounterMetricFamily(
            "aeco_think_prompt_tokens",
            "Prompt tokens of batched thinks: evaluated, or reused (kept in a worker, or a prefix evaluated once)",
            labels=["how"],
        )
        prompt.add_metric(["evaluated"], t.tokens_evaluated)
        prompt.add_metric(["reused"], t.tokens_reused)
        yield prompt
        yield GaugeMetricFamily(
            "aeco_remote_thinks_in_flight", "Requests to a remote model server in flight now", t.remote_now
        )

    def _container(self, info: cg.CgroupInfo) -> Iterator[Metric]:
        """Memory limit, throttling, pressure and network of the container."""
        if (limit := cg.memory_limit_bytes(info)) is not None:
            yield GaugeMetricFamily("aeco_container_memory_limit_bytes", "The container's memory limit", limit)
        if (thr := cg.throttling(info)) is not None:
            yield CounterMetricFamily("aeco_container_cpu_periods", "CFS enforcement periods (cpu.stat)", thr.periods)
            yield CounterMetricFamily(
                "aeco_container_cpu_throttled_periods", "Periods the container was throttled in", thr.throttled
            )
            yield CounterMetricFamily(
                "aeco_container_cpu_throttled_seconds",
                "Time the container's tasks were throttled",
                thr.throttled_seconds,
            )
        psi, _ = cg.pressure(info)
        some = GaugeMetricFamily(
            "aeco_container_pressure_some", "PSI some avg10: % of time some tasks stalled", labels=["resource"]
        )
        full = GaugeMetricFamily(
            "aeco_container_pressure_full", "PSI full avg10: % of time all tasks stalled", labels=["resource"]
        )
        for resource, p in psi.items():
            some.add_metric([resource], p.some_avg10)
            full.add_metric([resource], p.full_avg10)
        yield from (some, full)
        outside, loop = read_network()
        net_bytes = CounterMetricFamily(
            "aeco_container_network_bytes",
            "Bytes through the container's interfaces",
            labels=["interfaces", "direction"],
        )
        packets = CounterMetricFamily(
            "aeco_container_network_packets",
            "Packets through the container's interfaces",
            labels=["interfaces", "direction"],
        )
        for where, c in (("external", outside), ("loopback", loop)):
            net_bytes.add_metric([where, "in"], c.bytes_in)
            net_bytes.add_metric([where, "out"], c.bytes_out)
            packets.add_metric([where, "in"], c.packets_in)
            packets.add_metric([where, "out"], c.packets_out)
        yield from (net_bytes, packets)


def registry(
    pool: WorkerPool,
    economy: Economy,
    agents: Callable[[], Sequence[MetricAgent]],
    ecology: EcologyMeter | None = None,
) -> CollectorRegistry:
    """A registry whose one collector reads the runtime at each scrape (the dashboard serves it)."""
    out = CollectorRegistry()
    out.register(RuntimeCollector(pool, economy, agents, ecology))
    return out
