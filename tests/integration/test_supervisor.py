"""The main job: ``python -m runtime.supervisor`` as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

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


def _supervisor(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.supervisor", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_workers(pid: int, n: int) -> list[int]:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        kids = _children(pid)
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
    out = subprocess.run(
        [sys.executable, "-m", "runtime.supervisor", "--config", str(config), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "ok (3 agents" in out.stdout


def test_check_names_the_file_and_the_key_of_a_typo(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("pool:\n  workers: 2\n  hartbeat_s: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "runtime.supervisor", "--config", str(bad), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert str(bad) in out.stderr and "pool.hartbeat_s" in out.stderr and "heartbeat_s" in out.stderr


def test_the_default_config_is_valid() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "runtime.supervisor", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_runs_agents_and_writes_a_usage_summary(config: Path, tmp_path: Path) -> None:
    proc = _supervisor("--config", str(config), "--duration", "3", "--no-live")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "cruncher" in out and "usage summary" in out
    summary = json.loads((tmp_path / "data" / "usage-summary.json").read_text())
    agents = summary["agents"]
    assert set(agents) == {"cruncher", "hoarder", "napper"}
    assert agents["cruncher"]["cpu_seconds"] > 0.5
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
