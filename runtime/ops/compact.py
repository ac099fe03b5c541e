"""Retention: ``python -m runtime.admin compact [--horizon WHEN]`` on a stopped data directory, and the
``retention:`` section that runs the same compaction periodically inside the supervisor; ``admin compact
--postgres URL`` does the ledger's and the events' part for a PostgreSQL deployment, while its nodes run.

One pass, with a *horizon* (a time; what is older goes):

- the artifact store's history older than the horizon is squashed into one commit per artifact
  (``GitStore.compact``: HEAD's tree is unchanged, agents never see history either way);
- the ledger's journal entries older than it are folded into its checkpoint (``LmdbLedger.compact``),
  which ``admin check`` replays the rest of the journal from;
- the events older than it are archived to ``<data>/archive/events-FIRST-LAST.jsonl.gz``
  (``EventLog.archive``), and the oldest archives beyond ``archive_max_mb`` are deleted; an operator's
  pause still in force among them is first carried forward as a new ``agent_paused`` event
  (``runtime.world.events.controls``), so that a restart still finds it in the log.
- (``admin compact`` on a stopped data directory) the LMDB files mostly free after that are rewritten at
  the size of what they hold (``runtime.host.lmdbfile.shrink``). A running supervisor's stay at their
  largest, their freed pages reused by the next writes: with a pass every ``interval_s``, that is about
  ``horizon_s + interval_s`` of live data.

With PostgreSQL the journal is folded into ``ledger_checkpoint`` and the events archived under a data
directory, once for all nodes: by the node whose ``retention:`` says ``shared`` (into its data
directory, every ``interval_s``) or by ``admin compact --postgres`` (into ``--data-dir``); one such pass
at a time (an advisory lock; a node's pass that finds another running skips the shared stores, the
command is refused). The store's history stays.

Each step is crash-safe on its own (its store's docstring says how) and they are independent: a pass a
crash interrupted leaves every store in its old or its new state, and the next pass finishes the work.

Safety while the supervisor runs, and no pause: the heavy work is done beside the writers, not in them.
The store's squash is built in the retention thread from a frozen HEAD, and only its swap (re-parenting
the commits made meanwhile, moving the branch) is queued to the store's writer, between two group
commits; the ledger's fold replays its chunks in read transactions and deletes each in one short write
transaction, and the events leave the log a chunk per transaction, which LMDB serialises with the
writers' own. Agents' writes wait for one swap or one chunk at most, never for the pass.

``admin compact`` itself takes the data directory's lock, so it is refused while a supervisor holds it
(use ``retention:`` then), and it refuses to fold the journal while the in-flight store holds tasks a
crash interrupted (their charge would no longer be recognised as a replay once folded: a start charges
them first).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import Struct

from runtime.config import ConfigError, RetentionConfig
from runtime.economy.ledger import Ledger
from runtime.economy.ledger.checkpoint import LedgerCompaction
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.errors import AecoError, ErrorCode
from runtime.host.lmdbfile import shrink
from runtime.host.pace import pacing
from runtime.host.postgres import DatabaseUnavailable, connect, lock_key
from runtime.host.volume import tree_bytes
from runtime.ops.bill import parse_since
from runtime.ops.preflight import claim_data_dir
from runtime.pool.inflight import InflightLog
from runtime.world.events import Events
from runtime.world.events.controls import carry_pauses
from runtime.world.events.log import EventLog
from runtime.world.store import Store
from runtime.world.store.git import GitStore, HistoryCompaction

if TYPE_CHECKING:
    from runtime.economy.ledger.postgres import PostgresLedger
    from runtime.world.events.postgres import PostgresEventLog

log = logging.getLogger("runtime.ops.compact")

ARCHIVE_DIR = "archive"
#: The share of the interpreter's time a pass of ``retention:`` computes at most (``runtime.host.pace``): the
#: rest is the event loop's, whose agents' actions would otherwise all but stop for the pass.
PASS_SHARE = 0.25
#: The LMDB environments ``admin compact`` rewrites smaller when mostly free (``runtime.host.lmdbfile.shrink``).
SHRUNK = ("ledger", "events", "artifacts.git.index")


class ArchivedEvents(Struct, frozen=True):
    """The events one pass moved out of the log, and the file that holds them."""

    first: int
    last: int
    file: str


class CompactReport(Struct, frozen=True):
    """What one pass did (None: that store is not one retention compacts, or nothing was moved)."""

    horizon: float
    history: HistoryCompaction | None
    ledger: LedgerCompaction | None
    events: ArchivedEvents | None
    archives_removed: list[str]
    seconds: float
    #: LMDB files rewritten smaller (``admin compact`` on a stopped data directory): name -> (before, after).
    shrunk: dict[str, tuple[int, int]] = {}

    def line(self) -> str:
        """One line for the operator."""
        parts = []
        if (h := self.history) is not None and h.squashed:
            parts.append(
                f"store: {h.squashed} commits squashed into {h.artifacts} + 1, {h.kept} kept, packs "
                f"{h.pack_bytes_before / 1024:.0f} -> {h.pack_bytes_after / 1024:.0f} KB"
            )
        if (g := self.ledger) is not None and g.folded:
            parts.append(f"ledger: {g.folded} journal entries folded (checkpoint at seq {g.through})")
        if (e := self.events) is not None:
            parts.append(f"events: {e.first}..{e.last} archived to {e.file}")
        if self.archives_removed:
            parts.append(f"{len(self.archives_removed)} old archive(s) removed")
        for name, (before, after) in self.shrunk.items():
            parts.append(f"{name} file {before / (1 << 20):.1f} -> {after / (1 << 20):.1f} MiB")
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.horizon))
        return f"compacted before {when} in {self.seconds:.1f} s: " + ("; ".join(parts) or "nothing to do")


def prune_archives(directory: Path, max_bytes: int) -> list[str]:
    """Delete the oldest archive files until the rest fit in ``max_bytes``; the names deleted."""
    files = sorted(directory.glob("events-*.jsonl.gz"))  # zero-padded first seqs: oldest first
    total = sum(f.stat().st_size for f in files)
    removed = []
    for f in files:
        if total <= max_bytes:
            break
        total -= f.stat().st_size
        f.unlink()
        removed.append(f.name)
    return removed


def _archive_events(
    events: Events, horizon: float, archive: Path, archive_max_bytes: int
) -> tuple[ArchivedEvents | None, list[str]]:
    """Archive the events older than ``horizon`` (a pause still in force carried forward first: the log
    alone says who is paused, archived or not), then prune the archive to its budget."""
    carry_pauses(events, horizon)
    moved = events.archive(horizon, archive)
    archived = ArchivedEvents(moved[0], moved[1], moved[2].name) if moved is not None else None
    return archived, prune_archives(archive, archive_max_bytes) if archive.is_dir() else []


def compact_stores(
    store: Store,
    ledger: Ledger,
    events: Events,
    horizon: float,
    archive: Path,
    archive_max_bytes: int,
    *,
    shared: bool = False,
) -> CompactReport:
    """One pass over the stores a node has open (see the module docstring): its embedded ones, and with
    ``shared`` a PostgreSQL ledger and event log (``compact_shared``: skipped while another node's pass
    holds them). Without ``shared`` a node on PostgreSQL leaves them to the node that has it, or to
    ``admin compact --postgres``: one pass for every node, not one per node."""
    started = time.monotonic()
    history = store.compact(horizon) if isinstance(store, GitStore) else None
    folded: LedgerCompaction | None = None
    archived: ArchivedEvents | None = None
    removed: list[str] = []
    if isinstance(ledger, LmdbLedger) and isinstance(events, EventLog):
        folded = ledger.compact(horizon)
        archived, removed = _archive_events(events, horizon, archive, archive_max_bytes)
    elif shared:
        from runtime.economy.ledger.postgres import PostgresLedger
        from runtime.world.events.postgres import PostgresEventLog

        if isinstance(ledger, PostgresLedger) and isinstance(events, PostgresEventLog):
            done = compact_shared(ledger, events, horizon, archive, archive_max_bytes)
            if done is not None:
                folded, archived, removed = done
    return CompactReport(horizon, history, folded, archived, removed, time.monotonic() - started)


#: The advisory lock a pass over the shared ledger and events holds (``compact_shared``).
SHARED_LOCK = lock_key("retention-shared")


def compact_shared(
    ledger: PostgresLedger, events: PostgresEventLog, horizon: float, archive: Path, archive_max_bytes: int
) -> tuple[LedgerCompaction, ArchivedEvents | None, list[str]] | None:
    """Fold the shared journal and archive the shared events under ``archive``, while nodes run; None,
    doing nothing, when another pass holds them (``SHARED_LOCK``, a session lock: a node's ``retention:``
    or ``admin compact --postgres``). The fold's chunks are safe against another fold anyway (each
    checks the checkpoint it started from); the lock keeps two passes from archiving the same events
    into two data directories."""
    with connect(events.url, deadline_s=30.0, autocommit=True, log=False) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (SHARED_LOCK,)).fetchone()
        if not (row and row[0]):
            return None
        # Closing the session releases the lock, also when the pass fails.
        folded = ledger.compact(horizon)
        archived, removed = _archive_events(events, horizon, archive, archive_max_bytes)
        return folded, archived, removed


def compact_postgres(url: str, archive: Path, horizon: float, archive_max_bytes: int) -> CompactReport:
    """One pass over the PostgreSQL ledger and event log, while nodes run: the journal folded into its
    checkpoint, old events archived under ``archive``. The store's history is not compacted (its
    commits are rows an operator's ``history``/``rollback`` read; they stay). ``CompactRefused`` while
    a node's pass holds them."""
    from runtime.economy.ledger.postgres import PostgresLedger
    from runtime.world.events.postgres import PostgresEventLog

    started = time.monotonic()
    ledger = PostgresLedger(url)
    try:
        events = PostgresEventLog(url)
        try:
            done = compact_shared(ledger, events, horizon, archive, archive_max_bytes)
        finally:
            events.close()
    finally:
        ledger.close()
    if done is None:
        raise CompactRefused("a node's retention pass is compacting the shared ledger and events (retry later)")
    folded, archived, removed = done
    return CompactReport(horizon, None, folded, archived, removed, time.monotonic() - started)


