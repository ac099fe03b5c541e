"""Host vs container: the same short workload under the same limits, and the container's books.

One workload, run by ``python -m runtime.supervisor --duration S`` in two places with the same limits
(2 CPUs, 4 GiB):

- **host**: the supervisor is started inside a v1 child cgroup made for it under this process's own
  cgroups (``cpu.cfs_quota_us`` = 2 × ``cpu.cfs_period_us``, ``memory.limit_in_bytes`` = 4 GiB,
  ``cpuacct`` for the count); it finds those limits exactly as it would in a container;
- **container**: the image ``agent-ecology-local`` (built if the working tree changed) with
  ``--cpus=2 --memory=4g``; after the supervisor exits, the container's own ``cpuacct.usage`` (or
  ``cpu.stat`` on cgroup v2) is read from inside it and left in the data volume.

The workload: ``AGENTS`` scripted agents whose every think is a ``THINK_MS`` ms CPU burn on a worker
(CPU-heavy, so that the runtime's own overhead is small beside it), with cheap actions; the buckets are
large enough never to hold an agent back, so both runs are bound by the CPU quota alone. Sides
alternate, ``ROUNDS`` rounds each, to spread the host's noise over both.

Reported per run: actions per second in the steady window (action events from the durable event log,
after a ``WARMUP_S`` warm-up), and the accounting: the sum of per-task charges (``usage-summary.json``),
the named overhead (worker start-up, idle, measurement, exit) and the supervisor's own CPU, against the
cgroup's CPU count of the whole run. Targets: container throughput ≥ 95% of the host's; the container's
charges within 2% of its cgroup's count.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import msgspec

from benchmarks.cgroup_box import CgroupBox
from benchmarks.common import Options, Skipped, publish, save_figure, scratch
from benchmarks.engine import (
    IMAGE,
    Engine,
    image_uid,
    limit_args,
    prepare_engine,
    supervisor_command,
    volume_dir,
)
from runtime.world.events.log import EventLog

CPUS = 2
MEMORY = "4g"
MEMORY_BYTES = 4 << 30
AGENTS = 4
THINK_MS = 200
FULL_S, QUICK_S = 30.0, 10.0
FULL_ROUNDS, QUICK_ROUNDS = 2, 1
#: Actions before this many seconds after the first one are the warm-up, not counted.
WARMUP_S = 2.0
TARGET_RATIO = 0.95
TARGET_CHARGE_ERROR = 0.02

WORKLOAD = """
pool: {workers: auto, heartbeat_s: 1.0}
economy: {burst_seconds: 100000, target_utilisation: 1.0}
metrics_port: 0
status_interval_s: 1.0
agents:
""" + "".join(
    f"""  - id: agent{i}
    brain: scripted
    think_ms: {THINK_MS}
    policy:
      - {{kind: noop}}
      - {{kind: transfer, to: agent{(i + 1) % AGENTS}, amount: 1}}
"""
    for i in range(AGENTS)
)

#: Run inside the container after the supervisor: its own cgroup's CPU count, left in /data.
_READ_CGROUP = (
    "for f in /sys/fs/cgroup/cpuacct/cpuacct.usage /sys/fs/cgroup/cpu,cpuacct/cpuacct.usage; do "
    '[ -r "$f" ] && { echo "cpuacct.usage $(cat "$f")" > /data/cgroup-cpu; break; }; done; '
    '[ -s /data/cgroup-cpu ] || grep usage_usec /sys/fs/cgroup/cpu.stat > /data/cgroup-cpu; exit "$rc"'
)


class Run(msgspec.Struct):
    """One side's run: throughput and its books against its cgroup."""

    side: str
    round: int
    seconds: float
    actions: int
    actions_per_s: float
    workers: int
    cpu_capacity: float
    memory_limit_bytes: int | None
    per_worker_cgroups: str
    charged_cpu_s: float
    overhead_cpu_s: dict[str, float]
    supervisor_cpu_s: float
    cgroup_cpu_s: float
    #: (charges − cgroup) / cgroup: what the per-task charges miss of the cgroup's count.
    charges_error: float
    #: (charges + named overhead + supervisor − cgroup) / cgroup.
    accounted_error: float


class Image(msgspec.Struct):
    """The image measured."""

    name: str
    size_bytes: int
    inputs: str
    built_now: bool
    build_seconds: float


class Report(msgspec.Struct):
    """The JSON written under benchmarks/results/."""

    mode: str
    host: dict[str, object]
    image: Image | None
    limits: str
    workload: str
    runs: list[Run]
    host_actions_per_s: float | None
    container_actions_per_s: float | None
    throughput_ratio: float | None
    container_charges_error: float | None
    container_accounted_error: float | None
    target_ratio: float
    target_charge_error: float
    skipped: list[Skipped]


