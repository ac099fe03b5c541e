"""The whole ecology end to end: actions per second and supervisor memory with 10, 100, 1,000 and 10,000 agents.

Each size gets a fresh runtime wired as the supervisor wires it: a real ``WorkerPool`` sized from the
machine (recording the tasks in flight, ``runtime.pool.inflight``; ``pool.prefetch`` 1: each worker holds
its next think, so that it does not wait for its last result to cross the supervisor), a durable
``LmdbLedger``, a durable ``EventLog``, a ``GitStore``, the buckets and the economy (``open_economy``),
and the world with the events as its ``emit``. No memory store: the policy has no memory actions. Every
agent is a real ``Agent`` with a ``ScriptedBrain`` whose policy is cheap but goes through the whole pipeline:

    noop, transfer 1 scrip to the next agent, read the public artifact written at setup, noop

(rotated per agent so that the four kinds are in flight at once), with ``think_ms=1``: every think is a
``Burn`` task on a worker, measured and charged (a usage record and the new bucket levels in one durable
ledger operation), and every action, applied or rejected, is a durable event; the agent's cursor moves
durably after each turn (a transfer's, an offer's or an acceptance's event while the agent's next turn
thinks: the ledger operation is that turn's record, ``Agent.settle``).

CPU rights: each agent holds ``capacity_millicores // agents`` millicores, so that all of them fit the
container, and a burst (``burst_seconds``) large enough that its bucket holds more CPU than one agent can
possibly use during the run (one think at a time, so at most one CPU-second per second). The buckets
are charged exactly as usual, but never hold an agent back: the benchmark measures the pipeline, not
the buckets (the count of ``agent_blocked`` events, expected 0, shows it). With more agents than the
container has millicores to hand out (10,000 on 2 cores: 1,800), each still holds one: the run tells the
runtime the container offers that many (``Sizing.cpu_millicores``), so the rights are oversubscribed —
which the buckets, never holding anyone back here, do not notice.

All agents run concurrently: a warm-up (until every agent finished a turn, and at least ``WARMUP_S``),
then a fixed measured window, then each agent finishes the turn in hand. Measured in the window:
actions per second (applied + rejected, from the agents' counters), turn latency, the supervisor's RSS
(VmRSS of this process, sampled by a thread) and CPU (``time.process_time``, all its threads, with a
per-thread breakdown), and the workers' utilisation (CPU charged to tasks / workers × seconds).

Each size but the largest runs eight times, with the supervisor's metering off and on in the order ``METERING_ORDER``
(``EconomyConfig.metering``, ``runtime.economy.metering``; the order cancels a linear or quadratic
drift of the host's load): the throughput lost to metering is the difference between the two modes'
actions over their windows, with its standard error from the runs' spread. On a shared host that
difference is noisy; beside it are the CPU per action each mode costs (supervisor and workers, from
the kernel) and the meter's own cost counted from its parts (its spans per action × what one span
costs, ``meter_span_cost_us``). With it on, the
supervisor's CPU in the window (``RUSAGE_SELF``) is split into what was charged to agents, each named
overhead (the event loop's own work, the group-commit writers, ZeroMQ's thread …) and what neither
covers; the targets are ≥ 95% attributed to an agent or a named overhead, at ≤ 5% of throughput.
The largest size (``LARGE``) runs once, metering on and the rules off: its actions/s, and the
supervisor's peak RSS against ``LARGE_RSS_TARGET_MB``.

The collector is set as the supervisor sets it once its agents start (``runtime.ops.supervisor.quiet_collector``:
the heap the node built frozen out of it, the youngest generation collected every 20,000 allocations), and
restored after the size.

Verified after each size, on the quiet stores: ``runtime.economy.ledger.check`` passes; exactly one ``burn``
usage record per think; the event log's seqs are 1..n with no gap, with one ``action`` event per think.

The ecology's own rules (``--rules``, the default): each size also runs three times with the rules on,
among its runs with them off (``RULES_AT``) — the same four turns, two of them through the rules:

    offer 1 byte of memory_quota for 1 scrip as ``<me>.o``, transfer 1 scrip to the next agent,
    read the bulletin (guarded by a contract that allows any reader: run confined once, its answer
    then cached for every caller until the contract changes),
    accept the previous agent's offer ``<prev>.o`` (both sides atomically, in one ledger operation)

A quota, not a rate right, changes hands: with 1,000 agents each holds about one millicore of
``cpu_rate``, and a seller whose offers happened to be accepted more often than it bought would be left
with no rate at all, its bucket empty for good — the benchmark would measure stranded agents, not the
rules (re-rating on a trade is tested in ``tests/integration/test_rules.py``).

and one trigger per 10 agents (agent 0, 10, 20 … subscribes a tool to ``artifact_written`` events about
its own ``<me>-inbox``, which nobody writes during the window). What is measured of the triggers is their
standing cost — every committed event is routed past every trigger's filter on the event loop — not
their firings: a firing is one confined invocation charged to its subscriber, and a trigger on an event
as frequent as the turns (say, its own offers' acceptances) would add one per 40 turns, each costing
tens of times a 1 ms think. ``tests/integration/test_rules.py`` shows that firings happen once per
matching event. The target is throughput with the rules on ≥ 90% of throughput with them off, at every
size: the median of the three runs with the rules on against the median of the four with metering on and
the rules off, so that a burst of a shared host's load in one run does not decide.

Last, the web dashboard's cost (``benchmarks/dashboard.py``, also ``python -m benchmarks dashboard`` on
its own): 1,000 agents, windows alternating without the dashboard and with it served and one headless
Chromium showing the page; its thread's CPU in % of the supervisor's (target ≤ 2%), kept in the JSON as
``dashboard``.

``--sizes 10`` (or ``10,100``, ``10000``) measures the sizes named only, each with all its interleaved
runs and so the rules' comparison among them, and skips the dashboard's phase: a way to repeat one size's
comparison on a shared host without the rest. Its JSON goes beside the whole run's (``ecology-sizes-10.json``).

``--profile`` also records a py-spy flame graph of this process during the 1,000-agent window, written
beside the JSON as ``ecology-supervisor.svg``.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import math
import os
import shutil
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import (
    Options,
    PySpy,
    ReportHead,
    announce,
    child_pids,
    percentile_us,
    print_rows,
    publish,
    save_figure,
    scratch,
    stop_resource_trackers,
)
from runtime.actions import AcceptOffer, AgentAction, MakeOffer, Noop, ReadArtifact, TransferScrip
from runtime.agents.loop import Agent
from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.ledger import AcceptOffer as Accepted
from runtime.economy.ledger.check import check
from runtime.economy.metering import AgentMeter, SupervisorBooks, thread_cpu_ns
from runtime.economy.rights import capacity_millicores
from runtime.host import cgroups as cg
from runtime.node import Node
from runtime.ops.supervisor import quiet_collector
from runtime.pool import WorkerPool

SIZES = (10, 100, 1000)
#: Run once (metering on, the rules off), for its throughput and the supervisor's memory at that scale.
LARGE = 10_000
#: Its target: the supervisor's peak RSS in the window.
LARGE_RSS_TARGET_MB = 300.0
FULL_S, QUICK_S = 10.0, 3.0
#: Warm-up: at least this long, and until every agent has finished one turn (at most ``WARMUP_MAX_S`` and
#: ``WARMUP_PER_AGENT_S`` per agent: 10,000 first turns take longer than a minute on a busy host).
WARMUP_S, WARMUP_MAX_S, WARMUP_PER_AGENT_S = 1.0, 60.0, 0.02
#: After the window, how long the agents get to finish the turn in hand before they are cancelled.
DRAIN_MAX_S = 60.0
THINK_MS = 1
#: Thinks that may wait at a busy worker (``PoolConfig.prefetch``).
PREFETCH = 1
SCRIP = 1000
BULLETIN = "bulletin"
GATE, WATCH = "gate", "watch"
#: One trigger per this many agents (with the rules on).
TRIGGER_EVERY = 10
#: The rules may cost at most this share of the throughput.
RULES_TARGET = 0.9
SAMPLE_EVERY_S = 0.1
TARGET_AGENTS = 1000
TARGET_RATE = 1300.0
#: The supervisor's CPU (all its threads) per action at ``TARGET_AGENTS``, in ms.
TARGET_SUPERVISOR_MS = 0.3
#: Metering targets: the supervisor's CPU attributed to an agent or a named overhead, and the most
#: throughput metering may cost.
TARGET_ATTRIBUTED_PCT = 95.0
TARGET_METERING_COST_PCT = 5.0
#: The order of the runs of one size (off, on, on, off, on, off, off, on): each mode's mean time in the
#: sequence is the same, and so is its mean squared time.
METERING_ORDER = (False, True, True, False, True, False, False, True)
#: Where the runs with the rules on go among those (before the run at each of these positions): each
#: between two runs with metering on and the rules off, or next to one, spread over the sequence, so the
#: comparison's two sides see the same drift of a shared host's load. Three, compared by their median
#: against the median of the metering-on runs, so that one run a burst of load hit does not decide.
RULES_AT = (2, 4, 8)
_MB = 1 << 20


class SizeResult(msgspec.Struct):
    """One number of agents, with the rules off or on."""

    agents: int
    #: Whether the supervisor metered its CPU per agent in this run.
    metering: bool
    #: The host's 1-minute load average when the run started (other work on the host skews throughput).
    load_avg_1m: float
    #: Whether the ecology's rules (offers, contracts, triggers) were on.
    rules: bool
    workers: int
    cpu_rate_millicores: int
    burst_seconds: float
    #: Length of the measured window.
    seconds: float
    warmup_s: float
    #: Turns completed in the window (applied + rejected actions), and its split.
    actions: int
    applied: int
    rejected: int
    actions_per_s: float
    p50_ms: float
    p99_ms: float
    #: Supervisor RSS before this size's runtime was opened, and the highest sample in the window.
    rss_mb_before: float
    rss_mb_peak: float
    #: Supervisor CPU (all threads) over the window, in % of one CPU; and per thread.
    supervisor_cpu_pct: float
    supervisor_threads_cpu_pct: dict[str, float]
    #: CPU charged to tasks / (workers × seconds), and the workers' CPU from the kernel likewise.
    worker_util_pct: float
    worker_kernel_pct: float
    #: CPU per action in the window: the supervisor's (all threads) and the workers' (kernel), and the
    #: actions/s the machine's CPUs could sustain at that cost if nothing else ran and nothing waited.
    supervisor_cpu_ms_per_action: float
    worker_cpu_ms_per_action: float
    cpu_bound_actions_per_s: float
    #: With metering: the supervisor's CPU per action charged to agents, per named overhead, and what
    #: neither covers (``RUSAGE_SELF`` minus both); and the share of it that is attributed to an agent
    #: or a named overhead, and to agents alone.
    supervisor_agents_ms_per_action: float
    supervisor_overhead_ms_per_action: dict[str, float]
    supervisor_unattributed_ms_per_action: float
    supervisor_attributed_pct: float
    supervisor_agents_pct: float
    #: Supervisor CPU charged to agents in the ledger over the whole run (``supervisor_cpu_seconds``).
    supervisor_charged_s: float
    #: Spans the meter timed per action (each costs it two clock readings and some bookkeeping).
    metered_spans_per_action: float
    #: The whole run (warm-up, window, drain): thinks done, and what the stores hold.
    thinks: int
    burn_records: int
    action_events: int
    events: int
    blocked_events: int
    ledger_journal_entries: int
    #: With the rules on: offers accepted, trigger firings, contract runs (the rest were cached answers).
    offers_accepted: int
    trigger_firings: int
    contract_runs: int
    ledger_ok: bool
    events_gapless: bool
    reject_reasons: dict[str, int]
    problems: list[str]

    @property
    def verified(self) -> bool:
        """Every end-of-run check passed."""
        return not self.problems


class Skipped(msgspec.Struct):
    """A size that failed, and why."""

    agents: int
    reason: str


class MeteringCost(msgspec.Struct):
    """One size with metering off and on: each mode's actions over the sum of its windows."""

    agents: int
    runs_per_mode: int
    actions_per_s_off: float
    actions_per_s_on: float
    #: Throughput lost to metering, in % of the rate without it (negative: the run with it was faster),
    #: and the standard error of that difference from the spread of the runs' rates (the host's noise).
    cost_pct: float
    cost_stderr_pct: float
    supervisor_cpu_ms_per_action_off: float
    supervisor_cpu_ms_per_action_on: float
    worker_cpu_ms_per_action_off: float
    worker_cpu_ms_per_action_on: float
    #: The CPU per action (supervisor + workers) metering adds, in % of it without: the throughput it
    #: costs when the CPUs are the limit, measured by the kernel whatever else runs on the host.
    cpu_cost_pct: float
    #: The meter's own CPU per action: its spans per action × what one span costs (``meter_span_cost_us``),
    #: in % of the CPU per action without metering — the same cost, counted from its parts.
    meter_span_us: float
    meter_cpu_pct: float
    attributed_pct: float


