"""Crashes in tests: killing a writer at a random moment (the crash-safety tests of the durable
stores), finding what a test left running, and the in-flight records a killed supervisor leaves.

A writer prints one line per operation once it is durable; the test kills it with SIGKILL while it
writes, then checks that every acknowledged operation survived.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psutil

from runtime.pool.inflight import Finished, InFlight, InflightLog

REPO = Path(__file__).resolve().parent.parent


def kill_mid_write(
    cmd: Sequence[str], *, env: Mapping[str, str], errlog: Path, delay_s: float, after_acks: int = 1
) -> list[str]:
    """Run ``cmd``; ``delay_s`` after its ``after_acks``-th acknowledgement, SIGKILL it. Return the lines
    it printed in full (a line cut short by the kill is not an acknowledgement), without their newlines.
    ``after_acks`` makes sure of so much work however slowly a loaded host lets the writer go."""
    with errlog.open("wb") as err:
        proc = subprocess.Popen(
            list(cmd), cwd=REPO, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
    lines: list[bytes] = []
    enough = threading.Event()

    def drain() -> None:
        # Read continuously so that a full pipe never slows the writer down before the kill.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= after_acks:
                enough.set()

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        assert enough.wait(60), f"{len(lines)} of {after_acks} acknowledgements; stderr: {errlog.read_text()}"
        time.sleep(delay_s)
        assert proc.poll() is None, f"the writer exited early; stderr: {errlog.read_text()}"
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, f"exit status {proc.returncode}; stderr: {errlog.read_text()}"
    return [line[:-1].decode() for line in lines if line.endswith(b"\n")]


def live_children(marker: str) -> list[int]:
    """Pids of this process's live (not zombie) children whose command line mentions ``marker``: the
    writers a crash test left behind, which must be none once it is over."""
    found = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and any(marker in arg for arg in child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def descendants_of_uid(uid: int) -> list[str]:
    """This process's live descendants running as ``uid`` (``pid: command line``): what confined code
    left behind. Only descendants, so that another test run on the same host is never counted."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.uids().real == uid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid}: {' '.join(p.cmdline())!r}")
        except psutil.NoSuchProcess:
            continue
    return found


def finished_task(task_id: str, kind: str, cpu_seconds: float, **fields: Any) -> InFlight:
    """The in-flight record of a task of ``alpha``'s that ended on worker 1 a moment ago, ``cpu_seconds``
    of CPU in half a second, whose charge was not durable yet when the supervisor was killed: what the
    next start's recovery charges (``fields`` replace the record's others)."""
    now = time.time()
    record = InFlight(
        task_id=task_id,
        agent="alpha",
        kind=kind,
        worker_id=1,
        worker_pid=1,
        started_at=now - 1,
        cpu_probe="/proc",
        baseline_cpu=1.0,
        sampled_cpu=1.0,
        sampled_at=now,
        finished=Finished(cpu_seconds, 0, 0, 0.5),
    )
    return msgspec.structs.replace(record, **fields)


def leave_in_flight(data: Path, records: Iterable[InFlight], raw: Mapping[bytes, bytes] | None = None) -> None:
    """Put ``records`` (under their task ids) and the ``raw`` entries (key -> bytes as stored) in the
    in-flight log of data directory ``data``, as a supervisor killed with them in flight leaves it."""
    log = InflightLog(data / "run" / "inflight")
    try:
        with log.env.begin(write=True) as txn:
            for rec in records:
                txn.put(rec.task_id.encode(), msgspec.msgpack.encode(rec))
            for key, value in (raw or {}).items():
                txn.put(key, value)
    finally:
        log.close()
