"""Scale-out: actions/s of one embedded node (LMDB) and of 1, 2 and 3 agent nodes sharing PostgreSQL and
Redis, all at the same total CPU, and durable ledger transfers/s on PostgreSQL against LMDB.

Nodes. Each run gets a fresh database and Redis namespace, and starts N supervisor processes
(``python -m runtime.supervisor``, the real node) on one population of ``AGENTS`` scripted agents split
into N equal ``AGENT_RANGE``s. The total CPU is held constant: each node process (and the workers it
forks) runs in a cgroup v1 ``cpu`` group of its own with ``cpu.cfs_quota_us`` = ``TOTAL_CORES / N``
cores, which is also what the node sizes its pool and its agents' CPU rights from. PostgreSQL and Redis
run outside those groups, on the same machine: the cost of coordination they carry is not inside the
quota, it competes with the nodes for the same cores (the runs say so as ``coordination`` overhead:
the actions/s of N nodes against one).

Every agent's policy is cheap but goes through the whole pipeline and across nodes:

    noop, give 1 scrip to the agent AGENTS/3 on, write its own note (a PostgreSQL store commit),
    give 1 scrip to the agent 2×AGENTS/3 on

with ``think_ms=1``. Measured from the shared event log: the ``action`` events committed in a fixed
window after every agent has acted once. Afterwards the ledger's invariants are checked.

The reference is the same population on one embedded node (the default deployment: LMDB ledger and
event log, Git store) in a group of ``TOTAL_CORES`` cores, measured from its own event log the same
way, right before the one-node run on PostgreSQL: what a user gives up per node by sharing state.

Servers and the capacity model. The node runs use a PostgreSQL cluster and a Redis server started for
the benchmark alone (``benchmarks.servers``: nothing else on the host adds to their counters), and
read their CPU counters at the start and the end of each window (PostgreSQL's whole process tree,
exited backends included through the postmaster's reaped-children counters; Redis's own getrusage). Their CPU
divided by the window's actions is each server's CPU per action; divided by the window and the number
of nodes it is the share of a core one node costs it, and its inverse is how many such nodes one
PostgreSQL core, and one Redis core, can carry at the measured per-node rate.

Ledger. ``benchmarks.ledger``'s closed-loop systems, run here in the same session: 64 threads each
applying one durable transfer at a time, on ``LmdbLedger`` and on ``PostgresLedger`` (fresh database,
``synchronous_commit`` on), whose batches are optimistic, and again with ``optimistic=False`` (each batch
holds the ledger lock from its first read: the path before). Then the two paths under contention:
``WRITERS`` writer processes on one database, each in a cgroup of ``TOTAL_CORES / WRITERS`` cores with
``64 / WRITERS`` threads transferring among its own accounts and, half the time, to another writer's (as
the nodes' agents do), locked and optimistic alternated: a writer throttled holding the lock stops them all.

Targets: one node on PostgreSQL delivers at least 60% of the embedded node's actions/s; 3 nodes at
least 95% of one node's on PostgreSQL; the PostgreSQL ledger sustains at least 2,000 durable
transfers/s. Needs root (for the cgroups), Debian's PostgreSQL and Redis packages
(the node runs' own servers), and the PostgreSQL server of ``tests.services.ADMIN_URL`` (the ledger runs).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Protocol

import msgspec
import yaml

from benchmarks import ledger as ledger_bench
from benchmarks.cgroup_box import CgroupBox
from benchmarks.common import (
    Budget,
    Options,
    ReportHead,
    Skipped,
    closed_loop_threads,
    host_info,
    measure_each,
    publish,
    save_figure,
)
from benchmarks.servers import PostgresServer, RedisServer, ServerFailed, tree_cpu_seconds
from runtime.economy.ledger.check import CheckReport
from runtime.world.events import Event
from tests.scale.nodes import Node, node_of


class EventReader(Protocol):
    """What the window reads of an event log (the PostgreSQL one, or an embedded node's LMDB one)."""

    def read(self, since: int = 0, *, kinds: Collection[str] | None = None) -> list[Event]: ...

    def last_seq(self) -> int: ...


NODE_COUNTS = (1, 2, 3)
AGENTS = 60
TOTAL_CORES = 2.0
FULL_S, QUICK_S = 20.0, 5.0
WARMUP_S, WARMUP_MAX_S = 3.0, 180.0
LEDGER_SYSTEMS = ("lmdb-group-threads", "postgres-group-threads", "postgres-locked-threads")
#: The contention runs: this many writer processes, each with this many accounts of its own.
WRITERS, WRITER_ACCOUNTS = 3, 20
#: Of a writer's transfers, the share paid to another writer's account (the nodes' policy: half).
CROSS_SHARE = 0.5
CONTENTION_ROUNDS = 2
TARGET_RATIO = 0.95
#: One node on PostgreSQL against one embedded node, at the same CPU.
TARGET_VS_EMBEDDED = 0.6
TARGET_POSTGRES = ledger_bench.TARGET_POSTGRES_RATE
_PERIOD_US = 100_000


class NodesResult(msgspec.Struct):
    """N nodes sharing the servers (``postgres``), or one embedded node (``lmdb``)."""

    backend: str
    nodes: int
    agents: int
    cores_per_node: float
    seconds: float
    actions: int
    actions_per_s: float
    #: Actions/s of this run over the one-node run's.
    vs_one_node: float | None
    #: Per node: actions in the window.
    per_node: dict[str, int]
    cross_node_transfers: int
    ledger_ok: bool
    problems: list[str]
    #: CPU-seconds the nodes (supervisors and workers), PostgreSQL and Redis process trees used in the window.
    nodes_cpu_s: float
    postgres_cpu_s: float
    redis_cpu_s: float
    #: Their CPU per action, in milliseconds.
    nodes_ms_per_action: float | None
    postgres_ms_per_action: float | None
    redis_ms_per_action: float | None
    #: Nodes like these (``cores_per_node``, at this run's actions/s per node) one core of each carries.
    nodes_per_postgres_core: float | None
    nodes_per_redis_core: float | None


class LedgerResult(msgspec.Struct):
    """One ledger system."""

    name: str
    describe: str
    transfers_per_s: float
    transfers: int
    seconds: float
    #: The benchmark process's CPU per transfer (its clients and the ledger's writer, not PostgreSQL's), µs.
    cpu_us_per_transfer: float | None = None


class ContentionResult(msgspec.Struct):
    """``WRITERS`` ledger writers on one database, each a process in a cgroup of ``TOTAL_CORES / WRITERS``
    cores, with batches that hold the ledger lock from their first read (``locked``) or ``optimistic``."""

    mode: str
    transfers_per_s: float
    transfers: int
    #: Optimistic batches whose check failed under the lock and that ran again holding it.
    retried: int
    ledger_ok: bool


class Report(ReportHead):
    """The JSON file."""

    agents: int
    total_cores: float
    policy: list[str]
    #: The embedded node (LMDB), the reference for one node on PostgreSQL.
    embedded: NodesResult | None
    nodes: list[NodesResult]
    ledger: list[LedgerResult]
    #: The same writers, locked and optimistic alternated (each round one entry): the A/B of the two write paths.
    contention: list[ContentionResult]
    #: The ledger's optimistic write path against the locked one, one line per pair measured.
    write_paths: list[str]
    targets: list[str]
    #: How many nodes one PostgreSQL core and one Redis core carry, one line per run.
    capacity: list[str]
    #: The CPU one action costs in all (nodes, PostgreSQL, Redis), one line per run: what sharing adds.
    costs: list[str]
    skipped: list[Skipped]


POLICY_TEXT = [
    "noop",
    f"transfer 1 scrip to the agent {AGENTS // 3} on",
    "write_artifact note-<me> (32 bytes)",
    f"transfer 1 scrip to the agent {2 * AGENTS // 3} on",
]


def _config(path: Path) -> Path:
    """The benchmark's population, as the YAML every node loads."""
    ids = [f"a{i:03d}" for i in range(1, AGENTS + 1)]
    agents = [
        {
            "id": me,
            "brain": "scripted",
            "think_ms": 1,
            "scrip": 1_000_000,
            "policy": [
                {"kind": "noop"},
                {"kind": "transfer", "to": ids[(k + AGENTS // 3) % AGENTS], "amount": 1},
                {"kind": "write_artifact", "id": f"note-{me}", "content": f"{me} was here, all is well"},
                {"kind": "transfer", "to": ids[(k + 2 * AGENTS // 3) % AGENTS], "amount": 1},
            ],
        }
        for k, me in enumerate(ids)
    ]
    # A burst large enough that buckets never hold an agent back: this measures the pipeline.
    doc = {"economy": {"burst_seconds": 3600}, "metrics_port": 0, "status_interval_s": 1.0, "agents": agents}
    out = path / "scale-bench.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _per_core(cpu_s: float, seconds: float, nodes: int) -> float | None:
    """How many nodes one core carries when ``nodes`` nodes cost ``cpu_s`` in ``seconds``."""
    return round(seconds * nodes / cpu_s, 1) if cpu_s > 0 else None


class _Window(msgspec.Struct):
    """What the nodes did in the measured window."""

    actions: list[Event]
    seconds: float
    #: CPU-seconds of the node processes' trees (supervisors and their workers).
    nodes_cpu_s: float
    postgres_cpu_s: float
    redis_cpu_s: float
    problems: list[str]


def _run_window(
    nodes: list[Node], events: EventReader, duration: float, pg: PostgresServer, rd: RedisServer
) -> _Window:
    """Wait until every agent has acted (the warm-up), then count the actions of ``duration`` seconds."""
    problems: list[str] = []
    acted: set[str] = set()
    t0 = time.monotonic()
    seen = 0
    while time.monotonic() - t0 < WARMUP_MAX_S:
        time.sleep(0.5)
        fresh = events.read(seen, kinds={"action"})
        seen = fresh[-1].seq if fresh else seen
        acted.update(e.agent for e in fresh if e.agent)
        if len(acted) == AGENTS and time.monotonic() - t0 >= WARMUP_S:
            break
        if not all(node.alive() for node in nodes):
            raise RuntimeError("a node died during the warm-up")
    if len(acted) < AGENTS:
        problems.append(f"only {len(acted)} of {AGENTS} agents acted during the warm-up")
    pids = [node.proc.pid for node in nodes if node.proc is not None]
    pg_start, rd_start = pg.cpu_seconds(), rd.cpu_seconds()
    nodes_start = sum(tree_cpu_seconds(pid) for pid in pids)
    start_seq, start = events.last_seq(), time.perf_counter()
    time.sleep(duration)
    end_seq, seconds = events.last_seq(), time.perf_counter() - start
    nodes_cpu = sum(tree_cpu_seconds(pid) for pid in pids) - nodes_start
    pg_cpu, rd_cpu = pg.cpu_seconds() - pg_start, rd.cpu_seconds() - rd_start
    window = [e for e in events.read(start_seq, kinds={"action"}) if e.seq <= end_seq]
    return _Window(window, seconds, nodes_cpu, pg_cpu, rd_cpu, problems)


def _result(
    backend: str, nodes: list[Node], w: _Window, one: float | None, report: CheckReport, cross: int
) -> NodesResult:
    n = len(nodes)
    per_node = {
        node.name: sum(1 for e in w.actions if e.agent and (n == 1 or node_of(nodes, e.agent) is node))
        for node in nodes
    }
    rate = len(w.actions) / w.seconds
    shared = backend == "postgres" and bool(w.actions)
    return NodesResult(
        backend=backend,
        nodes=n,
        agents=AGENTS,
        cores_per_node=round(TOTAL_CORES / n, 3),
        seconds=round(w.seconds, 2),
        actions=len(w.actions),
        actions_per_s=round(rate, 1),
        vs_one_node=round(rate / one, 3) if one else None,
        per_node=per_node,
        cross_node_transfers=cross,
        ledger_ok=report.ok,
        problems=w.problems + [f"ledger: {p}" for p in report.problems[:5]],
        nodes_cpu_s=round(w.nodes_cpu_s, 3),
        postgres_cpu_s=round(w.postgres_cpu_s, 3),
        redis_cpu_s=round(w.redis_cpu_s, 3),
        nodes_ms_per_action=round(1000 * w.nodes_cpu_s / len(w.actions), 3) if w.actions else None,
        postgres_ms_per_action=round(1000 * w.postgres_cpu_s / len(w.actions), 3) if shared else None,
        redis_ms_per_action=round(1000 * w.redis_cpu_s / len(w.actions), 3) if shared else None,
        nodes_per_postgres_core=_per_core(w.postgres_cpu_s, w.seconds, n) if shared else None,
        nodes_per_redis_core=_per_core(w.redis_cpu_s, w.seconds, n) if shared else None,
    )


def _measure_embedded(config: Path, where: Path, duration: float, pg: PostgresServer, rd: RedisServer) -> NodesResult:
    """One node on its own LMDB ledger and event log and Git store, in a group of ``TOTAL_CORES``."""
    from runtime.economy.ledger.check import check
    from runtime.economy.ledger.lmdb import LmdbLedger
    from runtime.world.events.log import EventLog

    node = Node("embedded", "", config, where, {"POSTGRES_URL": "", "REDIS_URL": ""})
    group = CgroupBox(f"aeco-scale-{os.getpid()}-embedded", TOTAL_CORES, period_us=_PERIOD_US)
    try:
        node.start(preexec=group.enter)
        node.wait_up()
        events = EventLog(node.data / "events", readonly=True)
        try:
            w = _run_window([node], events, duration, pg, rd)
        finally:
            events.close()
        code = node.stop()
        if code:
            w.problems.append(f"exit code {code}")
        with LmdbLedger(node.data / "ledger") as ledger:
            report = check(ledger)
        return _result("lmdb", [node], w, None, report, 0)
    finally:
        if node.alive():
            node.kill()
        group.remove()


def _measure_nodes(
    n: int, config: Path, where: Path, duration: float, one: float | None, pg: PostgresServer, rd: RedisServer
) -> NodesResult:
    from runtime.economy.ledger import Transfer
    from runtime.economy.ledger.check import check
    from runtime.economy.ledger.postgres import PostgresLedger
    from runtime.world.events.postgres import PostgresEventLog

    per = AGENTS // n
    url = pg.create_database()
    env = {"POSTGRES_URL": url, "REDIS_URL": rd.url, "AECO_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}"}
    nodes = [Node(f"node{i + 1}", f"{i * per + 1}-{(i + 1) * per}", config, where, env) for i in range(n)]
    groups = [CgroupBox(f"aeco-scale-{os.getpid()}-{n}-{i}", TOTAL_CORES / n, period_us=_PERIOD_US) for i in range(n)]
    try:
        for node, group in zip(nodes, groups, strict=True):
            node.start(preexec=group.enter)
        for node in nodes:
            node.wait_up()
        events = PostgresEventLog(url)
        try:
            w = _run_window(nodes, events, duration, pg, rd)
        finally:
            events.close()
        codes = [node.stop() for node in nodes]
        if any(codes):
            w.problems.append(f"exit codes {codes}")
        ledger = PostgresLedger(url)
        try:
            report = check(ledger)
            cross = sum(
                1
                for e in ledger.journal()
                if isinstance(e.op, Transfer) and node_of(nodes, e.op.src) is not node_of(nodes, e.op.dst)
            )
        finally:
            ledger.close()
        return _result("postgres", nodes, w, one, report, cross)
    finally:
        for node in nodes:
            if node.alive():
                node.kill()
        for group in groups:
            group.remove()


def _measure_ledgers(quick: bool, skipped: list[Skipped]) -> list[LedgerResult]:
    systems = [s for s in ledger_bench.SYSTEMS if s.name in LEDGER_SYSTEMS]
    duration = ledger_bench.QUICK_S if quick else ledger_bench.FULL_S
    out: list[LedgerResult] = []
    with tempfile.TemporaryDirectory(prefix="aeco-scale-ledger-") as tmp:
        for system, measured in measure_each(systems, Path(tmp), duration, skipped):
            assert isinstance(measured, ledger_bench.Measured)
            rate = measured.transfers / measured.seconds
            cpu = ledger_bench.cpu_us_per_transfer(measured)
            print(f"[{system.name}] {rate:,.0f} durable transfers/s, {cpu} µs of CPU per transfer here", flush=True)
            out.append(
                LedgerResult(system.name, system.describe, round(rate, 1), measured.transfers, measured.seconds, cpu)
            )
    return out


def _writer_accounts(k: int) -> list[str]:
    return [f"w{k}-{i}" for i in range(WRITER_ACCOUNTS)]


def _writer(
    url: str, k: int, optimistic: bool, duration: float, box: CgroupBox, go: EventType, out: Connection
) -> None:
    """One contention writer (a spawned process): join ``box``, open the ledger, say ready, wait for
    ``go``, run ``THREADS / WRITERS`` closed-loop clients each transferring 1 scrip from one of its own
    accounts to another of its own or (``CROSS_SHARE``) to another writer's, and send back (transfers,
    seconds, batches retried)."""
    from runtime.economy.ledger import Transfer
    from runtime.economy.ledger.postgres import PostgresLedger

    box.enter()
    mine = _writer_accounts(k)
    others = [a for j in range(WRITERS) if j != k for a in _writer_accounts(j)]
    with PostgresLedger(url, optimistic=optimistic) as led:

        def client(t: int) -> Callable[[], object]:
            rng, ids = random.Random(k * 1000 + t), itertools.count()

            def call() -> object:
                src, dst = rng.sample(mine, 2)
                if rng.random() < CROSS_SHARE:
                    dst = rng.choice(others)
                return led.apply(Transfer(id=f"w{k}-{t}-{next(ids)}", src=src, dst=dst, asset="scrip", amount=1))

            return call

        out.send("ready")
        go.wait()
        clients = [client(t) for t in range(ledger_bench.THREADS // WRITERS)]
        sample = closed_loop_threads(clients, Budget(len(clients), duration, sys.maxsize))
        out.send((sample.round_trips, sample.seconds, led.retried))


def _measure_contention(duration: float, skipped: list[Skipped]) -> list[ContentionResult]:
    """``WRITERS`` writer processes at ``TOTAL_CORES`` in all, locked and optimistic alternated."""
    from runtime.economy.ledger import OpenAccount
    from runtime.economy.ledger.check import check
    from runtime.economy.ledger.postgres import PostgresLedger
    from tests.services import create_database, drop_database

    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads forked mid-lock
    out: list[ContentionResult] = []
    # Alternated, twice: the load of a shared host drifts within a minute; each path gets both halves.
    for mode in ("locked", "optimistic") * CONTENTION_ROUNDS:
        url = create_database()
        boxes: list[CgroupBox] = []
        procs: list[multiprocessing.process.BaseProcess] = []
        try:
            with PostgresLedger(url) as led:
                for f in [
                    led.submit(OpenAccount(id=f"open-{a}", account=a, grants={"scrip": 10**9}))
                    for k in range(WRITERS)
                    for a in _writer_accounts(k)
                ]:
                    f.result()
            go = spawn.Event()
            pipes = [spawn.Pipe(duplex=False) for _ in range(WRITERS)]
            for k, (_, send) in enumerate(pipes):
                boxes.append(CgroupBox(f"aeco-scale-{os.getpid()}-w{k}", TOTAL_CORES / WRITERS, period_us=_PERIOD_US))
                args = (url, k, mode == "optimistic", duration, boxes[-1], go, send)
                procs.append(spawn.Process(target=_writer, args=args, daemon=True))
                procs[-1].start()
            for recv, _ in pipes:
                if not recv.poll(120) or recv.recv() != "ready":
                    raise RuntimeError("a contention writer did not start")
            go.set()
            done: list[tuple[int, float, int]] = []
            for recv, _ in pipes:
                if not recv.poll(duration + 120):
                    raise RuntimeError("a contention writer did not finish")
                done.append(recv.recv())
            with PostgresLedger(url) as led:
                ok = check(led).ok
            transfers = sum(n for n, _, _ in done)
            rate = sum(n / secs for n, secs, _ in done)
            retried = sum(r for _, _, r in done)
            print(f"[contention-{mode}] {WRITERS} writers: {rate:,.0f} durable transfers/s, {retried} batches retried")
            out.append(ContentionResult(mode, round(rate, 1), transfers, retried, ok))
        except Exception as exc:
            print(f"[contention-{mode}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            skipped.append(Skipped(f"contention-{mode}", f"{type(exc).__name__}: {exc}"))
        finally:
            for proc in procs:
                proc.kill()
                proc.join(10)
            for box in boxes:
                box.remove()
            drop_database(url)
    return out


def targets(embedded: NodesResult | None, nodes: list[NodesResult], ledgers: list[LedgerResult]) -> list[str]:
    """One line per target, saying whether it was met."""
    lines = []
    one = next((r for r in nodes if r.nodes == 1), None)
    if embedded is None or one is None or not embedded.actions_per_s:
        lines.append(f"one node on PostgreSQL ≥ {TARGET_VS_EMBEDDED:.0%} of the embedded node: no result — NOT met")
    else:
        ratio = one.actions_per_s / embedded.actions_per_s
        met = ratio >= TARGET_VS_EMBEDDED and one.ledger_ok and embedded.ledger_ok and not one.problems
        lines.append(
            f"one node on PostgreSQL: {one.actions_per_s:,.0f} actions/s = {ratio:.0%} of the embedded node's "
            f"{embedded.actions_per_s:,.0f} (target ≥ {TARGET_VS_EMBEDDED:.0%}) — {'met' if met else 'NOT met'}"
        )
    three = next((r for r in nodes if r.nodes == 3), None)
    if three is None or three.vs_one_node is None:
        lines.append(f"3 nodes ≥ {TARGET_RATIO:.0%} of one node's actions/s: no result — NOT met")
    else:
        met = three.vs_one_node >= TARGET_RATIO and three.ledger_ok and not three.problems
        lines.append(
            f"3 nodes: {three.actions_per_s:,.0f} actions/s = {three.vs_one_node:.0%} of one node's "
            f"(target ≥ {TARGET_RATIO:.0%}) — {'met' if met else 'NOT met'}"
        )
    pg = next((r for r in ledgers if r.name == "postgres-group-threads"), None)
    if pg is None:
        lines.append(f"PostgreSQL ledger ≥ {TARGET_POSTGRES:,} durable transfers/s: no result — NOT met")
    else:
        met = pg.transfers_per_s >= TARGET_POSTGRES
        lines.append(
            f"PostgreSQL ledger: {pg.transfers_per_s:,.0f} durable transfers/s (target ≥ {TARGET_POSTGRES:,}) — "
            f"{'met' if met else 'NOT met'}"
        )
    return lines


def write_paths(ledgers: list[LedgerResult], contention: list[ContentionResult]) -> list[str]:
    """One line per A/B measured in this run: the optimistic write path against the locked one."""
    lines = []
    rates = {r.name: r.transfers_per_s for r in ledgers}
    new, old = rates.get("postgres-group-threads"), rates.get("postgres-locked-threads")
    if new and old:
        lines.append(
            f"one writer, {ledger_bench.THREADS} threads: optimistic {new:,.0f} durable transfers/s, "
            f"locked {old:,.0f} ({new / old:.2f}×)"
        )
    opt = [r for r in contention if r.mode == "optimistic"]
    lock = [r for r in contention if r.mode == "locked"]
    if opt and lock:
        mean_opt = sum(r.transfers_per_s for r in opt) / len(opt)
        mean_lock = sum(r.transfers_per_s for r in lock) / len(lock)
        lines.append(
            f"{WRITERS} writers at {TOTAL_CORES / WRITERS:.2f} cores each, {CROSS_SHARE:.0%} of transfers to another "
            f"writer's account, {len(opt)} alternated rounds: optimistic {mean_opt:,.0f} durable transfers/s "
            f"({' / '.join(f'{r.transfers_per_s:,.0f}' for r in opt)}; {sum(r.retried for r in opt)} batches retried), "
            f"locked {mean_lock:,.0f} ({' / '.join(f'{r.transfers_per_s:,.0f}' for r in lock)}) = "
            f"{mean_opt / mean_lock:.2f}×" + ("" if all(r.ledger_ok for r in contention) else " — ledger check FAILED")
        )
    return lines


def costs(embedded: NodesResult | None, nodes: list[NodesResult]) -> list[str]:
    """One line per run: the CPU one action cost the nodes (supervisors and workers) and the servers."""
    lines = []
    for r in ([embedded] if embedded else []) + nodes:
        if r.nodes_ms_per_action is None:
            continue
        where = "the embedded node" if r.backend == "lmdb" else f"{r.nodes} node(s) on PostgreSQL"
        servers = (r.postgres_ms_per_action or 0.0) + (r.redis_ms_per_action or 0.0)
        lines.append(
            f"CPU per action, {where}: nodes {r.nodes_ms_per_action:.2f} ms + servers {servers:.2f} ms "
            f"= {r.nodes_ms_per_action + servers:.2f} ms"
        )
    return lines


def capacity(nodes: list[NodesResult]) -> list[str]:
    """One line per run: what one PostgreSQL core and one Redis core carry of nodes like its nodes."""
    lines = []
    for r in nodes:
        if r.nodes_per_postgres_core is None or r.nodes_per_redis_core is None:
            lines.append(f"{r.nodes} node(s): no server CPU measured — no capacity figure")
            continue
        lines.append(
            f"nodes of {r.cores_per_node:g} cores at {r.actions_per_s / r.nodes:,.0f} actions/s each: "
            f"PostgreSQL {r.postgres_ms_per_action:.2f} ms and Redis {r.redis_ms_per_action:.2f} ms of CPU per "
            f"action, so one PostgreSQL core carries {r.nodes_per_postgres_core:,.1f} such nodes and one Redis "
            f"core {r.nodes_per_redis_core:,.1f} ({r.nodes} node(s) measured)"
        )
    return lines


def plot(report: Report, path: Path) -> None:
    """Actions/s against the number of nodes, and ledger transfers/s by backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    xs = [r.nodes for r in report.nodes]
    runs = ([report.embedded] if report.embedded else []) + report.nodes
    labels = [f"{r.nodes} on PG" if r.backend == "postgres" else "1 embedded\n(LMDB)" for r in runs]
    left.bar(
        labels, [r.actions_per_s for r in runs], color=["#55a868" if r.backend == "lmdb" else "#4c72b0" for r in runs]
    )
    if report.embedded:
        target = report.embedded.actions_per_s * TARGET_VS_EMBEDDED
        left.axhline(target, color="#8172b2", ls=":", label=f"{TARGET_VS_EMBEDDED:.0%} of embedded")
    if report.nodes and report.nodes[0].nodes == 1:
        target = report.nodes[0].actions_per_s * TARGET_RATIO
        left.axhline(target, color="#c44e52", ls="--", label=f"{TARGET_RATIO:.0%} of one node on PG")
    if runs:
        left.legend(loc="lower right")
    for label, r in zip(labels, runs, strict=True):
        left.annotate(f"{r.actions_per_s:,.0f}", (label, r.actions_per_s), ha="center", va="bottom")
    left.set_xlabel(f"nodes (sharing {report.total_cores:g} cores in total)")
    left.set_ylabel("actions/s")
    left.set_title(f"{report.agents} scripted agents: embedded, and PostgreSQL + Redis")
    width = 0.38
    pos = range(len(xs))
    tallest = max([r.postgres_ms_per_action or 0.0 for r in report.nodes] + [0.1])
    middle.set_ylim(0, tallest * 1.6)  # room above the bars for the capacity text and the legend
    for offset, label, values, color in (
        (-width / 2, "PostgreSQL", [r.postgres_ms_per_action or 0.0 for r in report.nodes], "#8172b2"),
        (width / 2, "Redis", [r.redis_ms_per_action or 0.0 for r in report.nodes], "#dd8452"),
    ):
        bars = middle.bar([p + offset for p in pos], values, width, label=label, color=color)
        middle.bar_label(bars, fmt="%.2f")
    middle.set_xticks(list(pos), [str(x) for x in xs])
    middle.set_xlabel("nodes")
    middle.set_ylabel("server CPU per action (ms)")
    middle.set_title("shared servers' CPU per action")
    if report.nodes and report.nodes[0].nodes_per_postgres_core is not None:
        first = report.nodes[0]
        middle.text(
            0.02, 0.95,
            f"nodes of {first.cores_per_node:g} cores at {first.actions_per_s:,.0f} actions/s:\n"
            f"one PostgreSQL core carries {first.nodes_per_postgres_core:,.1f}\n"
            f"one Redis core carries {first.nodes_per_redis_core:,.1f}",
            transform=middle.transAxes, va="top", fontsize=9,
        )  # fmt: skip
    middle.legend(loc="upper right")
    short = {"lmdb-group-threads": "lmdb", "postgres-group-threads": "1 writer\noptimistic"}
    names = [short.get(r.name, "1 writer\nlocked") for r in report.ledger]
    modes = sorted({r.mode for r in report.contention}, reverse=True)  # optimistic, then locked
    names += [f"{WRITERS} writers\n{mode}" for mode in modes]
    rates = [r.transfers_per_s for r in report.ledger] + [
        sum(r.transfers_per_s for r in runs) / len(runs)
        for runs in ([r for r in report.contention if r.mode == mode] for mode in modes)
    ]
    colors = ["#55a868" if n == "lmdb" else "#c9b8e6" if n.endswith("locked") else "#8172b2" for n in names]
    right.bar(names, rates, color=colors)
    right.axhline(TARGET_POSTGRES, color="#c44e52", ls="--", label=f"target {TARGET_POSTGRES:,}/s")
    for name, rate in zip(names, rates, strict=True):
        right.annotate(f"{rate:,.0f}", (name, rate), ha="center", va="bottom")
    right.set_ylabel(f"durable transfers/s ({ledger_bench.THREADS} threads in all)")
    right.set_title("ledger (PostgreSQL: optimistic or locked batches)")
    right.legend(loc="upper right")
    fig.suptitle(f"scale-out ({report.mode}); load at start {report.host.get('loadavg_at_start')}", fontsize=9)
    save_figure(fig, path, dpi=110)


def run(opts: Options) -> int:
    """Measure the embedded node, then 1, 2 and 3 nodes, then the ledgers; print, write JSON and the plot."""
    duration = QUICK_S if opts.quick else FULL_S
    host = host_info(["psycopg", "redis", "lmdb"])  # before the runs: its load average is the one at the start
    skipped: list[Skipped] = []
    results: list[NodesResult] = []
    embedded: NodesResult | None = None
    tmp = Path(tempfile.mkdtemp(prefix="aeco-scale-"))
    try:
        config = _config(tmp)
        with PostgresServer() as pg, RedisServer() as rd:
            print(f"servers of this run: PostgreSQL pid {pg.pid} on :{pg.port}, Redis pid {rd.pid} on :{rd.port}")
            runs: list[tuple[str, str, Callable[[Path], NodesResult]]] = [
                (
                    "embedded",
                    f"one node on LMDB, {TOTAL_CORES:.2f} cores",
                    lambda w: _measure_embedded(config, w, duration, pg, rd),
                )
            ]
            for n in NODE_COUNTS:

                def nodes(w: Path, n: int = n) -> NodesResult:
                    one = results[0].actions_per_s if results and results[0].nodes == 1 else None
                    return _measure_nodes(n, config, w, duration, one, pg, rd)

                runs.append((f"{n}-nodes", f"{n} node(s) on PostgreSQL, {TOTAL_CORES / n:.2f} cores each", nodes))
            for name, describe, measure in runs:
                print(f"[{name}] {AGENTS} agents, {describe}", flush=True)
                (tmp / name).mkdir()
                try:
                    r = measure(tmp / name)
                except Exception as exc:
                    print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                    skipped.append(Skipped(name, f"{type(exc).__name__}: {exc}"))
                    continue
                if r.backend == "lmdb":
                    embedded = r
                else:
                    results.append(r)
                print(
                    f"[{name}] {r.actions_per_s:,.0f} actions/s ({r.actions:,} in {r.seconds:g} s; "
                    f"per node {r.per_node}); CPU per action: nodes {r.nodes_ms_per_action or 0:.2f} ms; "
                    f"server CPU: PostgreSQL {r.postgres_cpu_s:.2f} s, "
                    f"Redis {r.redis_cpu_s:.2f} s; ledger check {'ok' if r.ledger_ok else 'FAILED'}"
                    + (f"; problems: {r.problems}" if r.problems else ""),
                    flush=True,
                )
    except ServerFailed as exc:
        print(f"[nodes] no servers of their own: {exc}", flush=True)
        skipped.append(Skipped("nodes", str(exc)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ledgers = _measure_ledgers(opts.quick, skipped)
    contention = _measure_contention(ledger_bench.QUICK_S if opts.quick else ledger_bench.FULL_S, skipped)
    lines = targets(embedded, results, ledgers)
    sizing = capacity(results)
    spent = costs(embedded, results)
    paths = write_paths(ledgers, contention)
    print()
    for line in lines + paths + spent + sizing:
        print(line)
    report = Report(
        benchmark="scale",
        mode="quick" if opts.quick else "full",
        host=host,
        duration_s=duration,
        agents=AGENTS,
        total_cores=TOTAL_CORES,
        policy=POLICY_TEXT,
        embedded=embedded,
        nodes=results,
        ledger=ledgers,
        contention=contention,
        write_paths=paths,
        targets=lines,
        capacity=sizing,
        costs=spent,
        skipped=skipped,
    )
    publish(opts.json_path, report, lambda png: plot(report, png))
    return 0 if results and ledgers and not skipped else 1