class CompactRefused(AecoError):
    """The data directory cannot be compacted now; the message says why and what to do."""

    default_code: ErrorCode = "busy"


def compact_data_dir(data: Path, horizon: float, archive_max_bytes: int) -> CompactReport:
    """One pass over a stopped data directory's stores. ``CompactRefused`` when a supervisor holds it
    or tasks a crash interrupted are not charged yet."""
    if not (data / "ledger" / "data.mdb").exists() or not (data / "artifacts.git" / "HEAD").exists():
        raise CompactRefused(f"{data}: no ledger and artifact store there (has a supervisor run with it?)")
    try:
        claim = claim_data_dir(data)
    except ConfigError as exc:
        raise CompactRefused(str(exc)) from None
    try:
        inflight_path = data / "run" / "inflight"
        if (inflight_path / "data.mdb").exists():
            inflight = InflightLog(inflight_path, readonly=True)
            try:
                pending = len(inflight.pending())
            finally:
                inflight.close()
            if pending:
                raise CompactRefused(
                    f"{data}: {pending} task(s) a crash interrupted are not charged yet "
                    "(start the supervisor once to charge them, then compact)"
                )
        ledger = LmdbLedger(data / "ledger")
        store = GitStore(data / "artifacts.git")
        events = EventLog(data / "events")
        try:
            report = compact_stores(store, ledger, events, horizon, data / ARCHIVE_DIR, archive_max_bytes)
        finally:
            events.close()
            store.close()
            ledger.close()
        # Closed, and the directory is ours: the LMDB files can be rewritten at the size of what they hold.
        shrunk = {name: done for name in SHRUNK if (done := shrink(data / name)) is not None}
        return msgspec.structs.replace(report, shrunk=shrunk)
    finally:
        os.close(claim)