class Report(ReportHead):
    """The JSON file."""

    think_ms: int
    policy: list[str]
    target: str
    metering_target: str
    results: list[SizeResult]
    metering: list[MeteringCost]
    skipped: list[Skipped]
    rules_policy: list[str]
    #: Throughput with the ecology's rules on, against off, per size (target ≥ ``RULES_TARGET``).
    rules_target: str
    #: The web dashboard's cost at 1,000 agents, off and on in one run: a ``benchmarks.dashboard.Cost``
    #: as JSON (that module builds on this one), None when the phase failed.
    dashboard: dict[str, Any] | None = None
    #: The ``LARGE`` size: it runs, its actions/s, and the supervisor's RSS against its target.
    large_target: str = ""


# ------------------------------------------------------------------------------ process sampling


def _rss_bytes() -> int:
    """VmRSS of this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, by kind of thread (``runtime.economy.metering``)."""
    out: dict[str, float] = collections.defaultdict(float)
    for name, ns in thread_cpu_ns().values():
        out[name] += ns / 1e9
    return dict(out)


class RssSampler:
    """A thread sampling this process's RSS every ``SAMPLE_EVERY_S`` while ``recording`` is set."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.recording = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            if self.recording:
                self.samples.append(_rss_bytes())

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------- the runtime


def policy_for(i: int, n: int, rules: bool = False) -> list[AgentAction]:
    """Agent ``i``'s policy: noop, give 1 scrip to the next agent, read the bulletin, noop — rotated by ``i``.
    With the rules, the noops are an offer of its own and the acceptance of the previous agent's."""
    base: list[AgentAction] = [
        MakeOffer(asset="memory_quota", amount=1, price=1, name="o") if rules else Noop(),
        TransferScrip(to=agent_id((i + 1) % n), amount=1),
        ReadArtifact(id=BULLETIN),
        AcceptOffer(offer=f"{agent_id((i - 1) % n)}.o") if rules else Noop(),
    ]
    k = i % len(base)
    return base[k:] + base[:k]