def _actions(events_dir: Path) -> tuple[int, float]:
    """Actions committed after the warm-up, and the seconds they span (from the durable event log)."""
    log = EventLog(events_dir, readonly=True)
    try:
        at = [ev.at for ev in log.read(0, kinds=["action"])]
    finally:
        log.close()
    if len(at) < 2:
        raise RuntimeError(f"only {len(at)} action events in {events_dir}")
    window = [t for t in at if t >= at[0] + WARMUP_S]
    if len(window) < 2:
        raise RuntimeError(f"no actions after the {WARMUP_S:g} s warm-up in {events_dir}")
    return len(window) - 1, window[-1] - window[0]


def _run_from(side: str, round_: int, data: Path, cgroup_cpu_s: float) -> Run:
    summary = json.loads((data / "usage-summary.json").read_bytes())
    actions, seconds = _actions(data / "events")
    charged = float(summary["charged_cpu_seconds"])
    overhead = {k: float(v) for k, v in summary["overhead_cpu_seconds"].items()}
    supervisor = float(summary["supervisor_cpu_seconds"])
    return Run(
        side=side,
        round=round_,
        seconds=seconds,
        actions=actions,
        actions_per_s=actions / seconds,
        workers=int(summary["workers_started"]),
        cpu_capacity=float(summary["container"]["cpu_capacity"]),
        memory_limit_bytes=summary["container"]["memory_limit_bytes"],
        per_worker_cgroups=str(summary["cgroups"]),
        charged_cpu_s=charged,
        overhead_cpu_s=overhead,
        supervisor_cpu_s=supervisor,
        cgroup_cpu_s=cgroup_cpu_s,
        charges_error=(charged - cgroup_cpu_s) / cgroup_cpu_s,
        accounted_error=(charged + sum(overhead.values()) + supervisor - cgroup_cpu_s) / cgroup_cpu_s,
    )


def run_host(where: Path, config: Path, duration: float, round_: int) -> Run:
    """The supervisor on the host, in a child cgroup with the container's limits."""
    data = where / "data"
    # cpuacct: the kernel's count of the run, which the books are checked against.
    with CgroupBox(f"aeco-bench-{os.getpid()}-{round_}", CPUS, memory_bytes=MEMORY_BYTES, cpuacct=True) as cg:
        env = {**os.environ, "AECO_DATA_DIR": str(data)}
        cmd = [sys.executable, "-m", *supervisor_command(str(config), duration)[2:]]
        out = subprocess.run(
            cmd,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            preexec_fn=cg.enter,  # this process is single-threaded here: joining before exec is safe
            capture_output=True,
            text=True,
            timeout=duration + 300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"host supervisor exit {out.returncode}: {out.stderr[-2000:]}")
        used = cg.cpu_seconds()
    return _run_from("host", round_, data, used)


def run_container(engine: Engine, uid: int, where: Path, config: Path, duration: float, round_: int) -> Run:
    """The supervisor in the image with ``--cpus=2 --memory=4g``; the cgroup count read inside."""
    data = volume_dir(where / "data", uid)
    shutil.copy(config, where / "workload.yaml")
    inner = " ".join(supervisor_command("/config/workload.yaml", duration))
    name = f"aeco-bench-{os.getpid()}-{round_}"
    args = ["run", "--name", name, *limit_args(CPUS, MEMORY)]
    args += ["--volume", f"{data}:/data", "--volume", f"{where}:/config:ro"]
    try:
        engine.run(*args, IMAGE, "sh", "-c", f"{inner}; rc=$?; {_READ_CGROUP}", timeout_s=duration + 300)
    finally:
        engine.remove(name)
    key, value = (data / "cgroup-cpu").read_text().split()
    used = int(value) / (1e9 if key == "cpuacct.usage" else 1e6)
    return _run_from("container", round_, data, used)


def _mean(runs: list[Run], side: str) -> float | None:
    xs = [r.actions_per_s for r in runs if r.side == side]
    return statistics.fmean(xs) if xs else None


