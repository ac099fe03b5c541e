"""Find the LLM rate that keeps the container at 70–80% CPU and write it to the calibration file.

``python -m runtime.calibrate [--config FILE] [--agents 5] [--window-s S] [--start-rate 10]
[--max-windows N] [--out PATH]``

It runs ``--agents`` LLM agents in continuous mode — thinking back to back with the configured model
on the real pool, held back only by their ``llm_tokens`` bucket (their CPU buckets get the whole
capacity each, so CPU rights never bind) — and after every window reads the container's CPU counter
from its cgroup (``cpuacct.usage`` on v1, ``cpu.stat`` ``usage_usec`` on v2: this process's cgroup,
which in a container is the container's, workers included):

    utilisation = ΔCPU-seconds / (Δwall-seconds × CPU capacity)

It decides on the utilisation the container has at the current rate, from the CPU per token counted so
far (``at_rate``: the window's own figure swings by a third with the luck of which thinks land in it),
and changes every agent's rate in place for the next window (``decide``):

- above 85%: × 0.8; below 50%: × 1.25;
- 70–80%: in band, unchanged;
- 50–70% and 80–85%: half the proportional step toward 75% (rate × (1 + (0.75/u − 1) / 2)), which is
  always gentler than the big steps.

Each window also reads the container's memory against its limit and its CPU throttling (``cpu.stat``):
a window with memory over 90% of the limit or more than a quarter of its CFS periods throttled is
``over`` and does not count as in band, whatever its CPU says (``runtime.ops.stats.MEMORY_HIGH``,
``THROTTLED_HIGH``) — a rate that only holds while the kernel squeezes the container is not calibrated.

It has converged when two windows in a row are in band (and not over). It then writes the rate (rounded, tokens/s
per agent) with what it was measured on to a YAML file (default ``<data_dir>/calibration.yaml``,
``runtime.config.Calibration``), atomically; the supervisor gives that rate to ``llm_rate: auto``
agents (see ``runtime.host.limits``). Exit 0 when converged; 1 when it did not converge within
``--max-windows`` (nothing written); 2 on a bad argument or a configuration that cannot be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from native.models import ModelNotFound, find_model
from runtime import config as config_mod
from runtime.agents.loop import DEFAULT_PERSONA, LlmBrain
from runtime.config import AgentConfig, Calibration, Config
from runtime.economy.charging import Economy
from runtime.errors import AecoError, ErrorCode, Parser, report
from runtime.host import cgroups as cg
from runtime.host.limits import CapacityError, Limits, detect
from runtime.node import Node
from runtime.ops.stats import MEMORY_HIGH, THROTTLED_HIGH
from runtime.pool import TaskFailed

#: The rule's thresholds (fractions of the container's CPU capacity).
HIGH, LOW = 0.85, 0.50
BAND = (0.70, 0.80)
TARGET = 0.75
LOWER, RAISE = 0.8, 1.25
#: Windows in band in a row that count as converged.
HOLD = 2

Decision = Literal["lower", "raise", "in band", "step up", "step down"]


class Window(msgspec.Struct, frozen=True):
    """One measured window: ``utilisation`` is what the rule decides on (see ``at_rate``), ``measured``
    the container's CPU over the window as the cgroup counted it."""

    n: int
    rate: float
    tokens_per_s: float
    utilisation: float
    decision: Decision
    next_rate: float
    measured: float = 0.0
    #: The container's memory over its limit at the window's end, and the share of its CFS periods
    #: throttled during it (None: no limit, no quota periods).
    memory_share: float | None = None
    throttled_share: float | None = None
    #: Why the window is over (memory or throttling), empty when it is not.
    over: str = ""


def at_rate(cpu_s: float, tokens: int, rate: float, agents: int, capacity: float) -> float:
    """The container's utilisation when ``agents`` agents generate ``rate`` tokens/s each, from the CPU the
    cgroup counted per token generated so far (``cpu_s`` over ``tokens``).

    Why not the window's own utilisation: a think is a whole completion (~100 tokens, about a CPU-second
    here) and the agents' thinks land in a window or not, so a 10–20 s window's CPU varies by ±30% at a
    steady rate — wider than the 70–80% band. The CPU per token, summed over every window, is steady, and
    the token buckets hold each agent to ``rate`` on average; saturation shows as well, as fewer tokens
    for the CPU spent (an estimate above 100%).
    """
    if tokens <= 0 or capacity <= 0:
        raise ValueError(f"tokens and capacity must be positive, got {tokens!r}, {capacity!r}")
    return cpu_s / tokens * rate * agents / capacity


