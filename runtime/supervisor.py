"""The supervisor: ``python -m runtime.supervisor [--config FILE] [--check] [--duration S]``.

It starts the worker pool sized from the container's limits, runs the configured agents, shows a live
table, and on exit (SIGINT/SIGTERM, or after ``--duration``) stops every worker and writes a JSON
usage summary under the data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from runtime import cgroups as cg
from runtime import config as config_mod
from runtime import limits as limits_mod
from runtime import metrics
from runtime.accounting import UsageSummary
from runtime.agents.loop import Agent, Brain, LlmBrain, ScriptedBrain
from runtime.agents.placeholder import PlaceholderAgent
from runtime.backends import BackendUnavailable, open_backends
from runtime.buckets import Buckets, Estimator
from runtime.config import AgentConfig
from runtime.economy import Economy, open_economy
from runtime.events import Events
from runtime.inflight import InflightLog
from runtime.limits import CapacityError, Limits, Sizing
from runtime.live import LiveView, render
from runtime.memory.qdrant import QdrantMemory
from runtime.pool import WorkerPool
from runtime.recovery import recover
from runtime.stats import AgentStats, ContainerStats, Meter, Snapshot
from runtime.store import Store
from runtime.world import Emit, World

log = logging.getLogger("runtime.supervisor")


def emitter(events: Events) -> Emit:
    """``emit(kind, fields)`` for the world and the buckets: queued to the durable event log (which
    wakes sleeping agents and tells observers once the event is on disk), without waiting for it."""

    def emit(kind: str, fields: dict[str, Any]) -> None:
        rest = dict(fields)
        agent = rest.pop("agent", None)
        events.submit(kind, agent if isinstance(agent, str) else None, rest)

    return emit


def announce_reset(store: Store, emit: Emit) -> None:
    """Tell agents about an operator's rollback made while the supervisor was stopped.

    ``python -m runtime.admin rollback`` needs the store to itself, so the supervisor learns of a
    reset when it starts: the HEAD commit is then the operator's reset commit.
    """
    history = store.last_commit()
    if history.action == "reset":
        emit("system_reset", {"commit": history.commit, "by": history.author})


STATUS_NAME = "status.json"


class Status(msgspec.Struct):
    """The live view as a file, for ``python -m runtime.status`` in another terminal.

    ``table`` is the rendered view; the other fields are the same facts structured, for programs:
    the container's limits and their sources, what was sized from them, and its and each agent's usage.
    """

    pid: int
    at: float
    running: bool
    table: str
    limits: Limits | None = None
    sizing: Sizing | None = None
    container: ContainerStats | None = None
    agents: list[AgentStats] = []


def write_status(path: Path, status: Status) -> None:
    """Replace the status file atomically (a reader never sees half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(status))
    os.replace(tmp, path)


def make_agent(
    a: AgentConfig, cfg: config_mod.Config, world: World, events: Events, memory: QdrantMemory | None
) -> PlaceholderAgent | Agent:
    """The configured kind of agent, with its brain."""
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
        )
    # Remembered items count against the same bytes as artifacts: the agent's disk quota.
    return Agent(a.id, brain, world, events, memory, memory_quota_bytes=a.disk_quota_mb << 20)


DEFAULT_PERSONA = (
    "You are an agent in a small economy. You earn scrip when others invoke your code artifacts, and "
    "you pay for every CPU-second and token you use. Act to grow your scrip."
)


def summarize(pool: WorkerPool) -> UsageSummary:
    """What everyone used, for the JSON summary."""
    st = pool.status()
    own = resource.getrusage(resource.RUSAGE_SELF)  # SELF: reaped workers are in RUSAGE_CHILDREN
    return UsageSummary(
        agents=dict(pool.accounts.agents),
        charged_cpu_seconds=pool.accounts.charged(),
        overhead_cpu_seconds=pool.accounts.overhead(),
        supervisor_cpu_seconds=own.ru_utime + own.ru_stime,
        workers_started=st.started,
        workers_crashed=st.crashed,
        memory_probe=st.memory_probe,
        cgroups=st.cgroups,
        reconciliation=pool.accounts.reconcile(pool.kernel_cpu(), retired=True),
        container={"cpu_capacity": st.cpu_capacity, "memory_limit_bytes": st.memory_limit},
    )


