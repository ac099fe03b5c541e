"""Retention: ``admin compact`` on a data directory a real supervisor filled, the same passes while
writers run (as ``retention:`` runs them inside the supervisor), and SIGKILL in the middle of one.

After each: ``admin check`` passes (the journal replays from the checkpoint), ``git fsck --strict``
passes, HEAD's tree is what it was, and the event seqs are whole: the archive files and the log together
hold 1..last, in order, the log contiguous from its first event.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.config import RetentionConfig
from runtime.economy.ledger import OpenAccount, Transfer
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.ops import compact
from runtime.world.events.log import EventLog
from runtime.world.store.git import GitStore
from tests.harness import ROOT, python_m, start_supervisor

CONFIG = """
data_dir: {data}
metrics_port: 0
status_interval_s: 0.2
agents:
  - id: writer
    brain: scripted
    think_ms: 2
    policy:
      - {{kind: write_artifact, id: diary, content: hello}}
      - {{kind: transfer, to: reader, amount: 1}}
      - {{kind: write_artifact, id: notes, content: more}}
  - id: reader
    brain: scripted
    policy: [{{kind: read_artifact, id: diary}}, {{kind: transfer, to: writer, amount: 1}}]
"""


def _admin(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return python_m("runtime.admin", "--data-dir", str(data), *args, timeout_s=120)


def _git(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "--git-dir", str(data / "artifacts.git"), *args], capture_output=True, text=True)


def _head_listing(data: Path) -> str:
    out = _git(data, "ls-tree", "-r", "--full-tree", "HEAD")
    assert out.returncode == 0, out.stderr
    return out.stdout


def _archived_seqs(data: Path) -> list[int]:
    seqs: list[int] = []
    for f in sorted((data / compact.ARCHIVE_DIR).glob("events-*.jsonl.gz")):
        seqs.extend(json.loads(line)["seq"] for line in gzip.decompress(f.read_bytes()).splitlines())
    return seqs


def _assert_whole(data: Path, head: str, last_seq: int) -> None:
    """Every invariant that must hold of a data directory, compacted or not (see the module docstring)."""
    check = _admin(data, "check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
    fsck = _git(data, "fsck", "--strict")
    assert fsck.returncode == 0 and "error" not in fsck.stderr.lower(), fsck.stderr
    assert _head_listing(data) == head
    log = EventLog(data / "events", readonly=True)
    try:
        archived, last = log.archived(), log.last_seq()
        in_log = [e.seq for e in log.read(0)]
    finally:
        log.close()
    assert last == last_seq
    assert in_log == list(range(archived + 1, last + 1))
    files = _archived_seqs(data)
    # A pass killed between writing its file and moving the events out leaves that file beside them:
    # the next pass rewrites it. Otherwise the files hold exactly 1..archived.
    assert files[:archived] == list(range(1, archived + 1)), files[:20]
    assert all(s > archived for s in files[archived:])


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A data directory two short supervisor runs filled, and a time between the two runs."""
    where = tmp_path_factory.mktemp("ran")
    cfg = where / "run.yaml"
    cfg.write_text(CONFIG.format(data=where / "data"))
    first = python_m("runtime.supervisor", "--config", str(cfg), "--no-live", "--duration", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    time.sleep(1.5)  # Git commit times are whole seconds: keep the two runs apart
    between = time.time()
    time.sleep(1.5)
    second = python_m("runtime.supervisor", "--config", str(cfg), "--no-live", "--duration", "3")
    assert second.returncode == 0, second.stderr[-2000:]
    return where / "data", between


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
    return dst


def _last_seq(data: Path) -> int:
    log = EventLog(data / "events", readonly=True)
    try:
        return log.last_seq()
    finally:
        log.close()


def test_compact_keeps_head_the_books_and_the_event_seqs(ran: tuple[Path, float], tmp_path: Path) -> None:
    data = _copy(ran[0], tmp_path / "data")
    head = _head_listing(data)
    commits = int(_git(data, "rev-list", "--count", "HEAD").stdout)
    balances = _admin(data, "balances").stdout
    journal_before = len(_admin(data, "journal").stdout.splitlines())
    last = _last_seq(data)
    horizon = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ran[1]))  # between the two runs

    out = _admin(data, "compact", "--horizon", horizon)
    assert out.returncode == 0 and out.stdout.startswith("compacted before"), out.stdout + out.stderr
    assert "Traceback" not in out.stderr

    _assert_whole(data, head, last)
    after = int(_git(data, "rev-list", "--count", "HEAD").stdout)
    kept = _git(data, "log", "--format=%s", "HEAD").stdout.splitlines()
    squashed = [s for s in kept if "older history squashed" in s]
    # The first run's history became a root and one commit per artifact; the second run's stays as it was.
    assert squashed[-1].startswith("create artifact store") and len(squashed) == 3, squashed
    assert commits > after > len(squashed), (commits, after)
    assert _admin(data, "balances").stdout == balances
    ledger = LmdbLedger(data / "ledger")
    try:
        cp = ledger.checkpoint()
        assert cp is not None and cp.folded > 0
        assert len(list(ledger.journal())) == journal_before - cp.folded
    finally:
        ledger.close()
    log = EventLog(data / "events", readonly=True)
    try:
        assert 0 < log.archived() < last
    finally:
        log.close()

    # Compacting again at the same horizon changes nothing in the store; the run goes on from there.
    tree = _git(data, "rev-parse", "HEAD").stdout
    assert _admin(data, "compact", "--horizon", horizon).returncode == 0
    assert _git(data, "rev-parse", "HEAD").stdout == tree
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(data=data))
    again = python_m("runtime.supervisor", "--config", str(cfg), "--no-live", "--duration", "5")
    assert again.returncode == 0, again.stderr[-2000:]
    grown = _last_seq(data)
    assert grown > last
    _assert_whole(data, _head_listing(data), grown)