def decide(rate: float, utilisation: float) -> tuple[Decision, float]:
    """The rule: what to do with ``rate`` after a window at ``utilisation`` (a fraction of capacity)."""
    if not (rate > 0 and utilisation >= 0):
        raise ValueError(f"rate must be > 0 and utilisation >= 0, got {rate!r}, {utilisation!r}")
    if utilisation > HIGH:
        return "lower", rate * LOWER
    if utilisation < LOW:
        return "raise", rate * RAISE
    if BAND[0] <= utilisation <= BAND[1]:
        return "in band", rate
    factor = 1 + (TARGET / utilisation - 1) / 2
    return ("step up" if factor > 1 else "step down"), rate * factor


def converged(windows: list[Window]) -> bool:
    """Whether the last ``HOLD`` windows were all in band and none was over."""
    return len(windows) >= HOLD and all(w.decision == "in band" and not w.over for w in windows[-HOLD:])


def over(memory_share: float | None, throttled_share: float | None) -> str:
    """Why a window's container was squeezed: memory above ``MEMORY_HIGH`` of its limit, or more than
    ``THROTTLED_HIGH`` of its CFS periods throttled; empty when neither."""
    why = []
    if memory_share is not None and memory_share >= MEMORY_HIGH:
        why.append(f"memory at {memory_share:.0%} of the limit (over {MEMORY_HIGH:.0%})")
    if throttled_share is not None and throttled_share > THROTTLED_HIGH:
        why.append(f"{throttled_share:.0%} of CPU periods throttled (over {THROTTLED_HIGH:.0%})")
    return "; ".join(why)


def _squeeze(info: cg.CgroupInfo, before: cg.Throttling | None) -> tuple[float | None, float | None]:
    """(memory share of the limit now, throttled share of the CFS periods since ``before``)."""
    limit, mem, thr = cg.memory_limit_bytes(info), cg.memory_usage(info), cg.throttling(info)
    return (mem.value / limit if mem is not None and limit else None), (thr.share_since(before) if thr else None)


class CalibrationFailed(AecoError):
    """Calibration cannot run or cannot go on; the message says why."""

    default_code: ErrorCode = "calibration"


def _context(agent: str, others: list[str]) -> str:
    """A prompt shaped like an agent's context (``runtime.agents.loop.Agent.context``): stable lines
    first, what changes every turn last; the reply instruction is in the system prompt."""
    now = time.gmtime()
    return "\n".join(
        [
            f"You are {agent}. Today (UTC): {time.strftime('%Y-%m-%d', now)}.",
            "Your limits: disk 0/65536 KB, memory 1024 MB per task, paid-model budget $0.00, "
            "CPU rate 1000 millicores, LLM rate 20 tokens/s. Container: 2 CPUs, no memory limit.",
            "Other agents: " + (", ".join(o for o in others if o != agent) or "none"),
            "Artifacts you can see: none",
            "News: none",
            "Scrip 1000, CPU budget 1.0 s, tokens 0.",
            f"Time: {time.strftime('%H:%M', now)}",
        ]
    )


def calibration_config(cfg: Config, agents: int, start_rate: float, data_dir: str) -> Config:
    """The configuration calibration runs: ``agents`` LLM agents (the configured personas in turn) on a
    throw-away ledger, no metrics, short bursts so that the rate, not a burst, sets the pace."""
    personas = [a.persona for a in cfg.agents if a.brain == "llm" and a.persona] or [DEFAULT_PERSONA]
    return msgspec.structs.replace(
        cfg,
        data_dir=data_dir,
        metrics_port=0,
        economy=msgspec.structs.replace(cfg.economy, burst_seconds=1.0, target_utilisation=1.0, calibration=""),
        agents=[
            AgentConfig(
                id=f"calib-{i + 1}", brain="llm", persona=personas[i % len(personas)], llm_rate=round(start_rate)
            )
            for i in range(agents)
        ],
    )