def plot(report: Report, path: Path) -> None:
    """Actions/s per side and round; the container's and host's CPU books against their cgroups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    labels = [f"{r.side} {r.round}" for r in report.runs]
    colors = ["tab:blue" if r.side == "host" else "tab:orange" for r in report.runs]
    left.bar(labels, [r.actions_per_s for r in report.runs], color=colors)
    for i, r in enumerate(report.runs):
        left.annotate(f"{r.actions_per_s:.1f}", (i, r.actions_per_s), xytext=(0, 4), textcoords="offset points")
    left.set_ylabel("actions per second (steady window)")
    ratio = f"{report.throughput_ratio:.3f}" if report.throughput_ratio is not None else "n/a"
    left.set_title(f"Throughput: container / host = {ratio} (target ≥ {TARGET_RATIO})")
    xs = range(len(report.runs))
    charged = [r.charged_cpu_s for r in report.runs]
    overhead = [sum(r.overhead_cpu_s.values()) for r in report.runs]
    supervisor = [r.supervisor_cpu_s for r in report.runs]
    right.bar(xs, charged, label="per-task charges", color="tab:green")
    right.bar(xs, overhead, bottom=charged, label="named worker overhead", color="tab:olive")
    right.bar(
        xs,
        supervisor,
        bottom=[c + o for c, o in zip(charged, overhead, strict=True)],
        label="supervisor",
        color="tab:gray",
    )
    right.scatter(xs, [r.cgroup_cpu_s for r in report.runs], color="black", marker="_", s=600, label="cgroup count")
    right.set_xticks(list(xs), labels)
    right.set_ylabel("CPU-seconds over the run")
    right.set_title("Books vs the cgroup's CPU count")
    right.legend(loc="lower right")
    fig.suptitle(
        f"Host vs container, {CPUS} CPUs and {MEMORY}: {AGENTS} scripted agents, "
        f"think = {THINK_MS} ms burn ({report.mode})"
    )
    save_figure(fig, path, dpi=110)


def run(opts: Options) -> int:
    """Run both sides, print the table and the verdicts, write the JSON and the plot.

    Returns 1 if a side failed, else 0 (missed targets are reported, not failures of the benchmark)."""
    duration = QUICK_S if opts.quick else FULL_S
    rounds = QUICK_ROUNDS if opts.quick else FULL_ROUNDS
    mode = "quick" if opts.quick else "full"
    tmp, host = scratch("container", ["msgspec", "pyzmq", "lmdb"])
    config = tmp / "workload.yaml"
    config.write_text(WORKLOAD)
    print(
        f"container benchmark ({mode}): {AGENTS} scripted agents, think = {THINK_MS} ms burn, {duration:g} s per run, "
        f"{rounds} round(s) per side, limits {CPUS} CPUs / {MEMORY}; files in {tmp}",
        flush=True,
    )
    skipped: list[Skipped] = []
    runs: list[Run] = []
    image: Image | None = None
    try:
        engine = Engine(prepare_engine())
        build = engine.ensure_image(IMAGE)
        uid = image_uid(engine)
        image = Image(IMAGE, engine.image_size(IMAGE), build.inputs, build.built, build.seconds)
        how = f"built in {build.seconds:.0f} s" if build.built else "reused"
        print(f"image {IMAGE}: {image.size_bytes / 1e6:.0f} MB ({how})")
        for round_ in range(1, rounds + 1):
            for side in ("host", "container"):
                where = tmp / f"{side}-{round_}"
                where.mkdir()
                try:
                    r = (
                        run_host(where, config, duration, round_)
                        if side == "host"
                        else run_container(engine, uid, where, config, duration, round_)
                    )
                except Exception as exc:
                    print(f"[{side} {round_}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                    skipped.append(Skipped(f"{side} {round_}", f"{type(exc).__name__}: {exc}"))
                    continue
                finally:
                    shutil.rmtree(where, ignore_errors=True)
                runs.append(r)
                print(
                    f"[{side} {round_}] {r.actions_per_s:7.1f} actions/s; {r.workers} workers, "
                    f"capacity {r.cpu_capacity:g} CPUs; charged {r.charged_cpu_s:.2f} + overhead "
                    f"{sum(r.overhead_cpu_s.values()):.2f} + supervisor {r.supervisor_cpu_s:.2f} CPU-s vs cgroup "
                    f"{r.cgroup_cpu_s:.2f}: charges {r.charges_error:+.2%}, all {r.accounted_error:+.2%}",
                    flush=True,
                )
    except Exception as exc:  # no engine or no image: nothing to compare
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        skipped.append(Skipped("engine", f"{type(exc).__name__}: {exc}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    on_host, in_ctr = _mean(runs, "host"), _mean(runs, "container")
    ratio = in_ctr / on_host if on_host and in_ctr is not None else None
    ctr = [r for r in runs if r.side == "container"]
    charges_error = statistics.fmean(r.charges_error for r in ctr) if ctr else None
    accounted_error = statistics.fmean(r.accounted_error for r in ctr) if ctr else None
    report = Report(
        mode=mode,
        host=host,
        image=image,
        limits=f"--cpus={CPUS} --memory={MEMORY}",
        workload=f"{AGENTS} scripted agents, think {THINK_MS} ms burn, policy noop/transfer; {duration:g} s per run",
        runs=runs,
        host_actions_per_s=on_host,
        container_actions_per_s=in_ctr,
        throughput_ratio=ratio,
        container_charges_error=charges_error,
        container_accounted_error=accounted_error,
        target_ratio=TARGET_RATIO,
        target_charge_error=TARGET_CHARGE_ERROR,
        skipped=skipped,
    )
    if ratio is not None:
        print(f"\nthroughput: container {in_ctr:.1f}/s vs host {on_host:.1f}/s = {ratio:.3f} (target ≥ {TARGET_RATIO})")
    if charges_error is not None and accounted_error is not None:
        print(
            f"container accounting: charges vs cgroup {charges_error:+.2%} (target within ±{TARGET_CHARGE_ERROR:.0%}); "
            f"charges + named overhead + supervisor vs cgroup {accounted_error:+.2%}"
        )
    publish(opts.json_path, report, lambda png: plot(report, png))
    return 1 if skipped else 0
