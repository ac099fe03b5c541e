"""A full disk is an error, never a signal: the in-flight log, the one store written through a shared
map, reserves its pages when it opens; agents' writes are refused above a floor of free space, and
resume when space returns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.pool.inflight import MAP_SIZE, InflightLog
from runtime.world.store import DISK_FLOOR, StoreError
from runtime.world.store.git import GitStore
from tests.harness import ROOT, python_m, start_supervisor, tmpfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")

#: Opens the log in the given directory, fills the volume, then writes a few thousand records.
CHILD = """
import os, sys, time
from runtime.pool.inflight import InFlight, InflightLog
log = InflightLog(sys.argv[1])
fd = os.open(os.path.join(os.path.dirname(sys.argv[1]), "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while os.write(fd, b"x" * 65536):
        pass
except OSError:
    pass
os.close(fd)
assert os.statvfs(sys.argv[1]).f_bavail == 0
for i in range(3000):
    rec = InFlight(task_id=f"t{i}", agent="a" * 30, kind="burn", worker_id=i % 7, worker_pid=1000 + i,
                   started_at=time.time(), cpu_probe="/proc", baseline_cpu=1.0, sampled_cpu=1.0,
                   sampled_at=time.time())
    log.begin(rec)
    log.sample([(f"t{i}", 2.0)])
    if i >= 64:
        log.clear(f"t{i - 64}")
log.close()
print("ok")
"""


def test_writes_on_a_full_volume_never_raise_sigbus(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "vol", f"size={(MAP_SIZE >> 20) + 4}m") as vol:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(vol / "inflight")], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_a_volume_without_room_for_the_log_is_a_clear_error(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "vol", f"size={(MAP_SIZE >> 20) // 2}m") as vol,
        pytest.raises(OSError, match=r"cannot reserve \d+ MiB for the in-flight log"),
    ):
        InflightLog(vol / "inflight")


def _fill(vol: Path, leave: int) -> Path:
    """Fill ``vol`` until only about ``leave`` bytes are free; the filler file, to delete later."""
    filler = vol / "filler"
    with filler.open("wb") as f:
        while (free := os.statvfs(vol).f_bavail * os.statvfs(vol).f_frsize) > leave:
            f.write(b"x" * min(1 << 20, free - leave))
            f.flush()
    return filler


def test_agents_writes_are_refused_on_a_nearly_full_volume_and_resume_when_space_returns(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "vol", f"size={(DISK_FLOOR >> 20) + 24}m") as vol:
        store = GitStore(vol / "artifacts.git")
        try:
            first = store.write("alice", "notes", b"x" * 1000, quota=1 << 30)
            filler = _fill(vol, DISK_FLOOR + (1 << 20))
            with pytest.raises(StoreError) as refused:
                store.write("alice", "big", b"y" * (2 << 20), quota=1 << 30)
            assert refused.value.code == "disk_full" and "MiB free" in refused.value.message
            assert [a.id for a in store.list("alice")] == ["notes"]  # nothing of it was written
            filler.unlink()
            again = store.write("alice", "big", b"y" * (2 << 20), quota=1 << 30)
            assert again.commit != first.commit and store.read("alice", "big").content == b"y" * (2 << 20)
        finally:
            store.close()
        fsck = subprocess.run(["git", "-C", str(vol / "artifacts.git"), "fsck", "--strict"], capture_output=True)
        assert fsck.returncode == 0, fsck.stderr


FULL_RUN = """
data_dir: {data}
metrics_port: 0
pool: {{workers: 2, heartbeat_s: 0.5}}
status_interval_s: 0.2
agents:
  - id: writer
    brain: scripted
    think_ms: 5
    policy:
      - {{kind: write_artifact, id: diary, content: "day one, and day one again"}}
      - {{kind: transfer, to: reader, amount: 1}}
  - id: reader
    brain: scripted
    policy:
      - {{kind: read_artifact, id: diary}}
      - {{kind: sleep, seconds: 0.1}}
"""


def _journal_transfers(data: Path) -> int:
    out = python_m("runtime.admin", "--data-dir", str(data), "journal", timeout_s=60)
    return out.stdout.count('"op":"transfer"')


def test_a_supervisor_on_a_volume_that_fills_up_keeps_running_and_carries_on_when_space_returns(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "vol", "size=200m") as vol:
        data = vol / "data"
        cfg = tmp_path / "full.yaml"
        cfg.write_text(FULL_RUN.format(data=data))
        proc = start_supervisor(cfg)
        try:
            deadline = time.monotonic() + 60
            while not (data / "run" / "status.json").exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the supervisor never started"
                time.sleep(0.1)
            filler = _fill(vol, 0)
            time.sleep(3)  # agents act against the full volume
            assert proc.poll() is None, "the supervisor died on a full volume"
            filler.unlink()
            before = _journal_transfers(data)
            deadline = time.monotonic() + 60
            while _journal_transfers(data) <= before:  # it carries on once there is room again
                assert time.monotonic() < deadline and proc.poll() is None, "no transfer after space returned"
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        events = python_m("runtime.events", "dump", str(data / "events"), "--kind", "action", timeout_s=60).stdout
        # The writes the full volume refused were said: to the agent, in the event log when it still had
        # room for the refusal, else in the log line of a turn that could not be recorded.
        assert "disk_full" in events or "disk_full" in err, err[-3000:]
        check = python_m("runtime.admin", "--data-dir", str(data), "check", timeout_s=60)
        assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
        fsck = subprocess.run(["git", "-C", str(data / "artifacts.git"), "fsck", "--strict"], capture_output=True)
        assert fsck.returncode == 0, fsck.stderr
