"""A soak: 1,000 scripted agents under the real supervisor for a while, with retention on; does anything
grow?

The supervisor runs as the operator runs it (``python -m runtime.supervisor --no-live --duration S``) on a
generated configuration: 1,000 scripted agents, each of which rewrites its own artifact (a commit of
history every turn), gives 1 scrip to the next agent, reads the next agent's artifact and sleeps
about ``SLEEP_S``; every think is a 1 ms ``Burn`` on a worker, charged in the ledger, and every action is an
event. ``retention:`` compacts the data directory every ``horizon / 2`` with a horizon of a sixth of the
run (at least the configuration's minimum, 60 s): history, journal and events older than that go, and
archived events beyond ``ARCHIVE_MB`` are deleted.

The load is the agents' pace, not what the host can take: each agent sleeps about ``SLEEP_S`` a turn (on its
timer alone: ``TIMER_ONLY``), so 1,000 of them offer about ``4 × 1,000 / SLEEP_S`` actions/s, under what the
supervisor turns around on two loaded cores, and their CPU rights never hold them back (``cpu_rate: auto``
gives each 1 millicore of a two-core container; ``burst_seconds`` is the largest the configuration takes,
so a bucket holds far more than an agent spends in the run). With the defaults instead (a 10 s burst) the
buckets set the pace: about 70 actions/s on a quiet host (30 on a loaded one), with the synchronised refills of 1,000
agents as its noise (windows within ±64% over the last half of a quiet 30-minute run). A pause of the
stores shows up as a dip below the pace; growth shows up against a constant stream of writes.

Sampled every ``SAMPLE_S``: the supervisor's RSS (``psutil``), the data directory's bytes
(``runtime.host.volume.tree_bytes``), whole and per part (the ledger, the event log, the Git repository,
its index, the archive, ``run/``), and the agents' actions so far (``status.json``'s totals), hence
actions/s per interval. Reported: growth of RSS and of the data directory over the last half of the run
(the median of the samples around its end against those around its middle; target ≤ 5%, flat after the
first retention pass) and of each part, the steadiness of actions/s over the last half (each
``WINDOW_S`` window's rate against the half's mean; target within ±10%), and the longest gap between
two store writes (``artifact_written`` events the log and the archive still hold) that overlaps a
retention pass, beside the longest that does not: a pause of the store during a pass shows as the first
above the second. Verified after the run, on the stopped data directory: ``admin check`` and
``git fsck --strict`` pass.

The target is for 30 minutes (``--minutes 30``, the default) on a quiet machine; a short run on a loaded
host (``--minutes 3``) shows the shape, not the verdict: the first retention pass lands near its middle.
On a host shared with other work the noise is the host's: at load 12, 6 minutes, the pace was reached (103
actions/s in the last half, windows within ±23%; before the store's listing stopped at its limit and the
collector was quieted, 21-50 actions/s). At load 5-10, 12 minutes: 101.7 actions/s, windows within ±5%,
no dip at the passes (the event loop's median turns a second 72 in passes against 80 between them). The
longest gap between writes outside passes is then the start's: every agent whose turn does not begin
with its write sleeps 30-50 s before it (about 22 s without a write).
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil

from benchmarks.common import Options, ReportHead, announce, publish, save_figure, scratch
from runtime.host.volume import tree_bytes

AGENTS = 1000
#: Each agent's sleep per turn of four actions, on average: the offered load (about 4 × AGENTS / SLEEP_S
#: actions/s).
SLEEP_S = 40.0
#: The event kind the agents' sleeps wait for: none is ever published, so a sleep lasts its seconds.
TIMER_ONLY = "soak_timer"
#: The largest ``economy.burst_seconds`` the configuration takes: buckets that never hold an agent back.
BURST_S = 86_400.0
#: Archived events kept: reached within the run, so the archive is flat in its last half too.
ARCHIVE_MB = 2
#: The parts of the data directory sampled on their own (the rest is summed as ``other``).
PARTS = ("ledger", "events", "artifacts.git", "artifacts.git.index", "archive", "run")
SAMPLE_S = 5.0
WINDOW_S = 30.0
#: Growth over the last half, and actions/s spread over it, that pass.
GROWTH_TARGET = 0.05
STEADY_TARGET = 0.10
QUICK_MINUTES = 1.5
_MB = 1 << 20
#: The seconds a pass took, in its report line (``compacted before … in 7.1 s``).
_PASS_S = re.compile(r" in (\d+(?:\.\d+)?) s")


class Point(msgspec.Struct, array_like=True):
    """One sample: seconds since the start, supervisor RSS, data-dir bytes, actions so far, and the
    data dir's bytes per part (``PARTS`` and ``other``)."""

    t: float
    rss: int
    disk: int
    actions: int
    parts: dict[str, int] = {}