POLICY_TEXT = ["noop", "transfer 1 scrip to the next agent", f"read_artifact {BULLETIN} (public)", "noop"]
RULES_TEXT = [
    "offer 1 memory_quota for 1 scrip as <me>.o",
    "transfer 1 scrip to the next agent",
    f"read_artifact {BULLETIN} (contract:{GATE})",
    "accept_offer <previous agent>.o",
    "one trigger per 10 agents on artifact_written about its own inbox (not written in the window)",
]


def agent_id(i: int) -> str:
    """Ids that sort in creation order."""
    return f"a{i:04d}"


@dataclass(slots=True)
class Drive:
    """Shared state of the agents' driving coroutines."""

    stop: bool = False
    #: Turn latencies (ns) of the turns that ended inside the window [start_ns, end_ns).
    start_ns: int = 0
    end_ns: int = 0
    latencies: list[int] = field(default_factory=list)


async def drive(agent: Agent, state: Drive) -> None:
    """``Agent.run`` with a clean stop: each turn runs to its end, so every think is counted once."""
    pc = time.perf_counter_ns
    lat = state.latencies
    while not state.stop:
        t0 = pc()
        await agent.step()
        t1 = pc()
        if state.start_ns <= t1 < state.end_ns:
            lat.append(t1 - t0)
    await agent.settle()  # its last turn's action event, when the turn did not wait for it


def _turns(agents: Sequence[Agent]) -> tuple[int, int]:
    return sum(a.actions for a in agents), sum(a.rejected for a in agents)


@dataclass(slots=True)
class Window:
    """What was read at the start and end of the measured window."""

    wall: float
    cpu: float
    threads: dict[str, float]
    applied: int
    rejected: int
    charged: float
    kernel: float
    books: SupervisorBooks
    spans: int


def _snapshot(agents: Sequence[Agent], pool: WorkerPool, node: Node) -> Window:
    applied, rejected = _turns(agents)
    return Window(
        time.perf_counter(),
        time.process_time(),
        _thread_cpu(),
        applied,
        rejected,
        pool.accounts.charged(),
        sum(pool.kernel_cpu().values()),
        node.economy.meter.books(),
        node.economy.meter.spans,
    )


def _burst_seconds(rate_millicores: int, horizon_s: float) -> float:
    """A burst whose bucket holds ``2 × horizon_s`` CPU-seconds: more than one agent (one think at a time,
    so at most one CPU-second per second) can use in the whole run."""
    return 2.0 * horizon_s * 1000.0 / rate_millicores


