"""Prometheus metrics at ``/metrics``: read from the live state when scraped, so the hot paths pay nothing.

Exported: the container's CPU and memory (from this process's cgroup), per agent the actions taken and
rejected, whether it is blocked, the LLM tokens and the CPU charged to it; the pool's queue depth,
worker utilisation (busy / live), named overhead, and the unattributed CPU — what the kernel counted
for the live workers that neither a charge nor a named overhead explains yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.economy.charging import Economy
from runtime.host import cgroups as cg
from runtime.ops.ecology import EcologyMeter
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

        actions = CounterMetricFamily("aeco_agent_actions", "Actions decided by an agent", labels=["agent", "outcome"])
        blocked = GaugeMetricFamily("aeco_agent_blocked", "1 while a bucket holds the agent back", labels=["agent"])
        tokens = CounterMetricFamily("aeco_agent_llm_tokens", "LLM tokens charged to an agent", labels=["agent"])
        agent_cpu = CounterMetricFamily("aeco_agent_cpu_seconds", "CPU charged to an agent", labels=["agent"])
        for a in self.agents():
            done, rejected = getattr(a, "actions", None), getattr(a, "rejected", None)
            if isinstance(done, int) and isinstance(rejected, int):
                actions.add_metric([a.id, "applied"], done)
                actions.add_metric([a.id, "rejected"], rejected)
            blocked.add_metric([a.id], 1.0 if a.status == "blocked" else 0.0)
            tokens.add_metric([a.id], self.economy.tokens.get(a.id, 0))
            totals = self.pool.accounts.agents.get(a.id)
            agent_cpu.add_metric([a.id], totals.cpu_seconds if totals else 0.0)
        yield from (actions, blocked, tokens, agent_cpu)

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
        rec = self.pool.accounts.reconcile(self.pool.kernel_cpu())
        yield GaugeMetricFamily(
            "aeco_unattributed_cpu_seconds",
            "Kernel CPU of live workers not yet explained by charges or named overhead (tasks in flight)",
            max(0.0, rec.kernel - rec.accounted),
        )
        if self.ecology is not None:
            yield from self.ecology.metrics()


def serve(
    port: int,
    host: str,
    pool: WorkerPool,
    economy: Economy,
    agents: Callable[[], Sequence[MetricAgent]],
    ecology: EcologyMeter | None = None,
) -> CollectorRegistry:
    """Serve ``/metrics`` on ``host:port`` from a background thread; return the registry."""
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(pool, economy, agents, ecology))
    start_http_server(port, addr=host, registry=registry)
    return registry
