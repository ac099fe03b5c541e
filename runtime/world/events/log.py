"""The durable event log: one LMDB environment, one writer thread with group commit, waiters woken by
the commit.

Writers (``submit`` from any thread, ``publish`` from the event loop) only queue; one writer thread
takes every queued item it can (up to ``max_batch``), numbers the events, writes them and the cursor
updates in a single transaction, commits it durably (``fdatasync``) and only then, in this order:
wakes the waiters the new events concern, hands the events to the notifiers (the PUB socket), and
resolves each caller's future. Many events share one sync, and nobody — caller, waiter or observer —
learns of an event before it is on disk.

Checking and queueing writes, acknowledging a batch and waking waiters are shared with the PostgreSQL
backend (``runtime.world.events.base``).

Databases in the environment: ``log`` (seq as big-endian u64 -> msgpack ``Event``), ``cursors``
(agent -> seq as big-endian u64) and ``state`` (``archived``: the last seq moved out by ``archive``).

Retention moves old events out (``archive``): into a gzip'd JSON-lines file under the archive directory,
written and fsync'd before the events leave the log, a chunk per transaction (``runtime.world.events.archive``
says how a crash is recovered from). The log then starts after ``archived``; seqs keep counting from the
last event, which is never archived.
"""

from __future__ import annotations

import bisect
import contextlib
import struct
import time
from array import array
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from runtime.errors import RESTORE
from runtime.host.lmdbfile import check_length
from runtime.host.pace import pace
from runtime.world.events import ANY_KIND, Event, EventError, Notifier
from runtime.world.events import archive as archives
from runtime.world.events.base import Append, CursorResults, Item, LogBase

#: What to do about a damaged event log: it is the record of what happened, which nothing else holds.
EVENTS_FIX = f"the event log is the record of what happened and nothing rebuilds it: {RESTORE}"
_SEQ = struct.Struct(">Q")
_enc = msgspec.msgpack.Encoder()
_event_dec = msgspec.msgpack.Decoder(Event)


class _Head(msgspec.Struct):
    """The part of a stored event the filters look at; decoding it skips over ``fields``."""

    kind: str
    agent: str | None


_head_dec = msgspec.msgpack.Decoder(_Head)


