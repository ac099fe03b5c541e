"""A damaged file in the data directory: the truth (ledger, event log) is refused in one line naming
it; what is derived (the store's index, the in-flight log) is set aside and rebuilt, and the run goes on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import python_m

CONFIG = """
data_dir: {data}
metrics_port: 0
agents:
  - id: writer
    brain: scripted
    think_ms: 5
    policy: [{{kind: write_artifact, id: diary, content: hello}}, {{kind: transfer, to: reader, amount: 1}}]
  - id: reader
    brain: scripted
    policy: [{{kind: read_artifact, id: diary}}, {{kind: sleep, seconds: 0.1}}]
"""


def _supervise(cfg: Path, seconds: str) -> subprocess.CompletedProcess[str]:
    return python_m("runtime.supervisor", "--config", str(cfg), "--no-live", "--duration", seconds)


def _admin(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return python_m("runtime.admin", "--data-dir", str(data), *args, timeout_s=60)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory a short run has filled."""
    where = tmp_path_factory.mktemp("ran")
    cfg = where / "run.yaml"
    cfg.write_text(CONFIG.format(data=where / "data"))
    out = _supervise(cfg, "3")
    assert out.returncode == 0, out.stderr
    return where / "data"


def _damaged_copy(ran: Path, tmp_path: Path, target: str, how: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(ran, data, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
    (data / "run" / "supervisor.lock").unlink()
    f = data / target
    raw = bytearray(f.read_bytes())
    if how == "flip":
        for i in range(0, min(len(raw), 8192), 7):
            raw[i] ^= 0xFF
    else:  # truncated to its first page
        raw = raw[:4096]
    f.write_bytes(bytes(raw))
    (tmp_path / "run.yaml").write_text(CONFIG.format(data=data))
    return data


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("target", ["ledger/data.mdb", "events/data.mdb"])
def test_a_damaged_ledger_or_event_log_is_refused_in_one_line_naming_it(
    ran: Path, tmp_path: Path, target: str, how: str
) -> None:
    data = _damaged_copy(ran, tmp_path, target, how)
    out = _supervise(tmp_path / "run.yaml", "2")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[-1].startswith("error: ") and str(data / Path(target).parent) in lines[-1], lines
    assert "restore the data_dir from a backup" in lines[-1]


@pytest.mark.parametrize("target", ["artifacts.git.index/data.mdb", "run/inflight/data.mdb"])
def test_a_damaged_derived_file_is_set_aside_and_rebuilt(ran: Path, tmp_path: Path, target: str) -> None:
    data = _damaged_copy(ran, tmp_path, target, "flip")
    out = _supervise(tmp_path / "run.yaml", "2")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "set aside as" in out.stderr, out.stderr
    aside = (data / target).parent.with_name(f"{Path(target).parent.name}.*-*")
    assert list(aside.parent.glob(aside.name)), sorted(p.name for p in data.rglob("*"))
    check = _admin(data, "check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
    fsck = subprocess.run(["git", "-C", str(data / "artifacts.git"), "fsck", "--strict"], capture_output=True)
    assert fsck.returncode == 0, fsck.stderr
