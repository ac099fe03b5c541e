"""The supervisor: ``python -m runtime.supervisor [--config FILE] [--check] [--duration S]``.

It opens a ``runtime.node.Node`` (the pool sized from the container's limits, the economy, the world
and the configured agents), runs the agents, shows a live table and refreshes the status file, and on
exit (SIGINT/SIGTERM, or after ``--duration``) stops every worker and writes a JSON usage summary
under the data directory.
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

import msgspec

from runtime import config as config_mod
from runtime.backends import BackendUnavailable
from runtime.host import cgroups as cg
from runtime.host import limits as limits_mod
from runtime.host.limits import CapacityError
from runtime.node import Node
from runtime.ops import metrics
from runtime.ops.ecology import EcologyFigures, EcologyMeter
from runtime.ops.live import LiveView, render
from runtime.ops.stats import Meter, Snapshot
from runtime.ops.status import STATUS_NAME, Status, write_status
from runtime.pool import WorkerPool
from runtime.pool.accounting import UsageSummary

log = logging.getLogger("runtime.supervisor")


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


def _say(line: str) -> None:
    print(line, flush=True)


async def serve(cfg: config_mod.Config, duration_s: float | None, live: bool) -> int:
    """Run the node until a signal or the end of ``duration_s``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)
    started = time.monotonic()
    try:
        node = await Node(cfg, say=_say).start()
    except (BackendUnavailable, CapacityError, config_mod.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pool, world, events = node.pool, node.world, node.events
    _say(
        f"supervisor {os.getpid()}: {pool.size} workers ({pool.status().cgroups}); "
        f"{len(node.cfg.agents)} agents sharing {node.capacity} millicores; data in {node.data}; "
        f"events: python -m runtime.events tail {node.backends.publisher.endpoint}\n"
        + "\n".join(limits_mod.describe(node.limits, node.sizing))
    )
    _say(f"node {node.node_id or '-'}, run {node.economy.run_id}: {node.backends.where}")
    ecology = EcologyMeter(node.backends.ledger)
    if cfg.metrics_port:
        try:
            metrics.serve(cfg.metrics_port, cfg.metrics_host, pool, node.economy, lambda: node.agents, ecology)
            _say(f"metrics: http://{cfg.metrics_host}:{cfg.metrics_port}/metrics")
        except OSError as exc:  # the port is taken: run on, say so
            log.warning("no metrics on %s:%d: %s", cfg.metrics_host, cfg.metrics_port, exc)
    node.start_agents()
    view = LiveView() if live else None
    meter = Meter(node.info)

    def snapshot() -> Snapshot:
        container = meter.container()
        return Snapshot(
            node.limits, node.sizing, container, meter.agents(pool, node.agents, node.economy, container.interval_s)
        )

    def status(table: str, snap: Snapshot, running: bool, figures: EcologyFigures) -> Status:
        table = f"{table}\n{figures.line()}"
        return Status(
            os.getpid(), time.time(), running, table, snap.limits, snap.sizing, snap.container, snap.agents, figures
        )

    status_file = node.data / "run" / STATUS_NAME
    try:
        while not stop.is_set() and not pool.failed:
            now = time.monotonic() - started
            snap = snapshot()
            table = render(pool, node.agents, now, world, events, snap)
            current = status(table, snap, running=True, figures=ecology.figures())
            write_status(status_file, current)
            if view is not None:
                view.show(current.table, now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.status_interval_s)
    finally:
        await node.stop()
        snap = snapshot()
        final = render(pool, node.agents, time.monotonic() - started, world, events, snap)
        figures = ecology.figures()  # while the ledger is open
        await node.close()
        summary_path = config_mod.data_path(cfg, cfg.summary)
        summary_path.write_bytes(msgspec.json.format(msgspec.json.encode(summarize(pool))))
        last = status(final, snap, running=False, figures=figures)
        write_status(status_file, last)
        print(last.table, flush=True)
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
