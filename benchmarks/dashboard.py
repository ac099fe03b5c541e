"""What the web dashboard costs the supervisor: 1,000 scripted agents (the ecology benchmark's agents and
policy), the supervisor's status refresh every second either way, and measured windows alternating
without the dashboard and with it served and one headless Chromium (Debian's) showing the page — its
status poll every 2 s, its event stream, its artifact list every 5 s. The browser stands in for the
operator's, which runs elsewhere: it runs at the lowest priority (``nice -n19``), so that on a small host
its rendering does not starve the supervisor whose cost is measured.

Measured per window: this process's CPU (``time.process_time``: the supervisor's, all its threads) and
actions per second, and in the "on" windows the CPU of the dashboard's own thread (it serves from a
thread of its own, ``runtime.ops.dashboard``), read from ``/proc/self/task``. The dashboard's cost is
that thread's CPU in percent of the supervisor's, in the same window; the target is at most 2%. The
"off" windows are the comparison a reader can make by hand (the browser itself competes for the CPUs,
so on a small host the agents' pace, not the supervisor's bookkeeping, is what it moves). Windows
alternate (off, on, off, on, …) so that drift on a shared host falls on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.common import Options, host_info, publish, stop_resource_trackers
from benchmarks.ecology import (
    BULLETIN,
    SCRIP,
    THINK_MS,
    Drive,
    _burst_seconds,
    _thread_cpu,
    _turns,
    agent_id,
    drive,
    policy_for,
)
from runtime.agents.loop import Agent
from runtime.config import AgentConfig, Config, EconomyConfig
from runtime.economy.rights import capacity_millicores
from runtime.host import cgroups as cg
from runtime.node import Node
from runtime.ops import dashboard, metrics
from runtime.ops.live import frame, plain
from runtime.ops.stats import Meter
from runtime.ops.status import Status

AGENTS = 1000
FULL_S, QUICK_S = 20.0, 5.0
ROUNDS_FULL, ROUNDS_QUICK = 3, 1
#: After the browser is started, before the window: its page loaded and polling (not measured).
SETTLE_S = 5.0
TARGET_PCT = 2.0


class Phase(msgspec.Struct):
    """One measured window."""

    dashboard: bool
    seconds: float
    actions: int
    actions_per_s: float
    supervisor_cpu_pct: float
    supervisor_cpu_ms_per_action: float
    #: CPU of the dashboard's thread, in percent of one core and of the supervisor's CPU (0 when off).
    dashboard_cpu_pct: float = 0.0
    dashboard_share_pct: float = 0.0


class Report(msgspec.Struct):
    """The benchmark's JSON."""

    benchmark: str
    mode: str
    host: dict[str, object]
    agents: int
    window_s: float
    phases: list[Phase]
    off_cpu_pct: float
    on_cpu_pct: float
    cost_pct: float
    target: str


def _decided(agents: list[Agent]) -> int:
    applied, rejected = _turns(agents)
    return applied + rejected


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("no chromium: scripts/ensure-browser installs Debian's")
    return path


