"""A damaged file in the data directory (bytes flipped, cut short, deleted), one store file at a time.

The truth (ledger, event log, Git objects) and the store's refs are refused at start in one line that
names the file and says what to do; what is derived (the store's index, the in-flight log) is set aside
and rebuilt, and the run goes on. ``python -m runtime.admin repair`` rebuilds what it can (the store's
``HEAD``, branch ref and index, the ledger from its journal, the in-flight log charged and discarded),
after which ``admin check``, ``git fsck --strict`` and the event seqs hold and the supervisor starts;
it refuses, in one line, what nothing can rebuild.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import lmdb
import msgspec
import pytest

from runtime.pool.inflight import CRASH_CODE
from tests.harness import python_m
from tests.integration.test_restart import CONFIG as BUSY_CONFIG
from tests.integration.test_restart import _kill_mid_run, _pending

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
PACK = "artifacts.git/objects/pack/pack-*.pack"
RESTORE = "restore the data_dir from a backup"


def _supervise(cfg: Path, seconds: str) -> subprocess.CompletedProcess[str]:
    return python_m("runtime.supervisor", "--config", str(cfg), "--no-live", "--duration", seconds)


def _admin(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return python_m("runtime.admin", "--data-dir", str(data), *args, timeout_s=120)


def _fsck(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "--git-dir", str(data / "artifacts.git"), "fsck", "--strict"], capture_output=True, text=True
    )


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line a refusal ends with (there is no other, and no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr[-3000:]
    return errors[0]


def _assert_whole(data: Path) -> None:
    """``admin check``, ``git fsck --strict`` and the event log's seqs (1, 2, … with no gap) hold."""
    check = _admin(data, "check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
    fsck = _fsck(data)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = python_m("runtime.events", "dump", str(data / "events"), timeout_s=60)
    assert dump.returncode == 0, dump.stderr
    seqs = [msgspec.json.decode(line)["seq"] for line in dump.stdout.splitlines()]
    assert seqs and seqs == list(range(1, len(seqs) + 1)), seqs[:20]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory a short run has filled."""
    where = tmp_path_factory.mktemp("ran")
    cfg = where / "run.yaml"
    cfg.write_text(CONFIG.format(data=where / "data"))
    out = _supervise(cfg, "3")
    assert out.returncode == 0, out.stderr
    _assert_whole(where / "data")
    return where / "data"


def _target(data: Path, target: str) -> Path:
    """The file ``target`` names (for the pack: the largest one)."""
    if "*" in target:
        return max(data.glob(target), key=lambda p: p.stat().st_size)
    return data / target


def _copy(ran: Path, tmp_path: Path) -> Path:
    """A copy of ``ran`` with a configuration to run it (``tmp_path/run.yaml``)."""
    data = tmp_path / "data"
    shutil.copytree(ran, data, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
    (data / "run" / "supervisor.lock").unlink()
    (tmp_path / "run.yaml").write_text(CONFIG.format(data=data))
    return data


def _damaged_copy(ran: Path, tmp_path: Path, target: str, how: str) -> Path:
    """A copy of ``ran`` whose ``target`` has its bytes flipped (every 7th of its first 8 KiB), is cut to
    half its length (at most 12 KiB), or is deleted."""
    data = _copy(ran, tmp_path)
    f = _target(data, target)
    raw = bytearray(f.read_bytes())
    if how == "flip":
        for i in range(0, min(len(raw), 8192), 7):
            raw[i] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif how == "truncate":  # an LMDB file keeps its two meta pages and loses pages in use
        f.write_bytes(bytes(raw[: min(len(raw) // 2, 12 << 10)]))
    else:
        f.unlink()
    return data


HOWS = ["flip", "truncate", "delete"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(
    ("target", "fix"),
    [
        ("ledger/data.mdb", "repair rebuilds it from its journal if that is intact; else " + RESTORE),
        ("events/data.mdb", RESTORE),
        (PACK, RESTORE),
        ("artifacts.git/HEAD", "repair rewrites it"),
        ("artifacts.git/refs/heads/main", "repair rewrites it"),
    ],
)
def test_a_damaged_store_file_is_refused_in_one_line_naming_it_and_the_fix(
    ran: Path, tmp_path: Path, target: str, fix: str, how: str
) -> None:
    data = _damaged_copy(ran, tmp_path, target, how)
    named = _target(ran, target).relative_to(ran)
    if target.startswith("artifacts.git") and not (target.endswith("main") and how == "delete"):
        assert _fsck(data).returncode != 0  # git's own check agrees (to git, no branch is an unborn one)
    out = _supervise(tmp_path / "run.yaml", "2")
    line = _one_error_line(out)
    assert out.returncode == 1, out.stderr[-2000:]
    assert str(data / named) in line, line
    if target == "ledger/data.mdb" and how == "delete":  # a ledger cannot be made up: no fresh start
        assert "missing, but the event log of a run is there" in line and RESTORE in line, line
        return
    assert fix in line, line
    if "repair" in fix:
        assert f"python -m runtime.admin --data-dir {data} repair" in line, line


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("target", ["artifacts.git.index/data.mdb", "run/inflight/data.mdb"])
def test_a_damaged_derived_file_is_set_aside_and_rebuilt(ran: Path, tmp_path: Path, target: str, how: str) -> None:
    data = _damaged_copy(ran, tmp_path, target, how)
    out = _supervise(tmp_path / "run.yaml", "2")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    if how != "delete":
        assert "set aside as" in out.stderr, out.stderr
        aside = (data / target).parent.with_name(f"{Path(target).parent.name}.*-*")
        assert list(aside.parent.glob(aside.name)), sorted(p.name for p in data.rglob("*"))
    _assert_whole(data)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(
    "target", ["artifacts.git/HEAD", "artifacts.git/refs/heads/main", "artifacts.git.index/data.mdb"]
)
def test_repair_rebuilds_the_stores_refs_and_index(ran: Path, tmp_path: Path, target: str, how: str) -> None:
    data = _damaged_copy(ran, tmp_path, target, how)
    out = _admin(data, "repair")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert "repaired" in out.stdout, out.stdout
    _assert_whole(data)
    assert (data / "artifacts.git" / "refs" / "heads" / "main").read_bytes() == (
        ran / "artifacts.git" / "refs" / "heads" / "main"
    ).read_bytes()
    show = _admin(data, "history", "diary")
    assert show.returncode == 0 and show.stdout.strip(), show.stdout + show.stderr
    started = _supervise(tmp_path / "run.yaml", "2")
    assert started.returncode == 0, started.stderr[-2000:]


def test_a_ref_naming_no_commit_is_set_back_by_repair_unless_the_index_is_gone_too(ran: Path, tmp_path: Path) -> None:
    data = _copy(ran, tmp_path)
    ref = data / "artifacts.git" / "refs" / "heads" / "main"
    ref.write_text("0" * 40 + "\n")
    alone = tmp_path / "alone"
    shutil.copytree(data, alone)
    shutil.rmtree(alone / "artifacts.git.index")
    line = _one_error_line(_supervise(tmp_path / "run.yaml", "2"))
    assert f"{ref}: names no commit of the store" in line, line
    out = _admin(data, "repair")
    assert out.returncode == 0 and "set back to" in out.stdout, out.stdout + out.stderr
    assert ref.read_bytes() == (ran / "artifacts.git" / "refs" / "heads" / "main").read_bytes()
    _assert_whole(data)
    refused = _admin(alone, "repair")
    line = _one_error_line(refused)
    assert refused.returncode == 1 and "the store's index names no other commit" in line and RESTORE in line, line


def test_repair_rebuilds_a_ledger_whose_tables_disagree_with_its_journal(ran: Path, tmp_path: Path) -> None:
    data = _copy(ran, tmp_path)
    before = _admin(data, "balances").stdout
    env = lmdb.open(str(data / "ledger"), max_dbs=16)
    with env.begin(write=True) as txn:  # a damaged page of the balances: a holding that no op gave
        txn.put(b"writer\x00scrip", struct.pack(">q", 10**9), db=env.open_db(b"balances", txn=txn))
    env.close()
    assert _admin(data, "check").returncode == 1
    out = _admin(data, "repair")
    assert out.returncode == 0 and "rebuilt from its" in out.stdout, out.stdout + out.stderr
    assert _admin(data, "balances").stdout == before
    _assert_whole(data)
    assert list(data.glob("ledger.damaged-*")), "the old ledger is kept for a post-mortem"


def test_repair_replays_a_compacted_journal_from_its_checkpoint(ran: Path, tmp_path: Path) -> None:
    data = _copy(ran, tmp_path)
    compacted = _admin(data, "compact", "--horizon", "0s")
    assert compacted.returncode == 0 and "folded" in compacted.stdout, compacted.stdout + compacted.stderr
    before = _admin(data, "balances").stdout
    env = lmdb.open(str(data / "ledger"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"reader\x00scrip", struct.pack(">q", 7), db=env.open_db(b"balances", txn=txn))
    env.close()
    out = _admin(data, "repair")
    assert out.returncode == 0 and "rebuilt from its" in out.stdout, out.stdout + out.stderr
    assert _admin(data, "balances").stdout == before
    check = _admin(data, "check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("target", "how"), [("ledger/data.mdb", "flip"), ("events/data.mdb", "truncate"), (PACK, "flip")]
)
def test_repair_refuses_what_nothing_rebuilds_in_one_line(ran: Path, tmp_path: Path, target: str, how: str) -> None:
    data = _damaged_copy(ran, tmp_path, target, how)
    out = _admin(data, "repair")
    line = _one_error_line(out)
    assert out.returncode == 1 and line.startswith("error: repair: "), out.stdout + out.stderr
    assert str(_target(data, target)) in line and RESTORE in line, line


def test_repair_charges_the_tasks_left_in_flight_then_discards_the_log(tmp_path: Path) -> None:
    cfg = tmp_path / "busy.yaml"
    cfg.write_text(BUSY_CONFIG.format(data=tmp_path / "data", cgroups="off", think=400, prefetch=0))
    data = tmp_path / "data"
    _kill_mid_run(cfg, data)
    left = {r.task_id for r in _pending(data)}
    assert left
    out = _admin(data, "repair")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert not (data / "run" / "inflight").exists()
    journal = [msgspec.json.decode(line) for line in _admin(data, "journal").stdout.splitlines()]
    crashed = {e["op"]["task_id"] for e in journal if e["op"].get("error") == CRASH_CODE}
    assert crashed == left
    _assert_whole(data)
    again = _admin(data, "repair")  # nothing left to charge: nothing charged twice
    journal_again = _admin(data, "journal").stdout.splitlines()
    assert again.returncode == 0 and len(journal_again) == len(journal), again.stdout + again.stderr
