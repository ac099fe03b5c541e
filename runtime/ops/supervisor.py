"""The supervisor: ``python -m runtime.supervisor [--config FILE] [--check] [--duration S]``.

It opens a ``runtime.node.Node`` (the pool sized from the container's limits, the economy, the world
and the configured agents), runs the agents, shows a live table and refreshes the status file, and on
exit (SIGINT/SIGTERM, or ``--duration`` seconds after the agents started) stops every worker and
writes a JSON usage summary under the data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

import msgspec

from runtime import config as config_mod
from runtime.backends import BackendUnavailable
from runtime.errors import Damaged, Parser, report
from runtime.host import cgroups as cg
from runtime.host import limits as limits_mod
from runtime.host.limits import CapacityError
from runtime.host.volume import measure
from runtime.node import Node
from runtime.ops import compact, dashboard, metrics, preflight
from runtime.ops.dashboard import Dashboard
from runtime.ops.ecology import EcologyFigures, EcologyMeter
from runtime.ops.live import LiveView, frame, plain, stored
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


#: Allocations between two collections of the youngest generation (CPython's default: 700).
GC_YOUNG = 20_000


def quiet_collector() -> None:
    """Keep the cyclic garbage collector from pausing the event loop for long, once the node is built.

    A full collection scans every tracked object and holds the GIL meanwhile: with 1,000 agents the
    supervisor's heap made each one 0.1-0.6 s, every few seconds (collecting nothing: what a node
    builds at its start lives as long as it does), stopping every agent. What exists now is moved out
    of the collector's reach (``gc.freeze``), so a full collection scans only what came after; and
    the youngest generation is collected every ``GC_YOUNG`` allocations rather than 700, so that the
    short-lived objects of an agent's turn die by reference count before a collection promotes them
    (each promotion brings the next full collection nearer)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


def _say(line: str) -> None:
    print(line, flush=True)