async def serve(cfg: config_mod.Config, duration_s: float | None, live: bool) -> int:
    """Run the pool, the ledger and the agents until a signal or the end of ``duration_s``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)
    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)  # the ledger, the repository and memory are the operator's alone
    started = time.monotonic()
    node = config_mod.node_id(cfg)
    # From here on this node's view: the agents of its AGENT_RANGE (all of them on a single node).
    cfg = msgspec.structs.replace(cfg, agents=config_mod.local_agents(cfg))
    try:
        backends = open_backends(cfg, data)
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ledger, store, events, publisher = backends.ledger, backends.store, backends.events, backends.publisher
    emit = emitter(events)
    buckets = Buckets(
        on_event=lambda kind, agent, res, lvl: emit(kind, {"agent": agent, "resource": res, "level": lvl})
    )
    info = cg.discover()
    limits = limits_mod.detect(info)
    inflight = InflightLog(data / "run" / "inflight")
    try:
        sizing = limits_mod.plan(cfg, limits, limits_mod.find_calibration(cfg))
        # Confined code must not see the data directory (repository, ledger, memory).
        pool = WorkerPool(cfg.pool, size=sizing.workers, hide=[str(data.resolve())], inflight=inflight)
        capacity = open_economy(cfg, ledger, pool.info, buckets, sizing, node=bool(cfg.node.agent_range))
    except (CapacityError, config_mod.ConfigError) as exc:
        inflight.close()
        backends.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Before the pool starts: its sweep removes the killed workers' cgroups, which hold their final CPU.
    recover(inflight, ledger, buckets, events, say=lambda line: print(line, flush=True))
    await pool.start()
    economy = Economy(pool, ledger, buckets, Estimator(cfg.economy.default_estimate_s), node=node)
    print(
        f"supervisor {os.getpid()}: {pool.size} workers ({pool.status().cgroups}); "
        f"{len(cfg.agents)} agents sharing {capacity} millicores; data in {data}; "
        f"events: python -m runtime.events tail {publisher.endpoint}\n"
        + "\n".join(limits_mod.describe(limits, sizing)),
        flush=True,
    )
    print(f"node {node or '-'}, run {economy.run_id}: {backends.where}", flush=True)
    world = World(store, economy, emit)
    announce_reset(store, emit)
    memory: QdrantMemory | None = None
    if any(a.brain != "placeholder" for a in cfg.agents):
        memory = QdrantMemory(url=cfg.memory_url) if cfg.memory_url else QdrantMemory(path=data / "memory")
    agents = [make_agent(a, cfg, world, events, memory) for a in cfg.agents]
    runners = [asyncio.create_task(a.run(), name=f"agent:{a.id}") for a in agents]
    if cfg.node.postgres_url:  # other nodes may trade rate rights to this node's agents
        runners += [asyncio.create_task(economy.follow_rates(events, a.id), name=f"rates:{a.id}") for a in agents]
    if cfg.metrics_port:
        try:
            metrics.serve(cfg.metrics_port, cfg.metrics_host, pool, economy, lambda: agents)
            print(f"metrics: http://{cfg.metrics_host}:{cfg.metrics_port}/metrics", flush=True)
        except OSError as exc:  # the port is taken: run on, say so
            log.warning("no metrics on %s:%d: %s", cfg.metrics_host, cfg.metrics_port, exc)
    view = LiveView() if live else None
    meter = Meter(info)

    def snapshot() -> Snapshot:
        container = meter.container()
        return Snapshot(limits, sizing, container, meter.agents(pool, agents, economy, container.interval_s))

    def status(table: str, snap: Snapshot, running: bool) -> Status:
        return Status(os.getpid(), time.time(), running, table, snap.limits, snap.sizing, snap.container, snap.agents)

    try:
        status_file = data / "run" / STATUS_NAME
        while not stop.is_set() and not pool.failed:
            now = time.monotonic() - started
            snap = snapshot()
            table = render(pool, agents, now, world, events, snap)
            write_status(status_file, status(table, snap, running=True))
            if view is not None:
                view.show(table, now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.status_interval_s)
    finally:
        for r in runners:
            r.cancel()
        # Close the pool first: it ends the tasks in flight (finished or killed, and charged),
        # which lets each cancelled agent record its last task's usage before it stops.
        await pool.close()
        _, stuck = await asyncio.wait(runners, timeout=5.0)
        for r in stuck:
            log.error("%s did not stop within 5 s after the pool closed", r.get_name())
        snap = snapshot()
        final = render(pool, agents, time.monotonic() - started, world, events, snap)
        if memory is not None:
            memory.close()
        backends.close()
        # Charges the close made durable clear their in-flight records: two turns of the loop (the
        # ledger's future lands, then its callbacks run).
        for _ in range(2):
            await asyncio.sleep(0)
        inflight.close()
        summary_path = config_mod.data_path(cfg, cfg.summary)
        summary_path.write_bytes(msgspec.json.format(msgspec.json.encode(summarize(pool))))
        write_status(data / "run" / STATUS_NAME, status(final, snap, running=False))
        print(final, flush=True)
        print(f"usage summary: {summary_path}", flush=True)
    if pool.failed:
        print(f"error: worker pool failed: {pool.failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m runtime.supervisor", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml", help="YAML configuration file")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    ap.add_argument("--no-live", action="store_true", help="no live table (log lines only)")
    args = ap.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        ap.error(f"--duration must be positive, got {args.duration}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        limits = limits_mod.detect(cg.discover())
        try:
            sizing = limits_mod.plan(cfg, limits, limits_mod.find_calibration(cfg))
        except (CapacityError, config_mod.ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(cfg.agents)} agents, workers: {cfg.pool.workers})")
        print("\n".join(limits_mod.describe(limits, sizing)))
        return 0
    return asyncio.run(serve(cfg, args.duration, live=not args.no_live))


if __name__ == "__main__":
    sys.exit(main())