async def measure(
    n: int,
    data: Path,
    duration: float,
    sampler: RssSampler,
    profile: Path | None,
    metering: bool = True,
    rules: bool = False,
) -> SizeResult:
    """Open a runtime for ``n`` agents in ``data``, run them, close everything, verify the stores.

    ``profile``: where to write a py-spy flame graph of this process during the measured window.
    ``metering``: whether the supervisor meters its CPU per agent (``EconomyConfig.metering``).
    """
    rss_before = _rss_bytes()
    load = os.getloadavg()[0]
    warmup_max = max(WARMUP_MAX_S, n * WARMUP_PER_AGENT_S)
    horizon = warmup_max + duration + DRAIN_MAX_S
    problems: list[str] = []
    capacity = capacity_millicores(Config(data_dir=str(data)), cg.discover())
    rate = max(1, capacity // n)  # more agents than millicores: one each, oversubscribed (module docstring)
    burst = _burst_seconds(rate, horizon)
    cfg = Config(
        data_dir=str(data),
        economy=EconomyConfig(burst_seconds=burst, metering=metering),
        pool=PoolConfig(prefetch=PREFETCH),
        agents=[
            AgentConfig(
                id=agent_id(i),
                brain="scripted",
                policy=policy_for(i, n, rules),
                think_ms=THINK_MS,
                cpu_rate=rate,
                llm_rate=0,
                scrip=SCRIP,
            )
            for i in range(n)
        ],
    )
    state = Drive()
    collector = gc.get_threshold()
    node = Node(cfg)
    if rate * n > capacity:
        node.sizing = msgspec.structs.replace(node.sizing, cpu_millicores=rate * n)
    try:
        async with node:
            pool, ledger, events = node.pool, node.backends.ledger, node.events
            world = node.world
            readable = f"contract:{GATE}" if rules else "public"
            if rules:
                gate = b"world.result({'allow': world.args['action'] == 'read', 'any_caller': True})"
                await world.write_artifact(agent_id(0), GATE, gate, kind="code")
                await world.write_artifact(agent_id(0), WATCH, b"world.result(world.args['seq'])", kind="code")
                for i in range(0, n, TRIGGER_EVERY):
                    await world.subscribe(agent_id(i), WATCH, "artifact_written", about=f"{agent_id(i)}-inbox")
            await world.write_artifact(agent_id(0), BULLETIN, b"the market opens at nine", readable=readable)
            agents = [a for a in node.agents if isinstance(a, Agent)]
            tasks = [asyncio.create_task(drive(a, state), name=f"agent:{a.id}") for a in agents]
            # The collector as the supervisor sets it once its agents start (``quiet_collector``), undone below.
            quiet_collector()
            try:
                # Warm-up: every agent through one turn (its first estimate measured), and at least WARMUP_S.
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < warmup_max:
                    await asyncio.sleep(0.05)
                    if time.perf_counter() - t0 >= WARMUP_S and all(a.actions + a.rejected for a in agents):
                        break
                    if any(t.done() for t in tasks):
                        break
                warmup = time.perf_counter() - t0
                if not all(a.actions + a.rejected for a in agents):
                    problems.append(f"after {warmup:.0f} s of warm-up some agents had not finished a turn")
                spy = None
                if profile is not None:
                    spy = await asyncio.to_thread(PySpy.start, os.getpid(), profile, duration + 30, "supervisor")
                sampler.samples.clear()
                sampler.recording = True
                first = _snapshot(agents, pool, node)
                state.start_ns = time.perf_counter_ns()
                state.end_ns = state.start_ns + int(duration * 1e9)
                await asyncio.wait(tasks, timeout=duration)  # returns early only if an agent failed
                last = _snapshot(agents, pool, node)
                sampler.recording = False
                if spy is not None:
                    await asyncio.to_thread(spy.stop, "supervisor")
            finally:
                state.stop = True
                _, stuck = await asyncio.wait(tasks, timeout=DRAIN_MAX_S)
                for t in stuck:
                    t.cancel()
                if stuck:
                    problems.append(f"{len(stuck)} agents did not finish their turn within {DRAIN_MAX_S:g} s")
                    await asyncio.wait(stuck, timeout=10)
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    problems.append(f"{t.get_name()} failed: {type(exc).__name__}: {exc}")
            # Every agent finished its last turn: each task it ran ended and is charged, each event durable.
            applied, rejected = _turns(agents)
            thinks = applied + rejected
            report = check(ledger)
            problems += [f"ledger: {p}" for p in report.problems[:5]]
            burns = sum(1 for r in ledger.usage_records() if r.kind == "burn")
            if burns != thinks:
                problems.append(f"{burns} burn usage records for {thinks} thinks")
            all_events = events.read()
            gapless = [e.seq for e in all_events] == list(range(1, len(all_events) + 1))
            gapless = gapless and events.last_seq() == len(all_events)
            if not gapless:
                problems.append("the event log's seqs are not 1..n")
            acts = [e for e in all_events if e.kind == "action"]
            if len(acts) != thinks:
                problems.append(f"{len(acts)} action events for {thinks} thinks")
            reasons = collections.Counter(
                f"{e.fields.get('action')}: {str(e.fields.get('reason', ''))[:60]}" for e in acts if not e.fields["ok"]
            )
            blocked = sum(1 for e in all_events if e.kind == "agent_blocked")
            await node.economy.flush_supervisor()
            charged_sup = sum(r.supervisor_cpu_seconds for r in ledger.usage_records())
            accepted = sum(1 for e in ledger.journal() if isinstance(e.op, Accepted))
            firings = sum(t.fired for t in world.triggers.triggers.values())
    finally:
        sampler.recording = False
        gc.unfreeze()
        gc.set_threshold(*collector)
    secs = last.wall - first.wall
    done = (last.applied - first.applied) + (last.rejected - first.rejected)
    lat = sorted(state.latencies)
    workers = pool.size
    sup_ms = 1000 * (last.cpu - first.cpu) / done if done else math.nan
    wrk_ms = 1000 * (last.kernel - first.kernel) / done if done else math.nan
    cpus = len(os.sched_getaffinity(0))
    books = last.books.minus(first.books)
    per = 1e6 * done if done else math.nan  # ns -> ms per action
    return SizeResult(
        agents=n,
        metering=metering,
        load_avg_1m=round(load, 2),
        rules=rules,
        workers=workers,
        cpu_rate_millicores=rate,
        burst_seconds=round(burst, 1),
        seconds=round(secs, 3),
        warmup_s=round(warmup, 2),
        actions=done,
        applied=last.applied - first.applied,
        rejected=last.rejected - first.rejected,
        actions_per_s=round(done / secs, 1) if secs > 0 else 0.0,
        p50_ms=round(percentile_us(lat, 50) / 1000, 2),
        p99_ms=round(percentile_us(lat, 99) / 1000, 2),
        rss_mb_before=round(rss_before / _MB, 1),
        rss_mb_peak=round(max(sampler.samples, default=_rss_bytes()) / _MB, 1),
        supervisor_cpu_pct=round(100 * (last.cpu - first.cpu) / secs, 1),
        supervisor_threads_cpu_pct={
            k: round(100 * (v - first.threads.get(k, 0.0)) / secs, 1)
            for k, v in sorted(last.threads.items(), key=lambda kv: -(kv[1] - first.threads.get(kv[0], 0.0)))
            if v - first.threads.get(k, 0.0) > 0
        },
        worker_util_pct=round(100 * (last.charged - first.charged) / (workers * secs), 1),
        worker_kernel_pct=round(100 * (last.kernel - first.kernel) / (workers * secs), 1),
        supervisor_cpu_ms_per_action=round(sup_ms, 3),
        worker_cpu_ms_per_action=round(wrk_ms, 3),
        cpu_bound_actions_per_s=round(1000 * cpus / (sup_ms + wrk_ms), 1) if done else 0.0,
        supervisor_agents_ms_per_action=round(books.agents_ns / per, 4),
        supervisor_overhead_ms_per_action={
            k: round(v / per, 4) for k, v in sorted(books.overhead_ns.items(), key=lambda kv: -kv[1]) if v > 0
        },
        supervisor_unattributed_ms_per_action=round(books.unattributed_ns / per, 4),
        supervisor_attributed_pct=round(100 * (1 - books.relative_error), 2),
        supervisor_agents_pct=round(100 * books.agents_share, 2),
        supervisor_charged_s=round(charged_sup, 4),
        metered_spans_per_action=round((last.spans - first.spans) / done, 2) if done else 0.0,
        thinks=thinks,
        burn_records=burns,
        action_events=len(acts),
        events=len(all_events),
        blocked_events=blocked,
        ledger_journal_entries=report.journal_entries,
        offers_accepted=accepted,
        trigger_firings=firings,
        contract_runs=world.access.contract_runs,
        ledger_ok=report.ok,
        events_gapless=gapless,
        reject_reasons=dict(reasons.most_common(5)),
        problems=problems,
    )


# ---------------------------------------------------------------------------------------- output


def print_table(results: list[SizeResult]) -> None:
    """One row per number of agents."""
    head = (
        f"{'agents':>6} {'meter':>5} {'rules':>5} {'actions/s':>10} {'applied':>8} {'rejected':>8} {'p50 ms':>7} "
        f"{'p99 ms':>8} {'RSS MB':>7} {'sup CPU %':>9} {'worker util %':>13} {'verified':>8}"
    )
    print_rows(
        head,
        (
            f"{r.agents:>6,} {'on' if r.metering else 'off':>5} {'on' if r.rules else 'off':>5} "
            f"{r.actions_per_s:>10,.0f} {r.applied:>8,} {r.rejected:>8,} {r.p50_ms:>7.1f} {r.p99_ms:>8.1f} "
            f"{r.rss_mb_peak:>7.1f} {r.supervisor_cpu_pct:>9.0f} {r.worker_util_pct:>13.0f} "
            f"{'yes' if r.verified else 'NO':>8}"
            for r in results
        ),
    )
    print(
        "RSS: peak of the supervisor's VmRSS in the window; sup CPU: process_time of all its threads (100 = one "
        "CPU); worker util: CPU charged to tasks / (workers × seconds)"
    )
    for r in results:
        threads = ", ".join(f"{k} {v:.0f}%" for k, v in list(r.supervisor_threads_cpu_pct.items())[:5])
        print(
            f"  {r.agents:>5,} agents, metering {'on' if r.metering else 'off'}: CPU per action: supervisor "
            f"{r.supervisor_cpu_ms_per_action:.2f} ms + workers {r.worker_cpu_ms_per_action:.2f} ms "
            f"(at most {r.cpu_bound_actions_per_s:,.0f} actions/s on these CPUs); "
            f"workers at {r.worker_kernel_pct:.0f}% (kernel); supervisor threads: {threads}"
        )
        print(
            f"         checks: {r.thinks:,} thinks = {r.burn_records:,} burn usage records, {r.action_events:,} action "
            f"events of {r.events:,} (seqs gapless: {'yes' if r.events_gapless else 'NO'}), ledger check "
            f"{'ok' if r.ledger_ok else 'FAILED'} ({r.ledger_journal_entries:,} journal entries), "
            f"{r.blocked_events} agent_blocked"
            + (
                f"; rules: {r.offers_accepted:,} offers accepted, {r.trigger_firings:,} trigger firings, "
                f"{r.contract_runs:,} contract runs"
                if r.rules
                else ""
            )
        )
        if r.metering:
            over = ", ".join(f"{k} {v:.3f}" for k, v in list(r.supervisor_overhead_ms_per_action.items())[:5])
            print(
                f"         supervisor ms per action: agents {r.supervisor_agents_ms_per_action:.3f} "
                f"({r.supervisor_agents_pct:.0f}%), named overhead: {over}; unattributed "
                f"{r.supervisor_unattributed_ms_per_action:+.3f} — {r.supervisor_attributed_pct:.1f}% attributed "
                f"to an agent or a named overhead; {r.supervisor_charged_s:.2f} CPU-s charged to agents in the ledger"
            )
        reasons = "; ".join(f"{k} ×{v:,}" for k, v in r.reject_reasons.items())
        if reasons:
            print(f"         rejected: {reasons}")
        for p in r.problems:
            print(f"    PROBLEM: {p}")


def run_order() -> list[tuple[int, bool, bool]]:
    """One size's runs as (index, metering, rules): ``METERING_ORDER`` with the rules-on runs (metering
    on) placed before the positions ``RULES_AT``."""
    runs: list[tuple[int, bool, bool]] = []
    for i, metering in enumerate(METERING_ORDER):
        if i in RULES_AT:
            runs.append((len(runs), True, True))
        runs.append((len(runs), metering, False))
    if len(METERING_ORDER) in RULES_AT:
        runs.append((len(runs), True, True))
    return runs


def rules_target_line(results: list[SizeResult], sizes: Sequence[int] = SIZES) -> str:
    """The rules' cost: throughput with them on ≥ 90% of throughput with them off, at every size of
    ``sizes`` (the median of the runs with the rules on against the median of those with metering on and
    the rules off)."""
    parts, met = [], True
    for n in sizes:
        offs = [r for r in results if r.agents == n and r.metering and not r.rules]
        ons = [r for r in results if r.agents == n and r.rules]
        if not ons or not offs:
            parts.append(f"{n:,}: no pair")
            met = False
            continue
        on, off = statistics.median(r.actions_per_s for r in ons), statistics.median(r.actions_per_s for r in offs)
        ratio = on / off if off else 0.0
        met = met and ratio >= RULES_TARGET and all(r.verified for r in ons)
        # The same ratio in CPU per action (supervisor + workers): what a loaded host's noise moves least.
        bound_on = statistics.median(r.cpu_bound_actions_per_s for r in ons)
        bound_off = statistics.median(r.cpu_bound_actions_per_s for r in offs)
        cpu = bound_on / bound_off if bound_off else math.nan
        parts.append(
            f"{n:,}: median of {len(ons)} {on:,.0f} / of {len(offs)} {off:,.0f} = {100 * ratio:.0f}% "
            f"(CPU-bound {100 * cpu:.0f}%)"
        )
    verdict = "met" if met else "NOT met"
    return f"rules on / off (target ≥ {100 * RULES_TARGET:.0f}% at every size): {'; '.join(parts)} — {verdict}"


def target_line(results: list[SizeResult]) -> str:
    """The target: 1,000 agents at 1,300 actions/s or more and at most 0.3 ms of supervisor CPU per action,
    fully accounted, on the durable ledger (with the supervisor's metering on, as the runtime runs by
    default); over every such run, weighted by their actions."""
    runs = [r for r in results if r.agents == TARGET_AGENTS and r.metering]
    want = f"target ≥ {TARGET_RATE:,.0f} actions/s, ≤ {TARGET_SUPERVISOR_MS:g} ms of supervisor CPU per action"
    if not runs:
        return f"{TARGET_AGENTS:,} agents: no result ({want}) — NOT met"
    rate, sup = _rate(runs), _per_action(runs, "supervisor_cpu_ms_per_action")
    verified = all(r.verified for r in runs)
    met = rate >= TARGET_RATE and sup <= TARGET_SUPERVISOR_MS and verified
    why = "" if verified else " (the end-of-run checks failed)"
    return (
        f"{TARGET_AGENTS:,} agents: {rate:,.0f} actions/s, supervisor {sup:.3f} ms CPU per action ({want}, with "
        f"full accounting and a durable ledger) — {'met' if met else 'NOT met'}{why}"
    )


def large_line(results: list[SizeResult]) -> str:
    """The ``LARGE`` size: it runs, its actions/s, and the supervisor's peak RSS against its target."""
    r = next((r for r in results if r.agents == LARGE), None)
    if r is None:
        return f"{LARGE:,} agents: no result (target: runs, supervisor RSS ≤ {LARGE_RSS_TARGET_MB:.0f} MB) — NOT met"
    met = r.verified and r.rss_mb_peak <= LARGE_RSS_TARGET_MB
    why = "" if r.verified else " (the end-of-run checks failed)"
    return (
        f"{LARGE:,} agents: {r.actions_per_s:,.0f} actions/s, supervisor {r.supervisor_cpu_ms_per_action:.3f} ms "
        f"CPU per action, RSS peak {r.rss_mb_peak:.0f} MB (target ≤ {LARGE_RSS_TARGET_MB:.0f} MB) — "
        f"{'met' if met else 'NOT met'}{why}"
    )


def meter_span_cost_us(rounds: int = 9, steps: int = 20_000) -> float:
    """The CPU one metered span adds: a coroutine that does nothing but suspend ``steps`` times, run with
    and without the meter, interleaved ``rounds`` times; the median of the differences, per step."""

    async def idle() -> None:
        for _ in range(steps):
            await asyncio.sleep(0)

    async def once(meter: AgentMeter) -> float:
        t0 = time.process_time()
        await meter.metered("calibration", idle())
        return time.process_time() - t0

    async def both() -> list[float]:
        on, off = AgentMeter(), AgentMeter(enabled=False)
        return [await once(on) - await once(off) for _ in range(rounds)]

    return 1e6 * statistics.median(asyncio.run(both())) / steps


def metering_costs(results: list[SizeResult], span_us: float) -> list[MeteringCost]:
    """Each size measured both ways: the throughput metering costs, and how much it attributes.
    ``span_us``: what one metered span costs (``meter_span_cost_us``)."""
    out = []
    for n in SIZES:
        off = [r for r in results if r.agents == n and not r.metering]
        on = [r for r in results if r.agents == n and r.metering]
        if not off or not on or len(off) != len(on):
            continue
        rate_off, rate_on = _rate(off), _rate(on)
        if not rate_off:
            continue
        sup_off, sup_on = (
            _per_action(off, "supervisor_cpu_ms_per_action"),
            _per_action(on, "supervisor_cpu_ms_per_action"),
        )
        wrk_off, wrk_on = _per_action(off, "worker_cpu_ms_per_action"), _per_action(on, "worker_cpu_ms_per_action")
        out.append(
            MeteringCost(
                agents=n,
                runs_per_mode=len(on),
                actions_per_s_off=round(rate_off, 1),
                actions_per_s_on=round(rate_on, 1),
                cost_pct=round(100 * (rate_off - rate_on) / rate_off, 1),
                cost_stderr_pct=round(100 * math.sqrt(_var_of_mean(off) + _var_of_mean(on)) / rate_off, 1),
                supervisor_cpu_ms_per_action_off=round(sup_off, 4),
                supervisor_cpu_ms_per_action_on=round(sup_on, 4),
                worker_cpu_ms_per_action_off=round(wrk_off, 4),
                worker_cpu_ms_per_action_on=round(wrk_on, 4),
                cpu_cost_pct=round(100 * (sup_on + wrk_on - sup_off - wrk_off) / (sup_off + wrk_off), 1),
                meter_span_us=round(span_us, 3),
                meter_cpu_pct=round(
                    100 * _per_action(on, "metered_spans_per_action") * span_us / 1000 / (sup_off + wrk_off), 2
                ),
                attributed_pct=min(r.supervisor_attributed_pct for r in on),
            )
        )
    return out


def _rate(runs: list[SizeResult]) -> float:
    secs = sum(r.seconds for r in runs)
    return sum(r.actions for r in runs) / secs if secs else 0.0


def _var_of_mean(runs: list[SizeResult]) -> float:
    """The variance of the mean of the runs' actions/s (0 for a single run)."""
    return statistics.variance([r.actions_per_s for r in runs]) / len(runs) if len(runs) > 1 else 0.0


def _per_action(runs: list[SizeResult], field: str) -> float:
    """A per-action figure over several runs, weighted by their actions."""
    done = sum(r.actions for r in runs)
    return sum(getattr(r, field) * r.actions for r in runs) / done if done else math.nan


def metering_line(costs: list[MeteringCost]) -> str:
    """The metering targets, over every size measured both ways."""
    if not costs:
        return "metering: no size measured with it both off and on — targets NOT met"
    worst_attr = min(c.attributed_pct for c in costs)
    worst_cost = max(c.cost_pct for c in costs)
    worst_cpu = max(c.cpu_cost_pct for c in costs)
    attributed = worst_attr >= TARGET_ATTRIBUTED_PCT
    # Within two standard errors of the target, the host's noise decides: say so rather than pass or fail.
    if attributed and worst_cost <= TARGET_METERING_COST_PCT:
        verdict = "met"
    elif attributed and all(c.cost_pct - 2 * c.cost_stderr_pct <= TARGET_METERING_COST_PCT for c in costs):
        verdict = "throughput cost within the host's noise of the target (neither shown met nor missed)"
    else:
        verdict = "NOT met"
    sizes = "; ".join(
        f"{c.agents:,} agents {c.attributed_pct:.1f}% attributed, {c.actions_per_s_off:,.0f} → "
        f"{c.actions_per_s_on:,.0f} actions/s ({c.cost_pct:+.1f}% ± {c.cost_stderr_pct:.1f}%), CPU per action "
        f"{c.cpu_cost_pct:+.1f}%, the meter's own spans {c.meter_cpu_pct:.2f}%"
        for c in costs
    )
    return (
        f"metering: supervisor CPU attributed to an agent or a named overhead ≥ {TARGET_ATTRIBUTED_PCT:.0f}% "
        f"(worst {worst_attr:.1f}%), throughput cost ≤ {TARGET_METERING_COST_PCT:.0f}% (worst {worst_cost:+.1f}%; "
        f"CPU per action worst {worst_cpu:+.1f}%) — {verdict} [{sizes}]"
    )


def plot(results: list[SizeResult], costs: list[MeteringCost], path: Path, note: str) -> None:
    """Actions/s (metering off and on), supervisor RSS, and the supervisor's CPU per action split into
    agents, named overhead and unattributed, against the number of agents (log x)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    on = [
        next(r for r in results if r.agents == n and r.metering)
        for n in (*SIZES, LARGE)
        if any(r.agents == n and r.metering for r in results)
    ]
    xs = [r.agents for r in on]
    fig, (left, right, split) = plt.subplots(1, 3, figsize=(18, 5))
    cx = [c.agents for c in costs]
    left.plot(cx, [c.actions_per_s_on for c in costs], "o-", color="tab:blue", label="actions/s, metering on")
    left.plot(cx, [c.actions_per_s_off for c in costs], "x:", color="tab:gray", label="actions/s, metering off")
    if large := [r for r in on if r.agents == LARGE]:
        left.plot(xs[-1:], [large[0].actions_per_s], "s", color="tab:blue", label=f"{LARGE:,} agents, one run")
    left.axhline(TARGET_RATE, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET_RATE:,.0f}/s")
    for c in costs:
        left.annotate(
            f"{c.actions_per_s_on:,.0f} ({-c.cost_pct:+.1f}% vs off)",
            (c.agents, c.actions_per_s_on),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=9,
        )
    left.set_ylabel("actions per second (applied + rejected)")
    left.set_ylim(0, 1.2 * max(TARGET_RATE, *(r.actions_per_s for r in results)))
    right.plot(xs, [r.rss_mb_peak for r in on], marker="o", color="tab:green", label="peak in the window")
    right.plot(
        xs,
        [r.rss_mb_before for r in on],
        marker=".",
        linestyle=":",
        color="tab:gray",
        label="before the size's runtime opened",
    )
    right.set_ylabel("supervisor RSS (MB)")
    right.set_ylim(bottom=0)
    for ax, title in ((left, "Throughput"), (right, "Supervisor memory")):
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
        ax.set_xlabel("agents")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    _plot_split(split, on)
    fig.suptitle(f"Ecology end to end: scripted agents, think = 1 ms Burn on a worker, durable ledger\n{note}")
    save_figure(fig, path)


def _plot_split(ax: Any, on: list[SizeResult]) -> None:
    """Stacked bars: the supervisor's CPU per action charged to agents, per named overhead (the largest
    four, the rest together) and unattributed."""
    labels = [f"{r.agents:,}" for r in on]
    names: list[str] = []
    for r in on:
        names += [k for k in list(r.supervisor_overhead_ms_per_action)[:4] if k not in names]
    names = names[:4]
    bottom = [0.0] * len(on)
    layers = [("charged to agents", [r.supervisor_agents_ms_per_action for r in on])]
    layers += [(n, [r.supervisor_overhead_ms_per_action.get(n, 0.0) for r in on]) for n in names]
    layers.append(
        (
            "other named overhead",
            [sum(v for k, v in r.supervisor_overhead_ms_per_action.items() if k not in names) for r in on],
        )
    )
    layers.append(("unattributed", [max(0.0, r.supervisor_unattributed_ms_per_action) for r in on]))
    for name, values in layers:
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, r in enumerate(on):
        ax.annotate(
            f"{r.supervisor_attributed_pct:.1f}% attributed",
            (i, bottom[i]),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=9,
        )
    ax.set_xlabel("agents")
    ax.set_ylabel("supervisor CPU per action (ms)")
    ax.set_ylim(0, 1.45 * max(bottom, default=1.0))  # room for the legend above the bars
    ax.set_title("Supervisor CPU per action, metering on")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper center", fontsize=7, ncol=3)


def dashboard_cost(quick: bool) -> tuple[str, dict[str, Any]] | None:
    """The web dashboard's cost with one browser attached at 1,000 agents, its windows off and on in one
    run (``benchmarks/dashboard.py``): its target line and the figures as JSON; None, having said why,
    when that phase failed."""
    from benchmarks import dashboard  # imported here: it builds on this module

    print(f"[dashboard at {dashboard.AGENTS:,} agents, off and on] starting", flush=True)
    try:
        cost = dashboard.cost(quick)
    except Exception as exc:  # the sizes' numbers are kept
        print(f"[dashboard] FAILED: {type(exc).__name__}: {exc}", flush=True)
        return None
    return cost.target, msgspec.to_builtins(cost)


def run(opts: Options) -> int:
    """Measure every size; print the table and the target; write the JSON and the plot.

    Returns 1 if a size or the dashboard's phase failed or a size's stores did not hold what was counted,
    else 0.
    """
    duration = QUICK_S if opts.quick else FULL_S
    mode = "quick" if opts.quick else "full"
    tmp, host = scratch("ecology", ["lmdb", "msgspec", "pyzmq", "dulwich"])
    # ``--sizes``: those only (the largest if named), and no dashboard phase.
    chosen = opts.sizes if opts.sizes is not None else (*SIZES, LARGE)
    small = [n for n in chosen if n != LARGE]
    large = [(LARGE, (0, True, False))] if LARGE in chosen else []
    sizes = ", ".join(f"{n:,}" for n in small)
    what = (
        f"{sizes} scripted agents, {duration:g} s each after a warm-up, {len(run_order())} runs per size "
        f"(metering off and on, interleaved, {len(RULES_AT)} of them with the rules on)"
        + (f", then {LARGE:,} once" if large else "")
        + f"; think = {THINK_MS} ms Burn on a worker"
    )
    announce("ecology", opts, what, host, f"files in {tmp}")
    results: list[SizeResult] = []
    skipped: list[Skipped] = []
    failed = False
    sampler = RssSampler()
    before = {pid for pid, _ in child_pids()}
    try:
        # Per size: metering off and on interleaved (the rules off), the rules-on runs among them.
        runs = run_order()
        for n, (i, metering, rules) in [*((n, run) for n in small for run in runs), *large]:
            tag = f"[{n:,} agents, metering {'on' if metering else 'off'}, rules {'on' if rules else 'off'}]"
            print(f"{tag} starting", flush=True)
            data = tmp / f"agents-{n}-{i}"
            data.mkdir(mode=0o700)
            try:
                profile = (
                    opts.json_path.with_name("ecology-supervisor.svg")
                    if opts.profile and n == SIZES[-1] and i == METERING_ORDER.index(True)
                    else None
                )
                r = asyncio.run(measure(n, data, duration, sampler, profile, metering, rules))
            except Exception as exc:  # one size's failure must not cost the others' numbers
                print(f"{tag} FAILED: {type(exc).__name__}: {exc}", flush=True)
                skipped.append(Skipped(n, f"{type(exc).__name__}: {exc}"))
                failed = True
                continue
            finally:
                shutil.rmtree(data, ignore_errors=True)
            results.append(r)
            failed = failed or not r.verified
            print(
                f"{tag} done: {r.actions_per_s:,.0f} actions/s ({r.actions:,} in {r.seconds:.2f} s after "
                f"{r.warmup_s:.1f} s warm-up), p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, RSS "
                f"{r.rss_mb_peak:.0f} MB, {'verified' if r.verified else 'CHECKS FAILED'}",
                flush=True,
            )
        dash = dashboard_cost(opts.quick) if opts.sizes is None else None
        failed = failed or (dash is None and opts.sizes is None)
    finally:
        sampler.close()
        shutil.rmtree(tmp, ignore_errors=True)
        stop_resource_trackers()
        left = [(pid, name) for pid, name in child_pids() if pid not in before]
        if left:
            print(f"warning: processes left behind: {', '.join(f'{p} ({n})' for p, n in left)}")
            failed = True
    print_table(results)
    pipeline = [r for r in results if not r.rules]
    line = target_line(pipeline)
    span_us = meter_span_cost_us()
    print(f"one metered span costs {span_us:.2f} µs of CPU (calibrated)", flush=True)
    costs = metering_costs(pipeline, span_us)
    meter_line = metering_line(costs)
    rules_line = rules_target_line(results, small)
    big = large_line(results)
    print()
    print(line)
    print(big)
    print(meter_line)
    print(rules_line)
    if dash is not None:
        print(dash[0])
    report = Report(
        "ecology",
        mode,
        host,
        duration,
        THINK_MS,
        POLICY_TEXT,
        line,
        meter_line,
        results,
        costs,
        skipped,
        RULES_TEXT,
        rules_line,
        dash[1] if dash is not None else None,
        big,
    )
    note = (
        f"{host['cpus_usable']} CPUs, {mode} run ({duration:g} s per run, metering off and on interleaved, "
        f"{len(METERING_ORDER)} runs per size, and {len(RULES_AT)} with the rules on among them)"
    )
    publish(opts.json_path, report, lambda png: plot(pipeline, costs, png, note) if pipeline else None)
    return 1 if failed else 0
