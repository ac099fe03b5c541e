"""The whole ecology end to end: actions per second and supervisor memory with 10, 100 and 1,000 agents.

Each size gets a fresh runtime wired as the supervisor wires it: a real ``WorkerPool`` sized from the
machine (recording the tasks in flight, ``runtime.pool.inflight``), a durable ``LmdbLedger``, a durable
``EventLog``, a ``GitStore``, the buckets and the economy (``open_economy``), and the world with the
events as its ``emit``. No memory store: the policy has no memory actions. Every agent is a real
``Agent`` with a ``ScriptedBrain`` whose policy is cheap but goes through the whole pipeline:

    noop, transfer 1 scrip to the next agent, read the public artifact written at setup, noop

(rotated per agent so that the four kinds are in flight at once), with ``think_ms=1``: every think is a
``Burn`` task on a worker, measured and charged (a usage record and the new bucket levels in one durable
ledger operation), and every action, applied or rejected, is a durable event; the agent's cursor moves
durably after each turn.

CPU rights: each agent holds ``capacity_millicores // agents`` millicores, so that all of them fit the
container, and a burst (``burst_seconds``) large enough that its bucket holds more CPU than one agent can
possibly use during the run (one think at a time, so at most one CPU-second per second). The buckets
are charged exactly as usual, but never hold an agent back: the benchmark measures the pipeline, not
the buckets (the count of ``agent_blocked`` events, expected 0, shows it).

All agents run concurrently: a warm-up (until every agent finished a turn, and at least ``WARMUP_S``),
then a fixed measured window, then each agent finishes the turn in hand. Measured in the window:
actions per second (applied + rejected, from the agents' counters), turn latency, the supervisor's RSS
(VmRSS of this process, sampled by a thread) and CPU (``time.process_time``, all its threads, with a
per-thread breakdown), and the workers' utilisation (CPU charged to tasks / workers × seconds).

Verified after each size, on the quiet stores: ``runtime.economy.ledger.check`` passes; exactly one ``burn``
usage record per think; the event log's seqs are 1..n with no gap, with one ``action`` event per think.

The ecology's own rules (``--rules``, the default): each size runs twice in the same process, with the
rules off (the policy above) and on — the same four turns, two of them through the rules:

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
size.

``--profile`` also records a py-spy flame graph of this process during the 1,000-agent window, written
beside the JSON as ``ecology-supervisor.svg``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import shutil
import tempfile
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
    child_pids,
    host_info,
    percentile_us,
    publish,
    stop_resource_trackers,
)
from runtime.actions import AcceptOffer, AgentAction, MakeOffer, Noop, ReadArtifact, TransferScrip
from runtime.agents.loop import Agent
from runtime.config import AgentConfig, Config, EconomyConfig
from runtime.economy.ledger import AcceptOffer as Accepted
from runtime.economy.ledger.check import check
from runtime.economy.rights import capacity_millicores
from runtime.host import cgroups as cg
from runtime.node import Node
from runtime.pool import WorkerPool

SIZES = (10, 100, 1000)
FULL_S, QUICK_S = 10.0, 3.0
#: Warm-up: at least this long, and until every agent has finished one turn (at most ``WARMUP_MAX_S``).
WARMUP_S, WARMUP_MAX_S = 1.0, 60.0
#: After the window, how long the agents get to finish the turn in hand before they are cancelled.
DRAIN_MAX_S = 60.0
THINK_MS = 1
SCRIP = 1000
BULLETIN = "bulletin"
GATE, WATCH = "gate", "watch"
#: One trigger per this many agents (with the rules on).
TRIGGER_EVERY = 10
#: The rules may cost at most this share of the throughput.
RULES_TARGET = 0.9
SAMPLE_EVERY_S = 0.1
TARGET_AGENTS = 1000
TARGET_RATE = 1000.0
_MB = 1 << 20


class SizeResult(msgspec.Struct):
    """One number of agents, with the rules off or on."""

    agents: int
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


class Report(msgspec.Struct):
    """The JSON file."""

    benchmark: str
    mode: str
    host: dict[str, Any]
    duration_s: float
    think_ms: int
    policy: list[str]
    target: str
    results: list[SizeResult]
    skipped: list[Skipped]
    rules_policy: list[str]
    #: Throughput with the ecology's rules on, against off, per size (target ≥ ``RULES_TARGET``).
    rules_target: str


# ------------------------------------------------------------------------------ process sampling


def _rss_bytes() -> int:
    """VmRSS of this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (Python's name, else the kernel's)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    names[threading.main_thread().native_id or 0] = "event-loop"
    out: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        name = names.get(int(tid), comm)
        out[name] += (int(rest[11]) + int(rest[12])) / _TICK
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