async def calibrate(
    cfg: Config,
    *,
    agents: int,
    window_s: float,
    start_rate: float,
    max_windows: int,
    show: Callable[[str], None],
    info: cg.CgroupInfo | None = None,
) -> tuple[list[Window], Limits, int]:
    """Run the windows; return them, the limits and the pool size. ``CalibrationFailed`` when thinking
    fails or there is no cgroup CPU counter."""
    if cfg.llm.endpoint:
        raise CalibrationFailed("llm.endpoint is set: calibration measures local inference, not a server's")
    info = info or cg.discover()
    limits = detect(info)
    if cg.cpu_usage(info) is None:
        raise CalibrationFailed(f"no cgroup CPU counter (cpuacct.usage or cpu.stat) found (cgroups: {info.mode})")
    with tempfile.TemporaryDirectory(prefix="aeco-calibrate-") as tmp:
        run_cfg = calibration_config(cfg, agents, start_rate, tmp)
        async with Node(run_cfg) as node:
            ids = [a.id for a in node.cfg.agents]
            for a in ids:
                # The whole capacity each: only the token bucket may hold an agent back.
                node.buckets.set_rate(a, "cpu", limits.cpu_cores)
                node.buckets.set_rate(a, "llm_tokens", start_rate)
            show(
                f"calibrating: {len(ids)} agents on {node.sizing.workers} workers, {limits.cpu_cores:g} CPUs "
                f"({limits.cpu_source}), model {run_cfg.llm.model or 'default'}; windows of {window_s:g} s; "
                f"target {BAND[0]:.0%}–{BAND[1]:.0%} of capacity"
            )
            windows = await _windows(run_cfg, node.economy, limits, info, window_s, start_rate, max_windows, show)
            return windows, limits, node.sizing.workers


async def _windows(
    cfg: Config,
    economy: Economy,
    limits: Limits,
    info: cg.CgroupInfo,
    window_s: float,
    rate: float,
    max_windows: int,
    show: Callable[[str], None],
) -> list[Window]:
    """Think continuously; measure each window, re-rate every agent's bucket in place, until converged."""
    ids = [a.id for a in cfg.agents]
    failures: list[str] = []

    # Agents that start together stay in step (each thinks, then all wait out their debt together), and a
    # window then catches whole bursts or none. Spread their first thinks over one think interval at the
    # start rate, and measure only once all of them run.
    spread_s = min(cfg.llm.max_tokens / rate, 4 * window_s)
    show(f"warming up: starting the agents {spread_s / len(ids):.1f} s apart")

    async def think_loop(a: AgentConfig, delay_s: float) -> None:
        brain = LlmBrain(economy, a.persona, model=cfg.llm.model, max_tokens=cfg.llm.max_tokens)
        await asyncio.sleep(delay_s)
        while True:
            try:
                await brain.think(a.id, _context(a.id, ids))
            except TaskFailed as exc:
                failures.append(f"{a.id}: {exc.code}: {exc.message[:300]}")
                await asyncio.sleep(0.5)  # a failed think is charged too; do not spin on one

    loops = [
        asyncio.create_task(think_loop(a, i * spread_s / len(ids)), name=f"calibrate:{a.id}")
        for i, a in enumerate(cfg.agents)
    ]
    windows: list[Window] = []
    spent_cpu, made_tokens = 0.0, 0
    try:
        await asyncio.sleep(spread_s)
        for n in range(1, max_windows + 1):
            cpu0, t0, tokens0, failed0 = _cpu(info), time.monotonic(), sum(economy.tokens.values()), len(failures)
            thr0 = cg.throttling(info)
            await asyncio.sleep(window_s)
            cpu1, t1, tokens1 = _cpu(info), time.monotonic(), sum(economy.tokens.values())
            if len(failures) > failed0 and tokens1 == tokens0:
                raise CalibrationFailed(f"thinking fails: {failures[-1]}")
            measured = (cpu1 - cpu0) / ((t1 - t0) * limits.cpu_cores)
            spent_cpu, made_tokens = spent_cpu + cpu1 - cpu0, made_tokens + tokens1 - tokens0
            utilisation = at_rate(spent_cpu, made_tokens, rate, len(ids), limits.cpu_cores) if made_tokens else measured
            decision, next_rate = decide(rate, utilisation)
            memory_share, throttled_share = _squeeze(info, thr0)
            why = over(memory_share, throttled_share)
            w = Window(
                n,
                rate,
                (tokens1 - tokens0) / (t1 - t0),
                utilisation,
                decision,
                next_rate,
                measured,
                memory_share,
                throttled_share,
                why,
            )
            windows.append(w)
            change = "" if decision == "in band" else f" → {next_rate:.1f}"
            per_token = f"{spent_cpu / made_tokens * 1000:.1f} ms" if made_tokens else "-"
            show(
                f"window {n:>3}/{max_windows}: rate {rate:6.1f} tokens/s per agent, achieved {w.tokens_per_s:7.1f} "
                f"tokens/s, CPU {measured:6.1%} of {limits.cpu_cores:g} this window, {per_token} per token so far "
                f"→ {utilisation:6.1%} at this rate → {decision}{change}" + (f"; OVER: {why}" if why else "")
            )
            if converged(windows):
                break
            if next_rate != rate:
                rate = next_rate
                for a in ids:
                    economy.buckets.set_rate(a, "llm_tokens", rate)
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    return windows


