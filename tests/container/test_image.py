"""The image ``agent-ecology-local`` under a real engine: limits it detects, what a short run charges,
its health check, a kill -9 of the supervisor with ``--restart=unless-stopped``, and calibration.
"""

from __future__ import annotations

import calendar
import collections
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.engine import supervisor_command
from runtime import config as config_mod
from runtime.pool.inflight import CRASH_CODE
from tests.container.conftest import Box

# A cold build of the image (llama.cpp compiles) happens in the first test's set-up.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

DURATION_S = 10.0
THINK_MS = 20
GiB = 1 << 30

#: Two scripted agents: thinks are CPU burns on the pool; actions write, invoke (confined code),
#: read and transfer, so the run touches the ledger, the store and the sandbox.
SHORT = f"""
pool: {{workers: auto, heartbeat_s: 0.5}}
metrics_port: 0
status_interval_s: 0.5
agents:
  - id: writer
    brain: scripted
    think_ms: {THINK_MS}
    policy:
      - {{kind: write_artifact, id: adder, artifact_kind: code, content: "world.result(sum(world.args))"}}
      - {{kind: transfer, to: reader, amount: 1}}
      - {{kind: noop}}
  - id: reader
    brain: scripted
    think_ms: {THINK_MS}
    policy:
      - {{kind: invoke_artifact, id: adder, args: [1, 2]}}
      - {{kind: read_artifact, id: adder}}
      - {{kind: noop}}
"""


def _usage(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["op"] for e in journal if e["op"]["op"] == "usage"]