async def serve(cfg: config_mod.Config, duration_s: float | None, live: bool) -> int:
    """Run the node until a signal, or for ``duration_s`` once its agents started."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        claim = preflight.claim_data_dir(Path(cfg.data_dir))
    except config_mod.ConfigError as exc:
        report(str(exc))
        return 2
    try:
        node = await Node(cfg, say=_say).start()
    except (BackendUnavailable, CapacityError, config_mod.ConfigError) as exc:
        os.close(claim)
        report(str(exc))
        return 2
    except Damaged as exc:  # a file of the data directory: named, with the command that repairs it
        os.close(claim)
        report(str(exc))
        return 1
    pool, world, events = node.pool, node.world, node.events
    _say(
        f"supervisor {os.getpid()}: {pool.size} workers ({pool.status().cgroups}); "
        f"{len(node.cfg.agents)} agents sharing {node.capacity} millicores; data in {node.data}; "
        f"events: python -m runtime.events tail {node.backends.publisher.endpoint}\n"
        + "\n".join(limits_mod.describe(node.limits, node.sizing))
    )
    _say(f"node {node.node_id or '-'}, run {node.economy.run_id}: {node.backends.where}")
    vol = measure(node.data)
    _say(
        f"data volume at start: {vol.free_bytes >> 20:,} MB free of {vol.total_bytes >> 20:,} MB ({vol.source}); "
        + (
            f"retention every {cfg.retention.interval_s:g} s, horizon {cfg.retention.horizon_s:g} s"
            + (
                ""
                if not cfg.node.postgres_url
                else " (the shared ledger and events too)"
                if cfg.retention.shared
                else " (not the shared ledger and events: retention.shared on one node, or admin compact --postgres)"
            )
            if cfg.retention.enabled
            else "retention off (python -m runtime.admin compact, or retention: in the configuration)"
        )
    )
    ecology = EcologyMeter(node.backends.ledger)
    dash: Dashboard | None = None
    if cfg.metrics_port:
        try:
            sock = dashboard.bind(cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:  # the port is taken: run on, say so
            log.warning("no dashboard or metrics on %s:%d: %s", cfg.metrics_host, cfg.metrics_port, exc)
        else:
            registry = metrics.registry(pool, node.economy, lambda: node.agents, ecology)
            url = f"http://{cfg.metrics_host}:{cfg.metrics_port}"
            token = dashboard.new_token(node.data / "run", url)
            dash = Dashboard(
                token,
                registry,
                node.economy.ledger,
                node.events,
                world.store,
                lambda: node.agents,
                node.economy,
                # One container: its CPU bounds every agent's rights (a node of a shared deployment warns instead).
                None if cfg.node.agent_range else node.capacity,
                world.mint,
            )
            dash.start(sock, loop)
            # The token is shown here once; it stays readable by this user only in the data directory.
            _say(f"dashboard: {url}/ (operator token: {token}); metrics: {url}/metrics")
    node.start_agents()
    if duration_s is not None:
        # The agents' time, not the process's: a start that recovers a crash or waits for a loaded
        # host's workers does not eat into an experiment's run.
        def over() -> None:
            log.info("the agents ran their %g s (--duration): stopping", duration_s)
            stop.set()

        loop.call_later(duration_s, over)
    quiet_collector()
    meter = Meter(node.info)

    def snapshot() -> Snapshot:
        volume = measure(node.data)
        history = world.store.history_usage()
        return meter.snapshot(node.limits, node.sizing, pool, node.agents, node.economy, volume, history)

    # Retention runs beside the loop; on the way out its pass in progress finishes before the stores close.
    retention_stop = asyncio.Event()
    retention: asyncio.Task[None] | None = None
    if cfg.retention.enabled:
        b = node.backends
        retention = asyncio.create_task(
            compact.retain(cfg.retention, b.store, b.ledger, b.events, node.data, retention_stop, _say)
        )

    def status(table: str, snap: Snapshot, running: bool, figures: EcologyFigures) -> Status:
        return Status.of(snap, f"{table}\n{figures.line()}", running, figures)

    status_file = node.data / "run" / STATUS_NAME
    lost_summary = False
    view = LiveView() if live else None
    with view or contextlib.nullcontext():
        try:
            while not stop.is_set() and not pool.failed:
                now = time.monotonic() - started
                snap = snapshot()
                # The ledger's and the store's reads on a thread: on PostgreSQL they are several round trips
                # (the figures read every journal entry since the last frame, of every node), which on the
                # loop would hold back every agent of this node once a status interval.
                read, figures = await asyncio.to_thread(lambda: (stored(world), ecology.figures()))
                shown = frame(pool, node.agents, now, world, events, snap, read)
                current = status(plain(shown), snap, running=True, figures=figures)
                write_status(status_file, current)
                if dash is not None:
                    dash.status = current
                if view is not None:
                    view.show(shown, now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), cfg.status_interval_s)
        finally:
            if retention is not None:
                retention_stop.set()
                await retention
            if dash is not None:
                await asyncio.to_thread(dash.close)
            await node.stop()
            snap = snapshot()
            last = frame(pool, node.agents, time.monotonic() - started, world, events, snap)
            figures = ecology.figures()  # while the ledger is open
            await node.close()
            summary_path = config_mod.data_path(cfg, cfg.summary)
            final = status(plain(last), snap, running=False, figures=figures)
            write_status(status_file, final)
            if view is not None and view.tty:
                view.show(last, time.monotonic() - started)  # the terminal keeps the last frame drawn
            else:
                print(final.table, flush=True)
            try:
                summary_path.write_bytes(msgspec.json.format(msgspec.json.encode(summarize(pool))))
            except OSError as exc:  # a full disk: the ledger already holds every charge; only this copy is lost
                print(
                    f"error: usage summary {summary_path}: {exc.strerror} (the ledger has the charges)", file=sys.stderr
                )
                lost_summary = True
    if lost_summary:
        return 1
    print(f"usage summary: {summary_path}", flush=True)
    if pool.failed:
        report(f"worker pool failed: {pool.failed}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = Parser(prog="python -m runtime.supervisor", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml", help="YAML configuration file")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--duration", type=float, metavar="S", help="stop S seconds after the agents start")
    ap.add_argument("--no-live", action="store_true", help="no live table (log lines only)")
    args = ap.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        ap.error(f"--duration must be positive, got {args.duration}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    # The check and the start run the same checks, before anything is created: what --check accepts,
    # the start does not then refuse.
    try:
        cfg = config_mod.load(args.config)
        limits = limits_mod.detect(cg.discover())
        sizing = limits_mod.plan(cfg, limits, limits_mod.find_calibration(cfg))
        preflight.check(cfg, sizing.workers)
    except (CapacityError, config_mod.ConfigError) as exc:
        report(str(exc))
        return 2
    if args.check:
        print(f"{args.config}: ok ({len(cfg.agents)} agents, workers: {cfg.pool.workers})")
        print("\n".join(limits_mod.describe(limits, sizing)))
        return 0
    return asyncio.run(serve(cfg, args.duration, live=not args.no_live))


if __name__ == "__main__":
    sys.exit(main())