def test_compact_everything_then_bad_input_and_a_running_supervisor(ran: tuple[Path, float], tmp_path: Path) -> None:
    data = _copy(ran[0], tmp_path / "data")
    head, last = _head_listing(data), _last_seq(data)
    out = _admin(data, "compact", "--horizon", "0s")
    assert out.returncode == 0, out.stderr
    _assert_whole(data, head, last)
    subjects = _git(data, "log", "--format=%s", "HEAD").stdout.splitlines()
    assert len(subjects) == 3 and all("older history squashed" in s for s in subjects), subjects

    bad = _admin(data, "compact", "--horizon", "yesterday")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --horizon 'yesterday'"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(data=data))
    sup = start_supervisor(cfg)
    try:
        status = data / "run" / "status.json"
        deadline = time.monotonic() + 60
        while not status.exists() or json.loads(status.read_bytes())["pid"] != sup.pid:
            assert time.monotonic() < deadline and sup.poll() is None, "the supervisor did not start"
            time.sleep(0.2)
        doc = json.loads(status.read_bytes())
        # The status shows the data volume and the store's history per agent.
        assert doc["volume"]["total_bytes"] >= doc["volume"]["free_bytes"] > 0
        assert doc["volume"]["data_bytes"] > 0
        busy = _admin(data, "compact")
        assert busy.returncode == 1 and f"supervisor {sup.pid} is running" in busy.stderr, busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.communicate(timeout=60)
    assert sup.returncode == 0
    final = json.loads((data / "run" / "status.json").read_bytes())
    assert any(a["history_bytes"] > 0 for a in final["agents"]), final["agents"]


# ------------------------------------------------------------------------------- while writers run