def _cpu(info: cg.CgroupInfo) -> float:
    found = cg.cpu_usage(info)
    if found is None:
        raise CalibrationFailed("the cgroup CPU counter disappeared")
    return found.value


def write_calibration(path: Path, cal: Calibration) -> None:
    """Write ``cal`` as YAML atomically (a temporary file renamed over ``path``), after checking that the
    configuration loader reads it back as written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = (
        "# Written by python -m runtime.calibrate: the LLM rate (tokens/s per agent) that kept the container\n"
        "# at 70-80% CPU; `llm_rate: auto` agents take it (see runtime/limits.py).\n"
        + yaml.safe_dump(msgspec.to_builtins(cal), sort_keys=False)
    )
    try:
        tmp.write_text(text)
        if config_mod.load_calibration(tmp) != cal:
            raise AssertionError(f"{tmp} does not read back as written")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = Parser(prog="python -m runtime.calibrate", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml", help="YAML configuration (model, pool, data_dir)")
    ap.add_argument("--agents", type=int, default=5, help="LLM agents thinking back to back (default 5)")
    ap.add_argument("--window-s", type=float, default=20.0, help="seconds per measured window (default 20)")
    ap.add_argument("--start-rate", type=float, default=10.0, help="tokens/s per agent to start at (default 10)")
    ap.add_argument("--max-windows", type=int, default=30, help="give up after this many windows (default 30)")
    ap.add_argument("--out", help="where to write the result (default: <data_dir>/<economy.calibration>)")
    args = ap.parse_args(argv)
    if args.agents < 1:
        ap.error(f"--agents must be at least 1, got {args.agents}")
    if not args.window_s > 0:
        ap.error(f"--window-s must be positive, got {args.window_s}")
    if not 0 < args.start_rate <= 1e6:
        ap.error(f"--start-rate must be in (0, 1e6] tokens/s, got {args.start_rate}")
    if args.max_windows < HOLD:
        ap.error(f"--max-windows must be at least {HOLD} (converged: {HOLD} in band in a row), got {args.max_windows}")
    try:
        cfg = config_mod.load(args.config)
        model = str(find_model(cfg.llm.model or os.environ.get("AECO_LLM_MODEL")))
    except (config_mod.ConfigError, ModelNotFound) as exc:
        report(str(exc))
        return 2
    out = Path(args.out) if args.out else config_mod.data_path(cfg, cfg.economy.calibration or "calibration.yaml")
    cfg = msgspec.structs.replace(cfg, llm=msgspec.structs.replace(cfg.llm, model=model))
    started = time.monotonic()
    try:
        windows, limits, _ = asyncio.run(
            calibrate(
                cfg,
                agents=args.agents,
                window_s=args.window_s,
                start_rate=args.start_rate,
                max_windows=args.max_windows,
                show=lambda line: print(line, flush=True),
            )
        )
    except (CalibrationFailed, CapacityError) as exc:
        report(str(exc))
        return 2
    if not converged(windows):
        last = windows[-1]
        print(
            f"error: not converged: the CPU did not hold {BAND[0]:.0%}–{BAND[1]:.0%} for {HOLD} windows in a row "
            f"within {args.max_windows} windows (last: {last.utilisation:.1%} at {last.rate:.1f} tokens/s per "
            f"agent); nothing written to {out}. Try longer windows (--window-s) or more of them (--max-windows).",
            file=sys.stderr,
        )
        return 1
    last = windows[-1]
    cal = Calibration(
        llm_rate=max(1, round(last.rate)),
        agents=args.agents,
        cpu_capacity=limits.cpu_cores,
        cpu_source=limits.cpu_source,
        utilisation=round(last.utilisation, 4),
        model=model,
        max_tokens=cfg.llm.max_tokens,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        windows=len(windows),
        window_s=args.window_s,
    )
    write_calibration(out, cal)
    print(
        f"converged in {len(windows)} windows ({time.monotonic() - started:.0f} s): llm_rate {cal.llm_rate} tokens/s "
        f"per agent ({cal.llm_rate * cal.agents} in all) at {last.utilisation:.0%} of {limits.cpu_cores:g} CPUs; "
        f"written to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
