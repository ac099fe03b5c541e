"""``python -m runtime.admin repair``: rebuild what is derived in a data directory, refuse what is not.

Stop the supervisor first (the data directory's lock is taken, as a start takes it). In order:

- the ledger: when it does not open, or its tables do not agree with its journal (``admin check``), it is
  rebuilt by replaying the journal into a new one (``replay_journal``), if the journal reads whole and
  replays; the old one is set aside. A journal that does not is refused: nothing can rebuild who holds
  what, a backup must be restored;
- the event log is the record of what happened: it is read whole (every seq after those retention
  archived, every event decodes) or refused. Agents' cursors past its end are brought back to it. The
  per-agent indexes of the log are kept in memory and built as it runs: there is nothing on disk to
  rebuild;
- the Git store: ``HEAD`` is rewritten (it is always the symbolic ref to the branch), a missing or
  damaged branch ref is set back to the commit the store's index last described (when that commit is
  there), and the index is set aside and rebuilt from the branch's tree. Damaged pack files are refused:
  Git objects exist nowhere else;
- the in-flight log: the tasks a killed supervisor left in it are charged by the recovery every start
  runs (``runtime.economy.recovery``; no bucket levels are written, as for an agent that is not
  configured: the next start restores the levels the ledger holds), then it is discarded.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import msgspec

from runtime.economy.buckets import Buckets
from runtime.economy.ledger import LedgerError
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger, replay_journal
from runtime.economy.ledger.open import ledger_fix
from runtime.economy.recovery import recover
from runtime.errors import RESTORE, Damaged
from runtime.host.lmdbfile import check_length
from runtime.pool.inflight import InflightLog
from runtime.world.events.log import EVENTS_FIX, EventLog
from runtime.world.store.git import BRANCH, HEAD_REF, GitStore


def _aside(path: Path) -> Path:
    """Move ``path`` out of the way (kept beside it for a post-mortem); return where it went."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    os.replace(path, aside)
    return aside


def repair_ledger(data: Path, say: Callable[[str], None]) -> LmdbLedger:
    """The ledger of ``data``, rebuilt from its journal when it does not open or does not agree with it."""
    path = data / "ledger"
    if not (path / "data.mdb").exists():
        raise Damaged(path / "data.mdb", "missing: there is no journal to rebuild it from", ledger_fix(data))
    why: str
    try:
        ledger = LmdbLedger(path)
    except lmdb.Error as exc:
        why = f"does not open ({type(exc).__name__}: {exc})"
    else:
        report = check(ledger, ledger.checkpoint())
        if report.ok:
            say(f"ledger: {report.journal_entries} journal entries, all invariants hold")
            return ledger
        ledger.close()
        why = "does not agree with its journal: " + "; ".join(report.problems[:3])
    rebuilt = path.with_name(f"{path.name}.rebuilding")
    shutil.rmtree(rebuilt, ignore_errors=True)
    try:
        n = replay_journal(path, rebuilt)
    except (lmdb.Error, LedgerError) as exc:
        raise Damaged(
            path / "data.mdb",
            f"{why}, and its journal cannot be replayed ({exc})",
            f"nothing rebuilds who holds what: {RESTORE}",
        ) from exc
    aside = _aside(path)
    os.replace(rebuilt, path)
    say(f"ledger: {why}; rebuilt from its {n} journal entries (the old one is in {aside})")
    return LmdbLedger(path)


def check_events(data: Path, say: Callable[[str], None]) -> EventLog:
    """The event log of ``data``, read whole; cursors past its end brought back to it."""
    path = data / "events"
    try:
        events = EventLog(path)
    except (lmdb.Error, AssertionError) as exc:
        raise Damaged(path / "data.mdb", f"damaged ({exc})", EVENTS_FIX) from exc
    last = events.last_seq()
    try:
        seen = sum(1 for _ in events.read(0))
    except (lmdb.Error, msgspec.DecodeError) as exc:
        events.close()
        raise Damaged(path / "data.mdb", f"an event does not read ({exc})", EVENTS_FIX) from exc
    for agent, seq in events.cursors().items():
        if seq > last:
            events.set_cursor(agent, last).result()
            say(f"events: {agent}'s cursor {seq} was past the last event {last}; set to it")
    say(f"events: {seen} events, seqs {events.archived() + 1}..{last}, every one readable")
    return events


def repair_store(data: Path, say: Callable[[str], None]) -> None:
    """``HEAD``, the branch ref and the index of the Git store rewritten or rebuilt (see the module docs)."""
    path = data / "artifacts.git"
    if not path.exists():
        say("store: none yet")
        return
    head = path / "HEAD"
    if not head.exists() or head.read_bytes() != HEAD_REF:
        _write(head, HEAD_REF)
        say(f"store: {head} rewritten")
    index = path.with_name(f"{path.name}.index")
    indexed = _indexed_head(index)
    ref = path / BRANCH.decode()
    if index.exists():
        say(f"store: its index set aside as {_aside(index)}, rebuilt from the branch")
    try:
        GitStore(path).close()  # checks HEAD, the ref and every pack; rebuilds the index
        return
    except Damaged as exc:
        if exc.path != ref:
            raise
        if indexed is None or (ref.exists() and ref.read_bytes().strip() == indexed):
            raise Damaged(ref, f"{exc.why}, and the store's index names no other commit", RESTORE) from exc
    _write(ref, indexed + b"\n")
    say(f"store: {ref} set back to {indexed.decode()}, the commit its index last described")
    GitStore(path).close()


def _write(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.repair")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _indexed_head(index: Path) -> bytes | None:
    """The commit the store's index describes (hex), if the index opens and knows one."""
    try:
        env = lmdb.open(str(index), readonly=True, lock=False, max_dbs=4)
    except lmdb.Error:
        return None
    try:
        check_length(env, index)
        with env.begin() as txn:
            head = txn.get(b"head", db=env.open_db(b"state", txn=txn, create=False))
    except lmdb.Error:
        return None
    finally:
        env.close()
    return bytes(head) if head is not None and re.fullmatch(rb"[0-9a-f]{40}", bytes(head)) else None


def repair(data: Path, say: Callable[[str], None]) -> None:
    """Repair ``data`` (see the module docstring), saying what was done. What cannot be rebuilt raises
    ``Damaged`` naming the file, after what could be was."""
    store_problem: Damaged | None = None
    try:
        repair_store(data, say)
    except Damaged as exc:  # the ledger, the events and the in-flight log are repaired all the same
        store_problem = exc
    ledger = repair_ledger(data, say)
    try:
        events = check_events(data, say)
    except Damaged:
        ledger.close()
        raise
    try:
        inflight_path = data / "run" / "inflight"
        if inflight_path.exists():
            inflight = InflightLog(inflight_path)
            try:
                charged = recover(inflight, ledger, Buckets(), events, say=say)
            finally:
                inflight.close()
            shutil.rmtree(inflight_path)
            say(f"in-flight log: {len(charged)} task(s) charged, then discarded")
    finally:
        events.close()
        ledger.close()
    if store_problem is not None:
        raise store_problem
