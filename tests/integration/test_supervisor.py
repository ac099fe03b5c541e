"""The main job: ``python -m runtime.supervisor`` as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from tests.harness import ROOT

CONFIG = """
data_dir: {data}
pool: {{workers: 2, heartbeat_s: 0.5}}
agents:
  - id: cruncher
    workload: [{{kind: burn, ms: 50}}]
  - id: hoarder
    workload: [{{kind: alloc, mb: 32, hold_ms: 20}}, {{kind: burn, ms: 10}}]
  - id: napper
    workload: [{{kind: sleep, ms: 100}}]
status_interval_s: 0.2
"""
AGENTS = ("cruncher", "hoarder", "napper")


def _supervisor(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.supervisor", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_for_workers(pid: int, n: int) -> list[int]:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        kids = [c.pid for c in psutil.Process(pid).children()]
        if len(kids) >= n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"supervisor {pid} did not start {n} workers")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "test.yaml"
    path.write_text(CONFIG.format(data=tmp_path / "data"))
    return path


def test_check_accepts_a_good_config(config: Path) -> None:
    out = _python_m("runtime.supervisor", "--config", str(config), "--check")
    assert out.returncode == 0 and "ok (3 agents" in out.stdout


def test_check_names_the_file_and_the_key_of_a_typo(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("pool:\n  workers: 2\n  hartbeat_s: 1\n")
    out = _python_m("runtime.supervisor", "--config", str(bad), "--check")
    assert out.returncode == 2
    assert str(bad) in out.stderr and "pool.hartbeat_s" in out.stderr and "heartbeat_s" in out.stderr


def test_the_default_config_is_valid() -> None:
    out = _python_m("runtime.supervisor", "--check")
    assert out.returncode == 0, out.stderr


def _agents_in_status(data: Path) -> dict[str, dict[str, Any]]:
    """The agents of ``status.json`` by id ({} until the first status is written)."""
    try:
        status = json.loads((data / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return {a["id"]: a for a in status.get("agents", [])}


def _run_until(config: Path, data: Path, done: Callable[[dict[str, dict[str, Any]]], bool]) -> tuple[str, str]:
    """Run the supervisor until ``done`` holds of its status's agents (90 s at most), then stop it with
    SIGTERM; its stdout and stderr. Not for a fixed time: a loaded host can spend the first seconds of a
    short run starting up."""
    (data / "run" / "status.json").unlink(missing_ok=True)  # an earlier run's: not this one's
    proc = _supervisor("--config", str(config), "--no-live")
    end = time.monotonic() + 90
    while not (met := done(agents := _agents_in_status(data))) and time.monotonic() < end:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert met, f"the agents had not done what the test waits for within 90 s: {agents}"
    return out, err


def _tasks(agents: dict[str, dict[str, Any]], agent: str) -> int:
    return int(agents.get(agent, {}).get("tasks", 0))


def test_runs_agents_and_writes_a_usage_summary(config: Path, tmp_path: Path) -> None:
    out, _ = _run_until(
        config,
        tmp_path / "data",
        lambda agents: (
            _tasks(agents, "cruncher") >= 3
            and agents.get("hoarder", {}).get("memory_peak_bytes", 0) > 30 << 20
            and _tasks(agents, "napper") >= 1
        ),
    )
    assert "cruncher" in out and "usage summary" in out and "ecology: gini" in out
    status = json.loads((tmp_path / "data" / "run" / "status.json").read_text())
    assert status["ecology"]["scrip_supply"] > 0 and 0 <= status["ecology"]["gini"] <= 1
    summary = json.loads((tmp_path / "data" / "usage-summary.json").read_text())
    agents = summary["agents"]
    assert set(agents) == {"cruncher", "hoarder", "napper"}
    # Each 50 ms burn is charged its CPU.
    assert agents["cruncher"]["tasks"] >= 3
    assert agents["cruncher"]["cpu_seconds"] >= 0.04 * agents["cruncher"]["tasks"]
    assert agents["napper"]["cpu_seconds"] < 0.05 * agents["napper"]["tasks"] + 0.05
    assert 30 << 20 < agents["hoarder"]["max_task_memory_bytes"] < 40 << 20
    rec = summary["reconciliation"]
    accounted = rec["charged"] + sum(rec["overhead"].values())
    assert accounted == pytest.approx(rec["kernel"], rel=0.02)
    assert summary["workers_started"] == 2 and summary["workers_crashed"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_everything_within_5_s(config: Path, sig: signal.Signals) -> None:
    proc = _supervisor("--config", str(config), "--no-live")
    workers = _wait_for_workers(proc.pid, 2)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 5.0
    assert proc.returncode == 0
    assert not [w for w in workers if _alive(w)]


def test_duration_counts_from_when_the_agents_start(config: Path) -> None:
    """``--duration S`` is the agents' S seconds: the start before them (spawning workers, opening the
    stores, recovering a crash) does not eat into it."""
    proc = _supervisor("--config", str(config), "--duration", "1.5", "--no-live")
    lines: list[tuple[float, str]] = []

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.append((time.monotonic(), line))

    readers = [threading.Thread(target=read, args=(s,)) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    spawned = time.monotonic()
    assert proc.wait(timeout=120) == 0, "".join(line for _, line in lines)
    for r in readers:
        r.join()
    text = "".join(line for _, line in lines)
    # The last line before the agents start, and the line the end of their time writes.
    ready = next((t for t, line in lines if line.startswith("data volume at start")), None)
    over = next((t for t, line in lines if "(--duration): stopping" in line), None)
    assert ready is not None and over is not None, text
    assert ready - spawned > 0.2, "the start took no time: this test could not tell when the clock began"
    # Slack for the readers' wake-ups on a loaded host; a clock started with the process would be short
    # by the whole start (workers spawned and proved, stores opened), longer than that.
    assert over - ready >= 1.5 - 0.2, f"stopped {over - ready:.2f} s after the agents started, not 1.5 s"


def test_workers_die_with_a_killed_supervisor(config: Path) -> None:
    proc = _supervisor("--config", str(config), "--no-live")
    workers = _wait_for_workers(proc.pid, 2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    end = time.monotonic() + 5
    while time.monotonic() < end and [w for w in workers if _alive(w)]:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]


def _python_m(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args…`` from the checkout, its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _admin(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _python_m("runtime.admin", "--data-dir", str(data), *args)


def test_the_ledger_survives_runs_and_the_admin_commands_read_it(config: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):  # a restart reuses the accounts and keeps the usage records
        # Until each agent was charged in this run (the status counts this run's tasks).
        out, _ = _run_until(config, data, lambda agents: all(_tasks(agents, a) >= 1 for a in AGENTS))
        assert "bucket s" in out and "scrip" in out
    check = _admin(data, "check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout
    balances = _admin(data, "balances")
    assert balances.returncode == 0
    rows = {line.split()[0]: line.split() for line in balances.stdout.splitlines()[1:]}
    assert set(rows) >= {"mint", "treasury", "cruncher", "hoarder", "napper", "supply"}
    assert rows["cruncher"][2] == "1000"  # scrip granted once, not once per run
    journal = _admin(data, "journal", "--limit", "5")
    entries = [json.loads(line) for line in journal.stdout.splitlines()]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    usage = [json.loads(line) for line in _admin(data, "journal").stdout.splitlines()]
    assert sum(e["op"]["op"] == "usage" for e in usage) >= 6  # each agent charged in each run


def test_cpu_rights_beyond_the_container_are_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "greedy.yaml"
    bad.write_text(
        f"data_dir: {tmp_path / 'data'}\nagents:\n  - {{id: greedy, cpu_rate: 100000, workload: [{{kind: echo}}]}}\n"
    )
    out = _python_m("runtime.supervisor", "--config", str(bad), "--duration", "1")
    assert out.returncode == 2
    assert "100000 millicores" in out.stderr and "available" in out.stderr


def test_admin_without_a_ledger_says_so(tmp_path: Path) -> None:
    out = _admin(tmp_path / "nothing", "check")
    assert out.returncode == 2 and "no ledger" in out.stderr


SCRIPTED = """
data_dir: {data}
pool: {{workers: 2, heartbeat_s: 0.5}}
agents:
  - id: writer
    brain: scripted
    think_ms: 5
    policy:
      - {{kind: write_artifact, id: diary, content: "day one"}}
      - {{kind: remember, text: "I wrote my diary"}}
      - {{kind: transfer, to: reader, amount: 1}}
  - id: reader
    brain: scripted
    policy:
      - {{kind: read_artifact, id: diary}}
      - {{kind: recall, query: "what did I write"}}
      - {{kind: sleep, seconds: 0.2}}