def test_retention_passes_while_writers_run_lose_nothing(tmp_path: Path) -> None:
    """The supervisor's retention loop (``compact.retain``) on open stores while threads write to all
    three: every acknowledged write is there afterwards, and every invariant holds. The horizon is a
    second (the configuration's minimum is a minute; the Struct is built here without that check)."""
    data = tmp_path / "data"
    data.mkdir()
    ledger = LmdbLedger(data / "ledger", durable=False)
    store = GitStore(data / "artifacts.git", durable=False)
    events = EventLog(data / "events", durable=False)
    for a in ("a", "b"):
        ledger.apply(OpenAccount(id=f"open-{a}", account=a, grants={"scrip": 1_000_000}))
    done = threading.Event()
    acked = {"transfers": 0, "writes": 0, "events": 0}

    def write() -> None:
        i = 0
        while not done.is_set():
            i += 1
            ledger.apply(
                Transfer(id=f"t{i}", src="a" if i % 2 else "b", dst="b" if i % 2 else "a", asset="scrip", amount=1)
            )
            acked["transfers"] = i
            store.write("a", f"art{i % 5}", f"version {i}".encode(), quota=1 << 20)
            acked["writes"] = i
            events.append("tick", "a", n=i)
            acked["events"] = i

    reports: list[str] = []
    cfg = RetentionConfig(enabled=True, horizon_s=1.0, interval_s=0.5, archive_max_mb=64)
    writer = threading.Thread(target=write)
    writer.start()

    async def supervise() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(6.0, stop.set)
        await compact.retain(cfg, store, ledger, events, data, stop, reports.append)

    try:
        asyncio.run(supervise())
    finally:
        done.set()
        writer.join(30)
    n = acked["events"]
    assert len(reports) >= 5 and any("squashed into" in r for r in reports), reports
    assert any("journal entries folded" in r for r in reports) and any("archived" in r for r in reports), reports
    last = events.last_seq()
    assert last == n and [e.fields["n"] for e in events.read(events.archived())] == list(
        range(events.archived() + 1, n + 1)
    )
    assert ledger.checkpoint() is not None
    for k in range(5):
        latest = max(i for i in range(1, acked["writes"] + 1) if i % 5 == k)
        assert store.read("a", f"art{k}").content == f"version {latest}".encode()
    head = store.head()
    events.close()
    store.close()
    ledger.close()
    assert (data / "artifacts.git" / "refs" / "heads" / "main").read_text().strip() == head
    _assert_whole(data, _head_listing(data), n)


# ---------------------------------------------------------------------------------- SIGKILL in one

FILL = """
import sys
from pathlib import Path
from runtime.economy.ledger import OpenAccount, Transfer
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.world.events.log import EventLog
from runtime.world.store.git import GitStore

data = Path(sys.argv[1])
data.mkdir()
ledger, store, events = LmdbLedger(data / "ledger"), GitStore(data / "artifacts.git"), EventLog(data / "events")
for a in ("a", "b"):
    ledger.apply(OpenAccount(id=f"open-{a}", account=a, grants={"scrip": 1_000_000}))
futures = []
for i in range(1, 6001):
    futures.append(ledger.submit(Transfer(id=f"t{i}", src="a", dst="b", asset="scrip", amount=1)))
    futures.append(store.submit_write(f"w{i % 50}", f"art{i % 400}", f"version {i}".encode() * 8, quota=1 << 20))
    futures.append(events.submit("tick", "a", {"n": i}))
for f in futures:
    f.result()
events.close(); store.close(); ledger.close()
"""


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with 6,000 commits, transfers and events (written directly: a supervisor would
    take minutes to make this much history)."""
    data = tmp_path_factory.mktemp("filled") / "data"
    out = subprocess.run([sys.executable, "-c", FILL, str(data)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return data


def _compact_proc(data: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "runtime.admin", "--data-dir", str(data), "compact", "--horizon", "0s"]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_during_compaction_leaves_a_whole_data_dir(filled: Path, tmp_path: Path) -> None:
    head, last = _head_listing(filled), _last_seq(filled)
    # How long a whole pass takes here (start-up included), to spread the kills over it.
    timed = _copy(filled, tmp_path / "timed")
    t0 = time.monotonic()
    full = _compact_proc(timed)
    _, err = full.communicate(timeout=600)
    whole_s = time.monotonic() - t0
    assert full.returncode == 0, err.decode()[-2000:]
    killed_mid_work = 0
    for i, share in enumerate((0.35, 0.5, 0.6, 0.7, 0.8, 0.9)):
        data = _copy(filled, tmp_path / f"kill{i}")
        proc = _compact_proc(data)
        time.sleep(whole_s * share)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            killed_mid_work += 1
        _assert_whole(data, head, last)
        # The next pass finishes what the killed one started.
        again = _admin(data, "compact", "--horizon", "0s")
        assert again.returncode == 0, again.stderr
        _assert_whole(data, head, last)
        assert len(_git(data, "log", "--format=%s", "HEAD").stdout.splitlines()) == 401
    assert killed_mid_work >= 3, f"only {killed_mid_work} kills landed before the pass ended ({whole_s:.1f} s)"
    assert os.path.isdir(filled)