class Stall(msgspec.Struct):
    """The longest gap between two store writes that overlaps a retention pass, and the longest that
    does not (the agents' own rhythm, or the host's): a pause of the store shows as the first above the
    second. Seconds; ``pass_line`` is the report line of the pass of the first."""

    during_passes: float
    outside_passes: float
    pass_line: str | None


class Report(ReportHead):
    """The JSON file."""

    agents: int
    horizon_s: float
    interval_s: float
    samples: list[Point]
    retention_passes: list[str]
    rss_growth: float | None
    disk_growth: float | None
    #: Growth over the last half per part of the data directory.
    parts_growth: dict[str, float | None]
    store_stall: Stall | None
    actions_per_s: float | None
    actions_spread: float | None
    verified: bool
    target: str


def config(data: Path, horizon_s: float) -> dict[str, Any]:
    """The run's configuration: ``AGENTS`` scripted agents in a ring, retention on."""
    ids = [f"s{i:04d}" for i in range(AGENTS)]

    def policy(i: int, me: str) -> list[dict[str, Any]]:
        turn: list[dict[str, Any]] = [
            {"kind": "write_artifact", "id": f"{me}-notes", "content": f"notes of {me}"},
            {"kind": "transfer", "to": ids[(i + 1) % AGENTS], "amount": 1},
            {"kind": "read_artifact", "id": f"{ids[(i + 1) % AGENTS]}-notes"},
            # Sleeps spread over SLEEP_S ± 25%, and each agent's turn rotated by its number: agents that
            # all start together are soon out of step, and the four kinds of action always all in flight,
            # rather than 1,000 writes, then 1,000 transfers, and so on, in waves. A sleep ends on its
            # timer only (``until`` a kind nothing publishes): a plain sleep also ends at the first event
            # addressed to the agent, here the previous agent's transfer, and the ring then paced itself,
            # a wave going round it as fast as the host let it (130-200 actions/s against the 100
            # offered, on a quiet host).
            {"kind": "sleep", "seconds": round(SLEEP_S * (0.75 + 0.5 * i / AGENTS), 3), "until": TIMER_ONLY},
        ]
        return turn[i % 4 :] + turn[: i % 4]

    agents = [{"id": me, "brain": "scripted", "think_ms": 1, "policy": policy(i, me)} for i, me in enumerate(ids)]
    return {
        "data_dir": str(data),
        "metrics_port": 0,
        "status_interval_s": 1.0,
        "economy": {"burst_seconds": BURST_S},
        "retention": {
            "enabled": True,
            "horizon_s": horizon_s,
            "interval_s": horizon_s / 2,
            "archive_max_mb": ARCHIVE_MB,
        },
        "agents": agents,
    }


def parts(data: Path) -> dict[str, int]:
    """Bytes of each part of the data directory (``PARTS``), and of the rest as ``other``."""
    out = {name: tree_bytes(data / name) for name in PARTS}
    out["other"] = max(0, tree_bytes(data) - sum(out.values()))
    return out


def _around(points: list[Point], t: float, field: str, half_width: float) -> float:
    near = [getattr(p, field) for p in points if abs(p.t - t) <= half_width]
    return float(statistics.median(near)) if near else float("nan")


def growth(points: list[Point], field: str, seconds: float) -> float | None:
    """Relative growth of ``field`` (or of part ``part:NAME``) from the middle of the run to its end
    (medians of the samples within a window of either point); None without samples there."""
    w = max(WINDOW_S / 2, SAMPLE_S)
    if field.startswith("part:"):
        name = field[len("part:") :]
        points = [Point(p.t, 0, p.parts.get(name, 0), 0) for p in points]
        field = "disk"
    mid, end = _around(points, seconds / 2, field, w), _around(points, points[-1].t, field, w)
    if not (mid == mid and end == end) or mid <= 0:  # NaN: no sample near one of them
        return None
    return (end - mid) / mid