status_interval_s: 0.2
"""


def test_agents_carry_on_across_a_restart_and_nothing_is_charged_twice(tmp_path: Path) -> None:
    cfg = tmp_path / "scripted.yaml"
    cfg.write_text(SCRIPTED.format(data=tmp_path / "data"))
    data = tmp_path / "data"
    for round_ in range(2):
        proc = _supervisor("--config", str(cfg), "--no-live")
        _wait_for_workers(proc.pid, 2)
        # This supervisor's first status file comes with its first sample, later on a loaded host (and
        # the previous run's file is there until then): wait for one that names it.
        path, deadline = data / "run" / "status.json", time.monotonic() + 60
        while time.monotonic() < deadline and not (path.exists() and f'"pid":{proc.pid},' in path.read_text()):
            time.sleep(0.1)
        status = _python_m("runtime.status", "--data-dir", str(data))
        assert status.returncode == 0 and "running" in status.stdout and "writer" in status.stdout, status
        proc.send_signal(signal.SIGTERM)  # mid-run: agents are thinking and acting
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        check = _admin(data, "check")
        assert check.returncode == 0 and "all invariants hold" in check.stdout, (round_, check.stdout)
    stopped = _python_m("runtime.status", "--data-dir", str(data))
    assert "stopped" in stopped.stdout
    journal = [json.loads(line) for line in _admin(data, "journal").stdout.splitlines()]
    usage = [e["op"] for e in journal if e["op"]["op"] == "usage"]
    assert len({u["task_id"] for u in usage}) == len(usage)  # never charged twice
    assert {u["agent"] for u in usage} == {"writer", "reader"}
    runs = {u["task_id"].split("-")[0] for u in usage}
    assert len(runs) == 2  # both runs charged their tasks
    transfers = [e["op"] for e in journal if e["op"]["op"] == "transfer"]
    balances = {r.split()[0]: r.split() for r in _admin(data, "balances").stdout.splitlines()[1:]}
    assert int(balances["reader"][2]) == 1000 + sum(t["amount"] for t in transfers)  # nothing lost
    dump = _python_m("runtime.events", "dump", str(data / "events"))
    seqs = [json.loads(line)["seq"] for line in dump.stdout.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 10  # one gapless log across both runs


def test_prometheus_metrics_show_the_agents_and_the_pool(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "metrics.yaml"
    cfg.write_text(SCRIPTED.format(data=tmp_path / "data") + f"metrics_port: {port}\n")
    applied = 'aeco_agent_actions_total{agent="writer",outcome="applied"}'

    def scrape() -> dict[str, float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {
            name: float(value)
            for line in body.splitlines()
            if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]
        }

    proc = _supervisor("--config", str(cfg), "--no-live")
    values: dict[str, float] = {}
    try:
        _wait_for_workers(proc.pid, 2)
        # The server opens once the node has started (memory included); the agents then act.
        end = time.monotonic() + 30
        while values.get(applied, 0) <= 0 and time.monotonic() < end:
            with contextlib.suppress(OSError):  # not listening yet
                values = scrape()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert values[applied] > 0
    assert values['aeco_agent_cpu_seconds_total{agent="writer"}'] > 0
    assert values['aeco_agent_occupancy_seconds_total{agent="writer"}'] >= 0
    assert values["aeco_pool_workers"] == 2
    assert 0 <= values["aeco_pool_utilisation"] <= 1
    assert values["aeco_container_cpu_seconds_total"] > 0
    assert values['aeco_overhead_cpu_seconds_total{kind="startup"}'] > 0
    assert "aeco_unattributed_cpu_seconds" in values
    # The supervisor's own CPU: some charged to the agents it worked for, the rest named, per thread.
    assert values['aeco_supervisor_cpu_seconds{kind="agents"}'] > 0
    assert values['aeco_supervisor_cpu_seconds{kind="event loop"}'] > 0
    assert values["aeco_supervisor_kernel_cpu_seconds"] > values['aeco_supervisor_cpu_seconds{kind="agents"}']
    assert 0 <= values["aeco_ecology_gini"] <= 1 and values["aeco_ecology_scrip_supply"] > 0