async def retain(
    cfg: RetentionConfig,
    store: Store,
    ledger: Ledger,
    events: Events,
    data: Path,
    stop: asyncio.Event,
    say: Callable[[str], None],
) -> None:
    """The supervisor's retention: a pass every ``interval_s`` (the first after one interval), each in a
    thread of its own (``retention``: its CPU is that named overhead) so the event loop runs on; until
    ``stop`` is set. A failed pass is logged and retried."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retention") as thread:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), cfg.interval_s)
                return
            except TimeoutError:
                pass
            horizon = time.time() - cfg.horizon_s
            try:
                report = await loop.run_in_executor(
                    thread,
                    functools.partial(
                        _paced_pass,
                        store,
                        ledger,
                        events,
                        horizon,
                        data / ARCHIVE_DIR,
                        cfg.archive_max_mb << 20,
                        shared=cfg.shared,
                    ),
                )
            except Exception:
                log.exception("retention pass failed; retried in %g s", cfg.interval_s)
                continue
            say(f"retention: {report.line()}; data dir now {tree_bytes(data) / (1 << 20):.1f} MiB")


def _paced_pass(*args: Any, **kwargs: Any) -> CompactReport:
    """``compact_stores`` on the retention thread, paced to ``PASS_SHARE`` of the interpreter's time
    (``runtime.host.pace``: beside a thread that computes, the event loop waits for the GIL at each of
    its system calls)."""
    with pacing(PASS_SHARE):
        return compact_stores(*args, **kwargs)


#: The newest horizon ``admin compact --postgres`` takes: nodes may be running, and an op they retry
#: (within seconds) must still be recognised as a replay, so nothing younger than this is folded.
PG_MIN_AGE_S = 60.0


def command(data: Path, horizon: str, archive_max_mb: int, postgres_url: str | None) -> int:
    """``admin compact``: one pass over a stopped data directory, or over the PostgreSQL ledger and events
    with ``postgres_url``; its line, or one ``error:`` line."""
    try:
        when = parse_since(horizon, time.time(), "--horizon")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if archive_max_mb < 0:
        print(f"error: --archive-max-mb {archive_max_mb}: negative (give 0 or more MiB)", file=sys.stderr)
        return 2
    if postgres_url:
        if when > time.time() - PG_MIN_AGE_S:
            print(
                f"error: --horizon {horizon}: less than {PG_MIN_AGE_S:g} s ago (nodes may be running and retry "
                f"recent ops: give {PG_MIN_AGE_S:g}s or more)",
                file=sys.stderr,
            )
            return 2
        try:
            report = compact_postgres(postgres_url, data / ARCHIVE_DIR, when, archive_max_mb << 20)
        except DatabaseUnavailable as exc:
            print(f"error: compact: {exc}", file=sys.stderr)
            return 1
        except CompactRefused as exc:
            print(f"error: compact: {exc.message}", file=sys.stderr)
            return 1
        print(report.line())
        return 0
    try:
        report = compact_data_dir(data, min(when, time.time()), archive_max_mb << 20)
    except CompactRefused as exc:
        print(f"error: compact: {exc.message}", file=sys.stderr)
        return 1
    print(report.line())
    return 0
