"""Limits, calibration and stats in a real "container": a child cgroup with a CPU quota (and a memory
limit), the real supervisor and calibration processes inside it, the real pool and the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from native.tiny_model import write_tiny_model
from runtime.config import load_calibration
from runtime.host import cgroups as cg
from runtime.ops.status import Status
from tests.cgroup_box import cgroup_box
from tests.harness import ROOT

MB = 1 << 20

LLM_CONFIG = """
data_dir: {data}
pool: {{heartbeat_s: 0.5}}
llm: {{model: {model}, max_tokens: 64}}
agents:
  - {{id: builder, brain: llm, persona: You build things.}}
  - {{id: trader, brain: llm, persona: You trade things.}}
"""

PLACEHOLDERS = """
data_dir: {data}
pool: {{heartbeat_s: 0.5}}
metrics_port: 0
agents:
  - id: cruncher
    workload: [{{kind: burn, ms: 50}}]
  - id: hoarder
    memory_quota_mb: 256
    workload: [{{kind: alloc, mb: 32, hold_ms: 20}}, {{kind: burn, ms: 10}}]
  - id: napper
    workload: [{{kind: sleep, ms: 100}}]
status_interval_s: 0.5
"""


def run(args: list[str], box: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [*(box or []), sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def llm_config(tmp_path: Path) -> Path:
    model = write_tiny_model(tmp_path / "tiny.gguf")
    path = tmp_path / "llm.yaml"
    path.write_text(LLM_CONFIG.format(data=tmp_path / "data", model=model))
    return path


def test_calibration_converges_in_a_half_cpu_container_and_the_supervisor_uses_it(
    llm_config: Path, tmp_path: Path
) -> None:
    args = ["-m", "runtime.calibrate", "--config", str(llm_config), "--agents", "3", "--window-s", "2"]
    with cgroup_box(0.5) as box:
        out = run([*args, "--start-rate", "1500", "--max-windows", "20"], box)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "calibrating: 3 agents on 1 workers, 0.5 CPUs (cgroup v1 cpu.cfs_quota_us=50000" in out.stdout
    # The rule decides on the utilisation at the rate; the cgroup's count over the window agrees roughly.
    percents = [float(p) for p in re.findall(r"→ +([\d.]+)% at this rate", out.stdout)]
    measured = [float(p) for p in re.findall(r"CPU +([\d.]+)% of 0\.5 this window", out.stdout)]
    assert len(percents) >= 2 and all(70 <= p <= 80 for p in percents[-2:]), out.stdout
    assert len(measured) == len(percents) and 50 <= sum(measured[-2:]) / 2 <= 100, out.stdout
    cal = load_calibration(tmp_path / "data" / "calibration.yaml")
    assert cal.agents == 3 and cal.cpu_capacity == 0.5 and cal.llm_rate >= 1
    assert "cfs_quota_us=50000" in cal.cpu_source and cal.model == str(tmp_path / "tiny.gguf")
    assert 0.70 <= cal.utilisation <= 0.80 and cal.windows == len(percents)
    assert f"llm_rate {cal.llm_rate} tokens/s per agent" in out.stdout
    # Outside the box the supervisor scales the calibration to this host's capacity, shared by its 2 agents.
    cores = cg.cpu_capacity(cg.discover())
    check = run(["-m", "runtime.supervisor", "--config", str(llm_config), "--check"])
    assert check.returncode == 0, check.stderr
    share = int(cal.llm_rate * 3 * cores / 0.5 // 2)
    assert f"llm_rate auto: calibration {tmp_path / 'data' / 'calibration.yaml'}" in check.stdout
    assert f"scaled from 0.5 CPUs): {share} tokens/s" in check.stdout


def test_calibration_that_does_not_converge_writes_nothing(llm_config: Path, tmp_path: Path) -> None:
    args = ["-m", "runtime.calibrate", "--config", str(llm_config), "--agents", "2", "--window-s", "1"]
    with cgroup_box(0.5) as box:
        out = run([*args, "--start-rate", "1", "--max-windows", "2"], box)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "not converged" in out.stderr and "nothing written" in out.stderr
    assert len(re.findall(r"^window ", out.stdout, re.M)) == 2
    assert not (tmp_path / "data" / "calibration.yaml").exists()


def test_status_shows_the_limits_the_container_and_each_agent(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(PLACEHOLDERS.format(data=tmp_path / "data"))
    with cgroup_box(0.5, memory_bytes=1 << 30) as box:
        out = run(["-m", "runtime.supervisor", "--config", str(config), "--duration", "4", "--no-live"], box)
    assert out.returncode == 0, out.stderr
    st = msgspec.json.decode((tmp_path / "data" / "run" / "status.json").read_bytes(), type=Status)
    assert st.limits is not None and st.sizing is not None and st.container is not None
    assert st.limits.cpu_cores == 0.5 and "cgroup v1 cpu.cfs_quota_us=50000/" in st.limits.cpu_source
    assert st.limits.memory_bytes == 1 << 30 and "memory.limit_in_bytes" in st.limits.memory_source
    assert st.limits.hardware_class == "laptop"
    # 1 worker (half a core); a task may add (1024 − 256 supervisor) − 192 worker = 576 MiB
    assert st.sizing.workers == 1 and st.sizing.task_memory_max_bytes == 576 * MB
    c = st.container
    assert c.cpu_capacity == 0.5 and "cpuacct.usage" in c.cpu_source
    assert c.cpu_seconds is not None and c.cpu_seconds > 0.5  # start-up and 4 s of work in the box
    # CFS grants the quota per 100 ms period, so a window of W seconds can hold the quota of W/0.1 + 1
    # periods: up to 100 * (1 + 0.1 / W) percent (the last status, written at the stop, has a short W).
    assert c.cpu_percent is not None and c.interval_s > 0
    assert 0 < c.cpu_percent <= 100 * (1 + 0.1 / c.interval_s) * 1.1, c
    assert c.memory_bytes is not None and 10 * MB < c.memory_bytes < 1 << 30
    assert c.memory_limit_bytes == 1 << 30 and "memory.usage_in_bytes" in c.memory_source
    agents = {a.id: a for a in st.agents}
    assert set(agents) == {"cruncher", "hoarder", "napper"}
    assert agents["hoarder"].memory_quota_bytes == 256 * MB and agents["cruncher"].memory_quota_bytes == 576 * MB
    assert agents["cruncher"].cpu_seconds > 0 and agents["hoarder"].memory_peak_bytes >= 16 * MB
    assert all(a.llm_rate == 0 and a.cpu_rate == 150 for a in agents.values())  # 450 millicores / 3
    shown = run(["-m", "runtime.status", "--data-dir", str(tmp_path / "data")])
    assert shown.returncode == 0
    assert "limits: 0.5 CPUs (cgroup v1 cpu.cfs_quota_us=50000" in shown.stdout
    assert "memory 1024 MiB (cgroup v1 memory.limit_in_bytes" in shown.stdout
    assert re.search(
        r"container: CPU \d+% of 0\.5 CPUs, memory \d+ MB / 1024 MB \(\d+%, under 90%\); [\d.]+ CPU-s in all",
        shown.stdout,
    ), shown.stdout


def test_a_quota_the_memory_limit_cannot_hold_is_refused_at_start(tmp_path: Path) -> None:
    """512 MiB less 256 for the supervisor holds one worker of 192 MiB, leaving a task 64 MiB."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    text = PLACEHOLDERS.format(data=tmp_path / "data")
    good.write_text(text.replace("memory_quota_mb: 256", "memory_quota_mb: 64"))
    bad.write_text(text.replace("memory_quota_mb: 256", "memory_quota_mb: 65"))
    with cgroup_box(0.5, memory_bytes=512 * MB) as box:
        ok = run(["-m", "runtime.supervisor", "--config", str(good), "--check"], box)
        refused = run(["-m", "runtime.supervisor", "--config", str(bad), "--duration", "1"], box)
    assert ok.returncode == 0, ok.stderr
    assert "limits: 0.5 CPUs (cgroup v1 cpu.cfs_quota_us=50000/" in ok.stdout
    assert "memory 512 MiB (cgroup v1 memory.limit_in_bytes" in ok.stdout
    assert "sized: 1 workers (auto: one per whole core of 0.5)" in ok.stdout
    assert refused.returncode == 2
    assert "agent hoarder: memory_quota_mb 65 is more than a task can have" in refused.stderr
    assert "512 MiB (cgroup v1 memory.limit_in_bytes" in refused.stderr
    assert "64 MiB after the worker's own 192 MiB" in refused.stderr
    assert not (tmp_path / "data" / "run" / "status.json").exists()