@pytest.mark.parametrize(
    ("cpus", "memory", "capacity", "limit"),
    [(1, None, 1.0, None), (2, "4g", 2.0, 4 * GiB)],
    ids=["cpus1", "cpus2-memory4g"],
)
def test_detects_its_limits_and_charges_a_short_run(
    box: Box, cpus: float, memory: str | None, capacity: float, limit: int | None
) -> None:
    name = box.start(*supervisor_command(box.write_config("short.yaml", SHORT), DURATION_S), cpus=cpus, memory=memory)
    assert box.wait(name) == 0, box.logs(name)

    summary = box.summary()
    assert summary["container"] == {"cpu_capacity": capacity, "memory_limit_bytes": limit}
    assert summary["workers_started"] == int(capacity)  # pool.workers: auto is sized from the quota
    assert summary["workers_crashed"] == 0
    status = box.status()
    assert status is not None and status["running"] is False
    # The limits, and the cgroup files they were read from, in status.json and in the live table.
    limits = status["limits"]
    assert (limits["cpu_cores"], limits["memory_bytes"]) == (capacity, limit), limits
    assert "cpu.cfs_quota_us" in limits["cpu_source"] or "cpu.max" in limits["cpu_source"], limits
    if limit is not None:
        assert "memory.limit_in_bytes" in limits["memory_source"] or "memory.max" in limits["memory_source"]
    assert f"limits: {capacity:g} CPUs ({limits['cpu_source']})" in status["table"], status["table"]

    usage = _usage(box.journal())
    per_agent = collections.Counter(u["agent"] for u in usage)
    assert per_agent["writer"] >= 5 and per_agent["reader"] >= 5, per_agent
    assert len({u["task_id"] for u in usage}) == len(usage)  # one record per task
    thinks = [u for u in usage if u["kind"] == "burn"]
    assert len(thinks) >= 10
    # A think burns THINK_MS of CPU; its charge is that plus a little measurement, never less. One the stop
    # ended midway (cancelled with its agent, or its worker stopped with the pool) is charged what it had
    # used, and is recorded so.
    for u in thinks:
        assert u["cpu_seconds"] <= THINK_MS / 1000 + 0.2, u
        if u["ok"]:
            assert u["cpu_seconds"] >= THINK_MS / 1000 * 0.9, u
        else:
            assert u["error"] in ("cancelled", "pool_closed"), u
    assert sum(u["ok"] for u in thinks) >= 10
    # The ledger's records and the pool's books are the same charges.
    assert sum(u["cpu_seconds"] for u in usage) == pytest.approx(summary["charged_cpu_seconds"], rel=0.02, abs=0.02)
    rec = summary["reconciliation"]
    accounted = rec["charged"] + sum(rec["overhead"].values())
    assert accounted == pytest.approx(rec["kernel"], rel=0.1, abs=0.1), rec

    check = box.admin("check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
    invoked = box.events("artifact_invoked")
    assert any(e["fields"]["ok"] for e in invoked), invoked  # confined code ran in the container


def test_runs_as_a_non_root_user_and_says_which_sandbox_isolation_applies(box: Box, uid: int) -> None:
    assert uid != 0
    probe = "from workers.sandbox import isolation_available; print(' '.join(isolation_available()))"
    out = box.inside("python", "-c", probe)
    assert out.returncode == 0, out.stderr
    steps = set(out.stdout.split())
    print(f"sandbox isolation in the container (uid {uid}): {sorted(steps)}")
    # Unprivileged, the sandbox makes its namespaces inside a user namespace (the code holds no capability).
    expected = {"userns", "mountns", "rofs", "minroot", "netns", "ipcns", "pidns", "rlimits", "nonewprivs"}
    # ... and a fresh keyring, the seccomp filter, and the tree's memory watched (no writable cgroup).
    assert expected | {"keyring", "seccomp", "memwatch"} <= steps, steps
    # Confined code cannot reach the data volume (the ledger, the Git history), which its uid owns.
    (box.data / "ledger-probe").write_text("ledger secret")
    probe = (
        "from workers.sandbox import Limits, run_confined\n"
        'code = \'import os\\ntry:\\n    result = open("/data/ledger-probe").read()\\n'
        'except OSError as exc:\\n    result = [type(exc).__name__, os.path.exists("/data")]\'\n'
        "r = run_confined(code, None, Limits(), lambda op, p: {'ok': False}, hide=['/data'])\n"
        "print(r.ok, r.value.decode(), r.error)"
    )
    out = box.inside("python", "-c", probe)
    # Not hidden: absent (the minimal root holds the interpreter and its library, not /data).
    assert out.returncode == 0 and out.stdout.split() == ["True", '["FileNotFoundError",false]'], (
        out.stdout + out.stderr
    )


IDLE = """
pool: {workers: 1, heartbeat_s: 0.5}
metrics_port: 0
status_interval_s: 0.5
agents:
  - id: napper
    workload: [{kind: sleep, ms: 200}]
"""


def test_the_health_check_follows_the_supervisor(box: Box) -> None:
    since = time.time()
    name = box.start(*supervisor_command(box.write_config("idle.yaml", IDLE)))
    box.wait_running(name, since)
    assert box.health(name) == 0, box.logs(name)

    def health_now(max_age_s: float) -> subprocess.CompletedProcess[str]:
        cmd = ["exec", name, "python", "-m", "runtime.status", "--data-dir", "/data", "--health", f"{max_age_s:g}"]
        return box.engine.run(*cmd, check=False)

    pid = box.supervisor_pid(name)
    os.kill(pid, signal.SIGSTOP)  # alive but stuck: it stops refreshing its status
    try:
        time.sleep(4.0)
        stuck = health_now(3.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stuck.returncode == 1 and "not refreshed" in stuck.stdout, stuck.stdout
    box.wait_running(name, time.time())
    assert health_now(3.0).returncode == 0

    box.engine.run("stop", name, timeout_s=60.0)
    assert box.wait(name) == 0, box.logs(name)  # SIGTERM reached the supervisor through tini
    stopped = box.inside("python", "-m", "runtime.status", "--data-dir", "/data", "--health", "30")
    assert stopped.returncode == 1 and "stopped" in stopped.stdout, stopped.stdout


#: Agents that drain their CPU buckets within seconds (capacity 0.5 CPU-s, ten 50 ms thinks) and refill
#: slowly (0.02 CPU-s a second), so that a restart that refilled them would show at once.
RATE_CPU_S = 0.02
BURST_S = 25
#: A third agent thinks 2 s burns back to back, so that a task is in flight whenever the kill comes.
CRUNCH_MS = 2000
DRAINING = f"""
pool: {{workers: 2, heartbeat_s: 0.5}}
economy: {{burst_seconds: {BURST_S}}}
metrics_port: 0
status_interval_s: 0.5
agents:
  - id: writer
    brain: scripted
    think_ms: 50
    cpu_rate: {int(RATE_CPU_S * 1000)}
    policy:
      - {{kind: write_artifact, id: diary, content: "another day"}}
  - id: reader
    brain: scripted
    think_ms: 50
    cpu_rate: {int(RATE_CPU_S * 1000)}
    policy:
      - {{kind: read_artifact, id: diary}}
      - {{kind: transfer, to: writer, amount: 1}}
  - id: cruncher
    brain: scripted
    think_ms: {CRUNCH_MS}
    cpu_rate: 1000
    policy:
      - {{kind: noop}}
"""


def _cpu_level(op: dict[str, Any]) -> float:
    return float(op["buckets"]["cpu"]["level"])


def test_a_killed_supervisor_is_restarted_and_resumes_from_the_data_volume(box: Box) -> None:
    since = time.time()
    name = box.start(*supervisor_command(box.write_config("draining.yaml", DRAINING)), restart="unless-stopped")
    box.wait_running(name, since)
    time.sleep(8.0)  # long enough for both agents to spend their bucket down to the refill rate
    restarts = int(box.engine.inspect(name, "{{.RestartCount}}"))
    first = box.supervisor_pid(name)
    killed_at = time.time()
    os.kill(first, signal.SIGKILL)  # kill -9 of the main process, from the host

    box.wait_running(name, killed_at)
    assert int(box.engine.inspect(name, "{{.RestartCount}}")) == restarts + 1
    assert box.supervisor_pid(name) != first
    time.sleep(8.0)  # the resumed run charges a few tasks (one every 2.5 s per agent once drained)
    box.engine.run("stop", name, timeout_s=60.0)
    assert box.wait(name) == 0, box.logs(name)
    time.sleep(2.0)
    assert box.engine.inspect(name, "{{.State.Status}}") == "exited"  # unless-stopped: a stop is final

    check = box.admin("check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr

    journal = box.journal()
    usage = [e for e in journal if e["op"]["op"] == "usage"]
    assert len({e["op"]["task_id"] for e in usage}) == len(usage)  # nothing charged twice
    runs = list(dict.fromkeys(e["op"]["task_id"].split("-")[0] for e in usage))
    assert len(runs) == 2, runs  # the killed run and the resumed one
    # The tasks in flight at the kill: recorded as failed by the restart, charged what was measured
    # (CPU sampled every pool.sample_s without per-worker cgroups, as here), exactly once. The cruncher
    # always has one (it burns without pause); the writer or the reader may have had its 50 ms one too.
    crashed = [e["op"] for e in usage if e["op"].get("error") == CRASH_CODE]
    assert [u["agent"] for u in crashed].count("cruncher") == 1, crashed
    longest = {"cruncher": CRUNCH_MS / 1000, "writer": 0.05, "reader": 0.05}
    for op in crashed:
        assert op["task_id"].startswith(runs[0]) and not op["ok"], crashed
        # Without per-worker cgroups (as here) the charge is the CPU up to the last sample: at most the
        # wall time sampled (one thread burning), and nothing only when the kill came before the first sample.
        cpu, sampled = op["cpu_seconds"], op["wall_seconds"]
        assert cpu <= min(sampled, longest[op["agent"]]) + 0.05, crashed
        if op["agent"] == "cruncher":  # (the kernel's counter is in clock ticks: a kill within a tick charges 0)
            assert cpu > 0 or sampled < 2 / os.sysconf("SC_CLK_TCK"), crashed
        assert f"recovered task {op['task_id']}" in box.logs(name)
    capacity = RATE_CPU_S * BURST_S
    for agent in ("writer", "reader"):
        mine = [e for e in usage if e["op"]["agent"] == agent]
        before = [e for e in mine if e["op"]["task_id"].startswith(runs[0])]
        after = [e for e in mine if e["op"]["task_id"].startswith(runs[1])]
        assert before and after, agent
        persisted = _cpu_level(before[-1]["op"])
        assert persisted < capacity / 2, f"{agent} did not drain its bucket before the kill: {persisted}"
        # Resumed from the persisted level (refilled only for the time since the kill), not refilled.
        resumed = _cpu_level(after[0]["op"])
        print(f"{agent}: cpu bucket {persisted:.3f} CPU-s at the kill, {resumed:.3f} after the first resumed task")
        assert resumed <= persisted + RATE_CPU_S * (after[0]["at"] - killed_at) + 0.01, (agent, persisted, resumed)

    repo = box.data / "artifacts.git"
    fsck = subprocess.run(
        ["git", "-c", "safe.directory=*", "--git-dir", str(repo), "fsck", "--full", "--strict"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    history = box.admin("history", "diary")
    assert history.returncode == 0, history.stderr
    # Each line: commit, UTC date and time (to the second), author, action, size.
    times = [
        calendar.timegm(time.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%SZ"))
        for line in history.stdout.splitlines()
    ]
    assert min(times) < killed_at < max(times), (killed_at, times)  # written before the kill and after


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)
    else:
        yield node


def test_status_json_reports_the_limits_and_where_they_came_from(box: Box) -> None:
    """Needs branch ``limits``: ``status.json`` gains structured ``limits`` and ``container`` fields."""
    since = time.time()
    name = box.start(*supervisor_command(box.write_config("short.yaml", SHORT), DURATION_S), cpus=2, memory="4g")
    status = box.wait_running(name, since)
    assert box.wait(name) == 0, box.logs(name)
    assert "limits" in status and "container" in status, sorted(status)
    values = list(_leaves(status["container"])) + list(_leaves(status["limits"]))
    assert 4 * GiB in values and 2 in values, json.dumps(status["container"])
    # Provenance: each limit says where it came from (the cgroup files, a default, the config …).
    assert any(isinstance(v, str) and "cgroup" in v for v in _leaves(status["limits"])), json.dumps(status["limits"])


def test_a_short_calibration_converges_in_the_container(box: Box) -> None:
    """``python -m runtime.calibrate`` with the bundled SmolLM2 and the issue's defaults (5 agents from
    10 tokens/s each) in a one-CPU container: it holds 70–80% of the quota and writes the rate."""
    cmd = ["python", "-m", "runtime.calibrate", "--config", "config/default.yaml"]
    cmd += ["--window-s", "10", "--max-windows", "14"]
    name = box.start(*cmd, cpus=1, memory="4g")
    assert box.wait(name, timeout_s=900.0) == 0, box.logs(name)
    log = box.logs(name)
    # Decided on the utilisation at the rate (CPU per token from the cgroup × rate). Agents think in bursts
    # and rarely use their whole rate, so one window's cgroup count swings (0.32–0.66 seen at a 0.72
    # decision): what must hold is that the quota is never exceeded, that the agents really ran, and that
    # the cgroup's CPU over the achieved tokens of all windows is the CPU per token the decision used.
    at_rate = [float(m) / 100 for m in re.findall(r"→\s+([0-9.]+)% at this rate", log)]
    measured = [float(m) / 100 for m in re.findall(r"CPU\s+([0-9.]+)% of 1 this window", log)]
    achieved = [float(m) for m in re.findall(r"achieved\s+([0-9.]+) tokens/s", log)]
    per_token = [float(m) / 1000 for m in re.findall(r"([0-9.]+) ms per token so far", log)]
    assert len(at_rate) >= 2 and all(0.70 <= u <= 0.80 for u in at_rate[-2:]), log
    # A window before the first think ended has no CPU per token yet ("-"): thinks go out in batches,
    # and the first may end only after a window or two of agents starting one by one.
    assert len(measured) == len(achieved) >= 2 and len(per_token) >= 2, log
    assert all(0.0 <= u <= 1.05 for u in measured) and sum(measured) / len(measured) >= 0.25, log
    assert sum(measured) / sum(achieved) == pytest.approx(per_token[-1], rel=0.3), log
    cal = config_mod.load_calibration(box.data / "calibration.yaml")
    assert cal.agents == 5 and cal.cpu_capacity == 1.0 and "cpu.cfs_quota_us" in cal.cpu_source, cal
    assert cal.llm_rate >= 1 and 0.70 <= cal.utilisation <= 0.80, cal