def longest_stall(writes: list[float], passes: list[tuple[float, float, str]]) -> Stall | None:
    """The longest gaps between consecutive times of ``writes`` (sorted UNIX times) that overlap a pass
    of ``passes`` (start, end, line) and that do not; None without two writes."""
    if len(writes) < 2:
        return None
    during, outside, line = 0.0, 0.0, None
    for lo, hi in itertools.pairwise(writes):
        hit = next((text for start, end, text in passes if start < hi and end > lo), None)
        if hit is None:
            outside = max(outside, hi - lo)
        elif hi - lo > during:
            during, line = hi - lo, hit
    return Stall(during, outside, line)


def _write_times(data: Path) -> list[float]:
    """The time of every ``artifact_written`` event the stopped data directory still holds (log and archive)."""
    from runtime.world.events.log import EventLog

    times: list[float] = []
    for f in sorted((data / "archive").glob("events-*.jsonl.gz")):
        for line in gzip.decompress(f.read_bytes()).splitlines():
            ev = json.loads(line)
            if ev["kind"] == "artifact_written":
                times.append(float(ev["at"]))
    log = EventLog(data / "events", readonly=True)
    try:
        times.extend(e.at for e in log.read(0, kinds=["artifact_written"]))
    finally:
        log.close()
    return sorted(times)


def running(points: list[Point], seconds: float) -> list[Point]:
    """The samples of the run proper: within its duration and up to the last one that counted new
    actions (after it the agents have stopped and the stores are closing)."""
    inside = [p for p in points if p.t <= seconds]
    moved = [i for i in range(1, len(inside)) if inside[i].actions > inside[i - 1].actions]
    return inside[: moved[-1] + 1] if moved else inside


def steadiness(points: list[Point], seconds: float) -> tuple[float | None, float | None]:
    """Actions/s over the last half, and the largest deviation of a ``WINDOW_S`` window's rate from it."""
    half = [p for p in points if p.t >= seconds / 2]
    if len(half) < 2 or half[-1].t - half[0].t <= 0:
        return None, None
    mean = (half[-1].actions - half[0].actions) / (half[-1].t - half[0].t)
    rates = []
    start = half[0]
    for p in half[1:]:
        if p.t - start.t >= WINDOW_S:
            rates.append((p.actions - start.actions) / (p.t - start.t))
            start = p
    if not rates or mean <= 0:
        return mean, None
    return mean, max(abs(r - mean) / mean for r in rates)


def _status_actions(status: Path) -> int | None:
    try:
        doc = json.loads(status.read_bytes())
    except (OSError, ValueError):
        return None
    totals = doc.get("totals") or {}
    return int(totals.get("actions", 0)) + int(totals.get("rejected", 0))


def _verify(data: Path) -> bool:
    check = subprocess.run(
        [sys.executable, "-m", "runtime.admin", "--data-dir", str(data), "check"], capture_output=True, text=True
    )
    fsck = subprocess.run(
        ["git", "--git-dir", str(data / "artifacts.git"), "fsck", "--strict"], capture_output=True, text=True
    )
    print(check.stdout.strip().splitlines()[-1] if check.stdout.strip() else check.stderr.strip())
    print(f"git fsck --strict: exit {fsck.returncode} {fsck.stderr.strip()[:200]}")
    return check.returncode == 0 and fsck.returncode == 0


