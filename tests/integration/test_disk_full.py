"""A full disk is an error, never a signal: the in-flight log, the one store written through a shared
map, reserves its pages when it opens."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.pool.inflight import MAP_SIZE, InflightLog

ROOT = Path(__file__).resolve().parents[2]
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


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_writes_on_a_full_volume_never_raise_sigbus(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "vol", f"{(MAP_SIZE >> 20) + 4}m") as vol:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(vol / "inflight")], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_a_volume_without_room_for_the_log_is_a_clear_error(tmp_path: Path) -> None:
    with (
        _tmpfs(tmp_path / "vol", f"{(MAP_SIZE >> 20) // 2}m") as vol,
        pytest.raises(OSError, match=r"cannot reserve \d+ MiB for the in-flight log"),
    ):
        InflightLog(vol / "inflight")