def _snapshot(agents: Sequence[Agent], pool: WorkerPool) -> Window:
    applied, rejected = _turns(agents)
    return Window(
        time.perf_counter(),
        time.process_time(),
        _thread_cpu(),
        applied,
        rejected,
        pool.accounts.charged(),
        sum(pool.kernel_cpu().values()),
    )


def _burst_seconds(rate_millicores: int, horizon_s: float) -> float:
    """A burst whose bucket holds ``2 × horizon_s`` CPU-seconds: more than one agent (one think at a time,
    so at most one CPU-second per second) can use in the whole run."""
    return 2.0 * horizon_s * 1000.0 / rate_millicores


async def measure(
    n: int, data: Path, duration: float, sampler: RssSampler, profile: Path | None, rules: bool = False
) -> SizeResult:
    """Open a runtime for ``n`` agents in ``data``, run them, close everything, verify the stores.

    ``profile``: where to write a py-spy flame graph of this process during the measured window.
    """
    rss_before = _rss_bytes()
    horizon = WARMUP_MAX_S + duration + DRAIN_MAX_S
    problems: list[str] = []
    capacity = capacity_millicores(Config(data_dir=str(data)), cg.discover())
    rate = capacity // n
    if rate <= 0:
        raise RuntimeError(f"{n} agents do not fit {capacity} millicores")
    burst = _burst_seconds(rate, horizon)
    cfg = Config(
        data_dir=str(data),
        economy=EconomyConfig(burst_seconds=burst),
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
    try:
        async with Node(cfg) as node:
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
            try:
                # Warm-up: every agent through one turn (its first estimate measured), and at least WARMUP_S.
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < WARMUP_MAX_S:
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
                first = _snapshot(agents, pool)
                state.start_ns = time.perf_counter_ns()
                state.end_ns = state.start_ns + int(duration * 1e9)
                await asyncio.wait(tasks, timeout=duration)  # returns early only if an agent failed
                last = _snapshot(agents, pool)
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
            accepted = sum(1 for e in ledger.journal() if isinstance(e.op, Accepted))
            firings = sum(t.fired for t in world.triggers.triggers.values())
    finally:
        sampler.recording = False
    secs = last.wall - first.wall
    done = (last.applied - first.applied) + (last.rejected - first.rejected)
    lat = sorted(state.latencies)
    workers = pool.size
    sup_ms = 1000 * (last.cpu - first.cpu) / done if done else math.nan
    wrk_ms = 1000 * (last.kernel - first.kernel) / done if done else math.nan
    cpus = len(os.sched_getaffinity(0))
    return SizeResult(
        agents=n,
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
        f"{'agents':>6} {'rules':>5} {'actions/s':>10} {'applied':>8} {'rejected':>8} {'p50 ms':>7} {'p99 ms':>8} "
        f"{'RSS MB':>7} {'sup CPU %':>9} {'worker util %':>13} {'verified':>8}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.agents:>6,} {'on' if r.rules else 'off':>5} {r.actions_per_s:>10,.0f} {r.applied:>8,} "
            f"{r.rejected:>8,} {r.p50_ms:>7.1f} "
            f"{r.p99_ms:>8.1f} {r.rss_mb_peak:>7.1f} {r.supervisor_cpu_pct:>9.0f} {r.worker_util_pct:>13.0f} "
            f"{'yes' if r.verified else 'NO':>8}"
        )
    print()
    print(
        "RSS: peak of the supervisor's VmRSS in the window; sup CPU: process_time of all its threads (100 = one "
        "CPU); worker util: CPU charged to tasks / (workers × seconds)"
    )
    for r in results:
        threads = ", ".join(f"{k} {v:.0f}%" for k, v in list(r.supervisor_threads_cpu_pct.items())[:5])
        print(
            f"  {r.agents:>5,} agents: CPU per action: supervisor {r.supervisor_cpu_ms_per_action:.2f} ms + workers "
            f"{r.worker_cpu_ms_per_action:.2f} ms (at most {r.cpu_bound_actions_per_s:,.0f} actions/s on these CPUs); "
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
        reasons = "; ".join(f"{k} ×{v:,}" for k, v in r.reject_reasons.items())
        if reasons:
            print(f"         rejected: {reasons}")
        for p in r.problems:
            print(f"    PROBLEM: {p}")


def rules_target_line(results: list[SizeResult]) -> str:
    """The rules' cost: throughput with them on ≥ 90% of throughput with them off, at every size."""
    parts, met = [], True
    for n in SIZES:
        off = next((r for r in results if r.agents == n and not r.rules), None)
        on = next((r for r in results if r.agents == n and r.rules), None)
        if off is None or on is None or not off.actions_per_s:
            parts.append(f"{n:,}: no pair")
            met = False
            continue
        ratio = on.actions_per_s / off.actions_per_s
        met = met and ratio >= RULES_TARGET and on.verified
        parts.append(f"{n:,}: {on.actions_per_s:,.0f} / {off.actions_per_s:,.0f} = {100 * ratio:.0f}%")
    verdict = "met" if met else "NOT met"
    return f"rules on / off (target ≥ {100 * RULES_TARGET:.0f}% at every size): {'; '.join(parts)} — {verdict}"


def target_line(results: list[SizeResult]) -> str:
    """The target: 1,000 agents at 1,000 actions/s or more, fully accounted, on the durable ledger."""
    r = next((r for r in results if r.agents == TARGET_AGENTS), None)
    if r is None:
        return f"{TARGET_AGENTS:,} agents: no result (target ≥ {TARGET_RATE:,.0f} actions/s) — NOT met"
    met = r.actions_per_s >= TARGET_RATE and r.verified
    why = "" if r.verified else " (the end-of-run checks failed)"
    return (
        f"{TARGET_AGENTS:,} agents: {r.actions_per_s:,.0f} actions/s (target ≥ {TARGET_RATE:,.0f} with full "
        f"accounting and a durable ledger) — {'met' if met else 'NOT met'}{why}"
    )


def plot(results: list[SizeResult], path: Path, note: str) -> None:
    """Actions/s and supervisor RSS against the number of agents (log x)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    xs = [r.agents for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    left.plot(xs, [r.actions_per_s for r in results], marker="o", color="tab:blue", label="actions/s")
    left.axhline(TARGET_RATE, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET_RATE:,.0f}/s")
    for r in results:
        left.annotate(
            f"{r.actions_per_s:,.0f}",
            (r.agents, r.actions_per_s),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=9,
        )
    left.set_ylabel("actions per second (applied + rejected)")
    left.set_ylim(0, 1.2 * max(TARGET_RATE, *(r.actions_per_s for r in results)))
    right.plot(xs, [r.rss_mb_peak for r in results], marker="o", color="tab:green", label="peak in the window")
    right.plot(
        xs,
        [r.rss_mb_before for r in results],
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
    fig.suptitle(f"Ecology end to end: scripted agents, think = 1 ms Burn on a worker, durable ledger\n{note}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(opts: Options) -> int:
    """Measure every size; print the table and the target; write the JSON and the plot.

    Returns 1 if a size failed or its stores did not hold what was counted, else 0.
    """
    duration = QUICK_S if opts.quick else FULL_S
    mode = "quick" if opts.quick else "full"
    host = host_info(["lmdb", "msgspec", "pyzmq", "dulwich"])
    tmp = Path(tempfile.mkdtemp(prefix="aeco-ecology-bench-"))
    host["tmp_dir"] = str(tmp)
    print(
        f"ecology benchmark ({mode}): {', '.join(f'{n:,}' for n in SIZES)} scripted agents, {duration:g} s each "
        f"after a warm-up; think = {THINK_MS} ms Burn on a worker; {host['cpus_usable']} usable CPUs, "
        f"Python {host['python']}; files in {tmp}",
        flush=True,
    )
    results: list[SizeResult] = []
    skipped: list[Skipped] = []
    failed = False
    sampler = RssSampler()
    before = {pid for pid, _ in child_pids()}
    try:
        for n, rules in ((n, rules) for n in SIZES for rules in (False, True)):
            tag = f"[{n:,} agents, rules {'on' if rules else 'off'}]"
            print(f"{tag} starting", flush=True)
            data = tmp / f"agents-{n}-{'on' if rules else 'off'}"
            data.mkdir(mode=0o700)
            try:
                last = n == SIZES[-1] and not rules
                profile = opts.json_path.with_name("ecology-supervisor.svg") if opts.profile and last else None
                r = asyncio.run(measure(n, data, duration, sampler, profile, rules))
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
    finally:
        sampler.close()
        shutil.rmtree(tmp, ignore_errors=True)
        stop_resource_trackers()
        left = [(pid, name) for pid, name in child_pids() if pid not in before]
        if left:
            print(f"warning: processes left behind: {', '.join(f'{p} ({n})' for p, n in left)}")
            failed = True
    print_table(results)
    line = target_line([r for r in results if not r.rules])
    rules_line = rules_target_line(results)
    print()
    print(line)
    print(rules_line)
    report = Report(
        "ecology", mode, host, duration, THINK_MS, POLICY_TEXT, line, results, skipped, RULES_TEXT, rules_line
    )
    note = f"{host['cpus_usable']} CPUs, {mode} run ({duration:g} s per size)"
    off = [r for r in results if not r.rules]  # the plot shows the pipeline alone; the table has both
    publish(opts.json_path, report, lambda png: plot(off, png, note) if off else None)
    return 1 if failed else 0