def plot(points: list[Point], passes: list[float], path: Path, note: str) -> None:
    """RSS, data-dir bytes and actions/s over time, the retention passes marked."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ts = [p.t / 60 for p in points]
    axes[0].plot(ts, [p.rss / _MB for p in points], color="tab:green")
    axes[0].set_ylabel("supervisor RSS (MB)")
    axes[1].plot(ts, [p.disk / _MB for p in points], color="tab:blue", label="all")
    for name in (*PARTS, "other"):
        axes[1].plot(ts, [p.parts.get(name, 0) / _MB for p in points], linewidth=0.8, label=name)
    axes[1].legend(fontsize=7, ncol=4)
    axes[1].set_ylabel("data dir (MB)")
    rate_t = [(a.t + b.t) / 120 for a, b in itertools.pairwise(points)]
    rates = [(b.actions - a.actions) / (b.t - a.t) for a, b in itertools.pairwise(points)]
    axes[2].plot(rate_t, rates, color="tab:orange")
    axes[2].set_ylabel("actions/s")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for t in passes:
            ax.axvline(t / 60, color="grey", alpha=0.4, linestyle="--")
        ax.set_ylim(bottom=0)
    axes[0].set_title(f"soak: {AGENTS:,} scripted agents, retention on (dashed: retention passes)\n{note}", fontsize=9)
    save_figure(fig, path)


def run(opts: Options) -> int:
    """Run the soak; print and save the samples, the growth and the steadiness; 1 if a check failed."""
    minutes = opts.minutes if opts.minutes is not None else (QUICK_MINUTES if opts.quick else 30.0)
    seconds = minutes * 60
    horizon = max(60.0, seconds / 6)
    tmp, host = scratch("soak", ["lmdb", "msgspec", "dulwich", "psutil"])
    host["load_before"] = list(psutil.getloadavg())
    announce("soak", opts, f"{AGENTS:,} scripted agents for {minutes:g} min, retention horizon {horizon:g} s", host)
    data = tmp / "data"
    cfg_path = tmp / "soak.yaml"
    cfg_path.write_text(json.dumps(config(data, horizon)))  # JSON is YAML
    log_path = tmp / "supervisor.log"
    points: list[Point] = []
    passes: list[float] = []
    #: Each pass's (start, end) in UNIX time, from the end its line is printed at and the seconds it says.
    spans: list[tuple[float, float, str]] = []
    lines: list[str] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.supervisor",
                "--config",
                str(cfg_path),
                "--no-live",
                "--duration",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        started = time.monotonic()
        sup = psutil.Process(proc.pid)

        def read_stdout() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("retention:"):
                    passes.append(time.monotonic() - started)
                    lines.append(line.strip())
                    took = _PASS_S.search(line)
                    end = time.time()
                    spans.append((end - float(took.group(1)) if took else end, end, line.strip()))
                    print(f"[{time.monotonic() - started:6.0f} s] {line.strip()}", flush=True)

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        status = data / "run" / "status.json"
        try:
            while proc.poll() is None:
                time.sleep(SAMPLE_S)
                actions = _status_actions(status)
                if actions is None or proc.poll() is not None:
                    continue
                try:
                    rss = sup.memory_info().rss
                except psutil.NoSuchProcess:
                    break
                sizes = parts(data)
                p = Point(time.monotonic() - started, rss, sum(sizes.values()), actions, sizes)
                points.append(p)
                split = ", ".join(f"{k} {v / _MB:.1f}" for k, v in sizes.items())
                print(
                    f"[{p.t:6.0f} s] RSS {p.rss / _MB:6.1f} MB, data dir {p.disk / _MB:6.1f} MB ({split}), "
                    f"{p.actions:,} actions",
                    flush=True,
                )
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
    ok = proc.returncode == 0
    if not ok:
        print(f"supervisor exited {proc.returncode}; its log: {log_path}")
        print(log_path.read_text()[-2000:])
    verified = ok and _verify(data)
    stall = longest_stall(_write_times(data), spans) if ok else None
    points = running(points, seconds)
    rss_g = growth(points, "rss", seconds) if points else None
    disk_g = growth(points, "disk", seconds) if points else None
    parts_g = {name: growth(points, f"part:{name}", seconds) if points else None for name in (*PARTS, "other")}
    rate, spread = steadiness(points, seconds)

    def pct(x: float | None) -> str:
        return f"{x:+.1%}" if x is not None else "n/a"

    if points:
        end = points[-1].parts
        each = (f"{k} {pct(g)} ({end.get(k, 0) / _MB:.1f} MB)" for k, g in parts_g.items())
        print("last half, per part: " + ", ".join(each))
    if stall is not None and stall.pass_line is not None:
        print(f"longest gap between two store writes in a pass ({stall.pass_line[:100]}…): {stall.during_passes:.2f} s")
    pause = f"{stall.during_passes:.2f} s in a pass, {stall.outside_passes:.2f} s outside" if stall else "n/a"
    target = (
        f"last half: RSS {pct(rss_g)}, data dir {pct(disk_g)} (target ≤ {GROWTH_TARGET:.0%}); actions/s "
        f"{rate or 0:,.1f}, windows within {pct(spread)} (target ±{STEADY_TARGET:.0%}); longest gap between "
        f"store writes {pause}; {len(passes)} retention passes; {minutes:g} min, "
        f"load {host['load_before'][0]:.1f} at the start"
    )
    print(target)
    report = Report(
        "soak",
        "quick" if opts.quick else "full",
        host,
        seconds,
        AGENTS,
        horizon,
        horizon / 2,
        points,
        lines,
        rss_g,
        disk_g,
        parts_g,
        stall,
        rate,
        spread,
        verified,
        target,
    )
    note = f"{host['cpus_usable']} CPUs, {minutes:g} min, load {host['load_before'][0]:.1f} at the start"
    publish(opts.json_path, report, lambda png: plot(points, passes, png, note) if points else None)
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if verified else 1