class EventLog(LogBase):
    """The LMDB event log (see the module docstring). ``durable=False`` skips the sync (for tests of
    logic, never for real runs); ``readonly=True`` opens an existing log for reading only, from any
    process, alongside the one that writes (LMDB readers need no lock on the writer)."""

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        readonly: bool = False,
        notifiers: Iterable[Notifier] = (),
        max_batch: int = 4096,
        map_size: int = 1 << 34,
    ) -> None:
        super().__init__(notifiers=notifiers, max_batch=max_batch)
        #: Seqs of the events committed since this log was opened, per agent ("" for broadcasts): lets a
        #: read for one agent skip everyone else's events. Appended by the writer thread only.
        self._index: dict[str, array[int]] = {}
        #: The last seq ``archive`` moved out, which the writer thread drops from ``_index`` at its next
        #: batch (``_trimmed``: how far it has): a node that archives runs for days.
        self._archived_upto = 0
        self._trimmed = 0
        #: (agent or "" for broadcasts, kind) -> newest seq, written by the writer thread only.
        self._latest: dict[tuple[str, str], int] = {}
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=4,
            sync=durable,
            metasync=durable,
            max_readers=512,
            readonly=readonly,
        )
        try:
            check_length(self.env, path)
        except lmdb.Error:
            self.env.close()
            raise
        self._log = self.env.open_db(b"log", create=not readonly)
        self._cursors = self.env.open_db(b"cursors", create=not readonly)
        self._state: Any = None
        with contextlib.suppress(lmdb.NotFoundError):  # a read-only open of a log never archived
            self._state = self.env.open_db(b"state", create=not readonly)
        last = self.last_seq()
        with self.env.begin() as txn:
            entries = txn.stat(self._log)["entries"]
        archived = self.archived()
        # Keys are appended strictly in order from 1 (the first ``archived`` moved out), so a gap anywhere
        # shows up as a count mismatch.
        assert entries == last - archived, (
            f"invariant: the log holds {entries} events but its seqs run from {archived + 1} to {last}"
        )
        # A read-only log sees other processes' writes: it never indexes, and always scans.
        self._indexed_from = last if not readonly else 1 << 62
        self._indexed_to = last
        if not readonly:
            self._last_at = self.read(last - 1)[0].at if last else 0.0
            self._start_writer()

    def _commit(self, batch: list[Item]) -> None:
        events: list[Event] = []
        cursors: CursorResults = []
        try:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self._log)
                seq = _SEQ.unpack(cur.key())[0] if cur.last() else 0
                # One timestamp per batch, clamped so that ``at`` never decreases along the sequence.
                now = max(time.time(), self._last_at)
                for item in batch:
                    if isinstance(item, Append):
                        seq += 1
                        ev = Event(seq, now, item.kind, item.agent, item.fields)
                        fresh = txn.put(_SEQ.pack(seq), _enc.encode(ev), db=self._log, append=True, overwrite=False)
                        assert fresh, f"invariant: seq {seq} was already in the log"
                        events.append(ev)
                    elif item.seq > seq:
                        cursors.append((item.fut, EventError("cursor", f"{item.seq} is past the last event {seq}")))
                    else:
                        txn.put(item.agent.encode(), _SEQ.pack(item.seq), db=self._cursors)
                        cursors.append((item.fut, item.seq))
        except BaseException as exc:
            self._fail(batch, exc)
            return
        self._last_at = now
        self._acknowledge(batch, events, cursors)

    def _tell(self, events: list[Event]) -> None:
        # The index first: a waiter woken by these events reads them through it.
        latest = self._latest  # updated in place: one key at a time, each store atomic for readers
        for ev in events:
            latest[(ev.agent or "", ev.kind)] = latest[(ev.agent or "", ANY_KIND)] = ev.seq
            self._index.setdefault(ev.agent or "", array("Q")).append(ev.seq)
        self._indexed_to = events[-1].seq
        if (upto := self._archived_upto) > self._trimmed:
            self._trim_index(upto)
        super()._tell(events)

    def _trim_index(self, upto: int) -> None:
        """Drop seqs up to ``upto`` (archived) from the index, on the writer thread. Readers bisect an
        agent's array without a lock, so a trimmed array is replaced by a new one, never shifted in place;
        only this thread appends, so no append is lost."""
        for key, seqs in list(self._index.items()):
            if cut := bisect.bisect_right(seqs, upto):
                self._index[key] = seqs[cut:]
        self._trimmed = upto

    def last_addressed(self, agent: str, kinds: Collection[str]) -> int:
        """The newest seq, among events of ``kinds`` (``ANY_KIND`` for all) committed since this log was
        opened, that concerns ``agent`` (addressed to it, or to everyone); 0 if none. O(len(kinds)), for
        hot paths: it tells whether a ``read`` for the agent could find anything new."""
        latest = self._latest
        return max((max(latest.get((agent, k), 0), latest.get(("", k), 0)) for k in kinds), default=0)

    def _close_store(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------------------------- reads

    def last_seq(self) -> int:
        """The sequence number of the last durable event (0 for an empty log)."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._log)
            return int(_SEQ.unpack(cur.key())[0]) if cur.last() else 0

    def _read(self, since: int, kinds: Collection[str] | None, agent: str | None, limit: int | None) -> list[Event]:
        kset = None if kinds is None else frozenset(kinds)
        filtered = kset is not None or agent is not None
        out: list[Event] = []
        indexed_to = self._indexed_to
        if agent is not None and since >= self._indexed_from and indexed_to > since:
            # The agent's own index instead of a scan over everyone's events: O(its events).
            seqs = sorted(self._tail(agent, since, indexed_to) + self._tail("", since, indexed_to))
            with self.env.begin() as txn:
                for seq in seqs:
                    raw = txn.get(_SEQ.pack(seq), db=self._log)
                    if raw is None:  # archived since it was indexed
                        assert seq <= self.archived(), f"invariant: indexed event {seq} is in the log"
                        continue
                    if kset is not None and _head_dec.decode(raw).kind not in kset:
                        continue
                    out.append(_event_dec.decode(raw))
                    if limit is not None and len(out) >= limit:
                        return out
            since = indexed_to  # what was committed after the index was last updated: scanned below
            limit = None if limit is None else limit - len(out)
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._log)
            if not cur.set_range(_SEQ.pack(since + 1)):
                return out
            for raw in cur.iternext(keys=False, values=True):
                if filtered:
                    head = _head_dec.decode(raw)
                    if kset is not None and head.kind not in kset:
                        continue
                    if agent is not None and head.agent is not None and head.agent != agent:
                        continue
                out.append(_event_dec.decode(raw))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def _tail(self, key: str, since: int, upto: int) -> list[int]:
        seqs = self._index.get(key)
        if not seqs:
            return []
        return [s for s in seqs[bisect.bisect_right(seqs, since) :] if s <= upto]

    def archived(self) -> int:
        """The last seq ``archive`` moved out of the log (0: none)."""
        if self._state is None:
            return 0
        with self.env.begin() as txn:
            v = txn.get(b"archived", db=self._state)
        return int(_SEQ.unpack(v)[0]) if v is not None else 0

    def archive(self, horizon: float, directory: Path) -> tuple[int, int, Path] | None:
        """Move the events committed before ``horizon`` (a UNIX time), except the last event, to
        ``directory/events-FIRST-LAST.jsonl.gz`` (``runtime.world.events.archive``: the file first, then
        the events out of the log a chunk per transaction, which LMDB serialises with the writer's);
        return (first, last, file), or None when there was nothing to move. Readers asking for older
        seqs get what the log still holds; ``python -m runtime.events`` reads the files with any JSON
        tool."""
        assert not self.readonly, "invariant: archiving needs a writable log"
        if (rest := archives.interrupted(directory, self.archived())) is not None:
            self._remove(self.archived() + 1, rest)
        first = self.archived() + 1
        last = self.last_seq()
        moved: list[bytes] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._log)
            if cur.set_range(_SEQ.pack(first)):
                for k, raw in cur:
                    pace()  # a retention pass, beside the event loop (runtime.host.pace)
                    ev = _event_dec.decode(raw)
                    if _SEQ.unpack(k)[0] >= last or ev.at >= horizon:
                        break
                    moved.append(msgspec.json.encode(ev))
        if not moved:
            return None
        upto = first + len(moved) - 1
        path = archives.write(directory, first, upto, moved)
        self._remove(first, upto)
        self._archived_upto = upto
        return first, upto, path

    def _remove(self, first: int, upto: int) -> None:
        """Delete events ``first..upto`` (archived) from the log, one chunk per write transaction that
        also moves the ``archived`` mark."""
        for lo, hi in archives.chunks(first, upto):
            with self.env.begin(write=True) as txn:
                for seq in range(lo, hi + 1):
                    txn.delete(_SEQ.pack(seq), db=self._log)
                txn.put(b"archived", _SEQ.pack(hi), db=self._state)

    def cursor(self, agent: str) -> int:
        """The agent's persisted cursor (0 if it never set one)."""
        with self.env.begin() as txn:
            v = txn.get(agent.encode(), db=self._cursors)
            return int(_SEQ.unpack(v)[0]) if v is not None else 0

    def cursors(self) -> dict[str, int]:
        """Every persisted cursor."""
        with self.env.begin() as txn:
            return {bytes(k).decode(): int(_SEQ.unpack(v)[0]) for k, v in txn.cursor(db=self._cursors)}