async def measure(data: Path, window_s: float, rounds: int) -> list[Phase]:
    """Run the agents; measure ``rounds`` pairs of windows, off then on."""
    capacity = capacity_millicores(Config(data_dir=str(data)), cg.discover())
    rate = capacity // AGENTS
    horizon = 60.0 + 2 * rounds * (window_s + SETTLE_S) + 60.0
    cfg = Config(
        data_dir=str(data),
        economy=EconomyConfig(burst_seconds=_burst_seconds(rate, horizon)),
        metrics_port=0,
        agents=[
            AgentConfig(
                id=agent_id(i),
                brain="scripted",
                policy=policy_for(i, AGENTS),
                think_ms=THINK_MS,
                cpu_rate=rate,
                llm_rate=0,
                scrip=SCRIP,
            )
            for i in range(AGENTS)
        ],
    )
    phases: list[Phase] = []
    state = Drive()
    async with Node(cfg) as node:
        await node.world.write_artifact(agent_id(0), BULLETIN, b"the market opens at nine", readable="public")
        agents = [a for a in node.agents if isinstance(a, Agent)]
        tasks = [asyncio.create_task(drive(a, state)) for a in agents]
        meter = Meter(node.info)
        dash: dashboard.Dashboard | None = None

        async def refresh() -> None:  # what the supervisor does every status interval, either way
            path = node.data / "run" / "status.json"
            while True:
                snap = meter.snapshot(node.limits, node.sizing, node.pool, node.agents, node.economy)
                st = Status.of(snap, plain(frame(node.pool, node.agents, 0.0, node.world, node.events, snap)), True)
                path.write_bytes(msgspec.json.encode(st))
                if dash is not None:
                    dash.status = st
                await asyncio.sleep(1.0)

        status_task = asyncio.create_task(refresh())
        try:
            t0 = time.perf_counter()
            while not all(a.actions + a.rejected for a in agents) and time.perf_counter() - t0 < 120:
                await asyncio.sleep(0.1)
            for _ in range(rounds):
                for on in (False, True):
                    browser: subprocess.Popen[bytes] | None = None
                    profile = Path(tempfile.mkdtemp(prefix="aeco-chromium-"))
                    if on:
                        registry = metrics.registry(node.pool, node.economy, lambda: node.agents)
                        dash = dashboard.Dashboard(
                            "bench", registry, node.economy.ledger, node.events, node.world.store, lambda: node.agents
                        )
                        sock = dashboard.bind("127.0.0.1", 0)
                        dash.start(sock, asyncio.get_running_loop())
                        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
                        browser = subprocess.Popen(
                            [
                                "nice",  # the operator's browser, not the supervisor's work: it yields the CPUs
                                "-n19",
                                _chromium(),
                                "--headless=new",
                                "--no-sandbox",
                                "--disable-gpu",
                                "--remote-debugging-port=0",
                                f"--user-data-dir={profile}",
                                url,
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    await asyncio.sleep(SETTLE_S)
                    cpu0, wall0, acts0 = time.process_time(), time.perf_counter(), _decided(agents)
                    dash0 = _thread_cpu().get("dashboard", 0.0)
                    await asyncio.sleep(window_s)
                    cpu1, wall1, acts1 = time.process_time(), time.perf_counter(), _decided(agents)
                    dash1 = _thread_cpu().get("dashboard", 0.0)
                    if browser is not None:
                        browser.send_signal(signal.SIGTERM)
                        browser.wait(timeout=30)
                    if dash is not None:
                        await asyncio.to_thread(dash.close)
                        dash = None
                    shutil.rmtree(profile, ignore_errors=True)
                    secs, acts = wall1 - wall0, acts1 - acts0
                    phase = Phase(
                        dashboard=on,
                        seconds=round(secs, 2),
                        actions=acts,
                        actions_per_s=round(acts / secs, 1),
                        supervisor_cpu_pct=round(100 * (cpu1 - cpu0) / secs, 1),
                        supervisor_cpu_ms_per_action=round(1000 * (cpu1 - cpu0) / acts, 4) if acts else float("nan"),
                        dashboard_cpu_pct=round(100 * (dash1 - dash0) / secs, 2),
                        dashboard_share_pct=round(100 * (dash1 - dash0) / (cpu1 - cpu0), 2),
                    )
                    phases.append(phase)
                    print(
                        f"  dashboard {'on ' if on else 'off'}: {phase.actions_per_s:,.0f} actions/s, supervisor CPU "
                        f"{phase.supervisor_cpu_pct:.1f}%, {phase.supervisor_cpu_ms_per_action:.3f} ms per action"
                        + (f"; dashboard thread {phase.dashboard_share_pct:.2f}% of it" if on else ""),
                        flush=True,
                    )
        finally:
            status_task.cancel()
            state.stop = True
            await asyncio.wait(tasks, timeout=60)
            with contextlib.suppress(asyncio.CancelledError):
                await status_task
    return phases


class Cost(msgspec.Struct):
    """What the dashboard costs, over every window of one run (the ecology benchmark keeps it too)."""

    agents: int
    window_s: float
    phases: list[Phase]
    #: The supervisor's CPU (% of a core) without and with the dashboard, and the dashboard thread's.
    off_cpu_pct: float
    on_cpu_pct: float
    dashboard_cpu_pct: float
    #: The dashboard thread's CPU in % of the supervisor's, in the "on" windows; target ≤ ``TARGET_PCT``.
    cost_pct: float
    met: bool
    target: str


def cost(quick: bool) -> Cost:
    """Run the agents in a scratch directory, measure the windows off and on; the cost over all of them."""
    window = QUICK_S if quick else FULL_S
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    tmp = Path(tempfile.mkdtemp(prefix="aeco-dashboard-bench-"))
    try:
        data = tmp / "data"
        data.mkdir(mode=0o700)
        phases = asyncio.run(measure(data, window, rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def total(on: bool) -> tuple[float, float]:
        picked = [p for p in phases if p.dashboard == on]
        secs = sum(p.seconds for p in picked)
        sup = sum(p.supervisor_cpu_pct * p.seconds for p in picked) / secs
        return sup, sum(p.dashboard_cpu_pct * p.seconds for p in picked) / secs

    off, _ = total(False)
    on, dash_pct = total(True)
    pct = 100 * dash_pct / on
    line = (
        f"dashboard cost: {pct:.2f}% of the supervisor's CPU with one browser attached at {AGENTS:,} agents "
        f"(its thread {dash_pct:.2f}% of a core, the supervisor {on:.1f}% with it, {off:.1f}% without; "
        f"target ≤ {TARGET_PCT:g}%: {'met' if pct <= TARGET_PCT else 'NOT met'})"
    )
    return Cost(
        AGENTS, window, phases, round(off, 2), round(on, 2), round(dash_pct, 2), round(pct, 2), pct <= TARGET_PCT, line
    )


def run(opts: Options) -> int:
    """Measure; print and write the JSON. 1 when the cost is over the target."""
    mode = "quick" if opts.quick else "full"
    host = host_info(["uvicorn", "starlette"])
    rounds = ROUNDS_QUICK if opts.quick else ROUNDS_FULL
    window = QUICK_S if opts.quick else FULL_S
    print(f"dashboard benchmark ({mode}): {AGENTS:,} scripted agents, {rounds} × (off, on) windows of {window:g} s")
    try:
        c = cost(opts.quick)
    finally:
        stop_resource_trackers()
    print(c.target)
    report = Report(
        "dashboard", mode, host, c.agents, c.window_s, c.phases, c.off_cpu_pct, c.on_cpu_pct, c.cost_pct, c.target
    )
    publish(opts.json_path, report, lambda png: None)
    return 0 if c.met else 1


__all__ = ["Cost", "cost", "run"]
