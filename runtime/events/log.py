"""The durable event log: one LMDB environment, one writer thread with group commit, waiters woken by
the commit.

Writers (``submit`` from any thread, ``publish`` from the event loop) only queue; one writer thread
takes every queued item it can (up to ``max_batch``), numbers the events, writes them and the cursor
updates in a single transaction, commits it durably (``fdatasync``) and only then, in this order:
wakes the waiters the new events concern, hands the events to the notifiers (the PUB socket), and
resolves each caller's future. Many events share one sync, and nobody — caller, waiter or observer —
learns of an event before it is on disk.

Waiting costs nothing while nothing happens: a waiter is an ``asyncio.Event`` registered under its
agent; the writer thread matches each committed event against the registered waiters and sets only
the matching ones (``call_soon_threadsafe``, which wakes their loop through its self-pipe). A woken
waiter re-reads the log rather than trusting what woke it, so a spurious or remote wake-up
(``notice``) is harmless.

Databases in the environment: ``log`` (seq as big-endian u64 -> msgpack ``Event``) and ``cursors``
(agent -> seq as big-endian u64).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import queue
import re
import struct
import threading
import time
from array import array
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import msgspec

from runtime.events import ANY_KIND, MAX_FIELDS_BYTES, ErrorCode, Event, EventError, Notifier
from runtime.groupcommit import serve_batches

if TYPE_CHECKING:
    from runtime.events import Events

log = logging.getLogger("runtime.events")

_SEQ = struct.Struct(">Q")
_KIND_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_AGENT_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_enc = msgspec.msgpack.Encoder()
_event_dec = msgspec.msgpack.Decoder(Event)
_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder(dict[str, Any])


class _Head(msgspec.Struct):
    """The part of a stored event the filters look at; decoding it skips over ``fields``."""

    kind: str
    agent: str | None


_head_dec = msgspec.msgpack.Decoder(_Head)


class _Append:
    __slots__ = ("agent", "fields", "fut", "kind")

    def __init__(self, kind: str, agent: str | None, fields: dict[str, Any], fut: Future[Event]) -> None:
        self.kind, self.agent, self.fields, self.fut = kind, agent, fields, fut


class _SetCursor:
    __slots__ = ("agent", "fut", "seq")

    def __init__(self, agent: str, seq: int, fut: Future[int]) -> None:
        self.agent, self.seq, self.fut = agent, seq, fut


_Item = _Append | _SetCursor


class _Waiter:
    """One ``wait`` in progress: what it waits for, and the flag that wakes it on its own loop."""

    __slots__ = ("agent", "flag", "kinds", "loop", "since")

    def __init__(self, agent: str, kinds: frozenset[str] | None, since: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.agent, self.kinds, self.since = agent, kinds, since
        self.flag = asyncio.Event()

    def wants(self, event: Event) -> bool:
        return event.seq > self.since and (self.kinds is None or event.kind in self.kinds)


def _normalized(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` as plain JSON values, so that what a caller gets back now equals what is read back
    later and what observers print: tuples become lists, bytes base64 text, numeric keys strings."""
    try:
        raw = _json_enc.encode(fields)
    except (TypeError, ValueError) as exc:
        raise EventError("invalid", f"fields are not JSON-able: {exc}") from None
    if len(raw) > MAX_FIELDS_BYTES:
        raise EventError("invalid", f"fields take {len(raw)} bytes, more than {MAX_FIELDS_BYTES}")
    return _json_dec.decode(raw)


class EventLog:
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
        #: Seqs of the events committed since this log was opened, per agent ("" for broadcasts): lets a
        #: read for one agent skip everyone else's events. Appended by the writer thread only.
        self._index: dict[str, array[int]] = {}
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
        self._log = self.env.open_db(b"log", create=not readonly)
        self._cursors = self.env.open_db(b"cursors", create=not readonly)
        last = self.last_seq()
        with self.env.begin() as txn:
            entries = txn.stat(self._log)["entries"]
        # Keys are appended strictly in order from 1, so a gap anywhere shows up as a count mismatch.
        assert entries == last, f"invariant: the log holds {entries} events but its last seq is {last}"
        self._notifiers: list[Notifier] = list(notifiers)
        #: Events committed since this log was opened, per kind (replaced, never mutated, so that
        #: another thread can iterate it).
        self.counts: dict[str, int] = {}
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit against close: nothing is queued after the stop
        self._accepting = not readonly
        self._shut = False
        self._waiters: dict[str, set[_Waiter]] = {}
        self._wlock = threading.Lock()  # guards _waiters: registered on loops, matched on the writer
        self._writer: threading.Thread | None = None
        # A read-only log sees other processes' writes: it never indexes, and always scans.
        self._indexed_from = last if not readonly else 1 << 62
        self._indexed_to = last
        if not readonly:
            self._last_at = self.read(last - 1)[0].at if last else 0.0
            self._writer = threading.Thread(target=self._write_loop, name="events-writer", daemon=True)
            self._writer.start()

    def attach(self, notifier: Notifier) -> None:
        """Tell ``notifier`` of every event committed from now on."""
        with self._lock:
            # Copy-on-write: the writer thread iterates the list it saw, without a lock.
            self._notifiers = [*self._notifiers, notifier]

    # ------------------------------------------------------------------------------------ writes

    def submit(self, kind: str, agent: str | None = None, fields: dict[str, Any] | None = None) -> Future[Event]:
        """Queue one event; the future gets it, numbered, once it is durable (or an ``EventError``).
        Never blocks: safe from the event loop, from threads, from synchronous callbacks."""
        fut: Future[Event] = Future()
        # Running from the start: a queued event cannot be withdrawn (cancelling the future, or an
        # asyncio wrapper of it, only stops the waiting), and the writer may always resolve it.
        fut.set_running_or_notify_cancel()
        try:
            if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
                raise EventError("invalid", f"bad event kind {kind!r}")
            if agent is not None and (not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent)):
                raise EventError("invalid", f"bad agent id {agent!r}")
            clean = _normalized(fields) if fields else {}
        except EventError as exc:
            fut.set_exception(exc)
            return fut
        self._enqueue(_Append(kind, agent, clean, fut))
        return fut

    def append(self, kind: str, agent: str | None = None, **fields: Any) -> Event:
        """Append one event and wait until it is durable. Blocks on the sync, so it refuses to run on
        an event loop's thread: use ``publish`` (or ``submit``) there."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.submit(kind, agent, fields).result()
        raise RuntimeError("EventLog.append would block the event loop; await publish() instead")

    async def publish(self, kind: str, agent: str | None = None, **fields: Any) -> Event:
        """Append one event and return it once durable. By then the waiters it concerns have been
        woken and the notifiers (the observers' PUB socket) told."""
        return await asyncio.wrap_future(self.submit(kind, agent, fields))

    def set_cursor(self, agent: str, seq: int) -> Future[int]:
        """Queue an update of ``agent``'s cursor to ``seq`` (backwards is allowed: an agent may re-read);
        the future resolves with ``seq`` once durable, or with an ``EventError`` if ``seq`` is past the
        last event. Committed in order with the events queued before it."""
        fut: Future[int] = Future()
        fut.set_running_or_notify_cancel()
        if not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent):
            fut.set_exception(EventError("invalid", f"bad agent id {agent!r}"))
        elif not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 63:
            fut.set_exception(EventError("invalid", f"bad cursor {seq!r}"))
        else:
            self._enqueue(_SetCursor(agent, seq, fut))
        return fut

    def _enqueue(self, item: _Item) -> None:
        with self._lock:
            if not self._accepting:
                code: ErrorCode = "readonly" if self.readonly else "closed"
                item.fut.set_exception(EventError(code, f"the event log is {code}"))
                return
            self._queue.put(item)

    def _write_loop(self) -> None:
        def commit(batch: list[_Item]) -> None:
            # Looked up per batch, not bound once: a test can hold the writer mid-stream.
            self._commit(batch)

        serve_batches(self._queue, self._max_batch, commit)

    def _commit(self, batch: list[_Item]) -> None:
        events: list[Event] = []
        cursors: list[tuple[Future[int], int | EventError]] = []
        try:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self._log)
                seq = _SEQ.unpack(cur.key())[0] if cur.last() else 0
                # One timestamp per batch, clamped so that ``at`` never decreases along the sequence.
                now = max(time.time(), self._last_at)
                for item in batch:
                    if isinstance(item, _Append):
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
        except BaseException as exc:  # the transaction was aborted: nothing of the batch is written
            err = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
            for it in batch:
                it.fut.set_exception(err)
            return
        self._last_at = now
        if events:
            try:
                self._tell(events)
            except Exception:  # the batch is durable whatever went wrong downstream: acknowledge it
                log.exception("telling of events %d..%d failed", events[0].seq, events[-1].seq)
        appends = (it for it in batch if isinstance(it, _Append))
        for it, ev in zip(appends, events, strict=True):
            it.fut.set_result(ev)
        for fut, res in cursors:
            if isinstance(res, EventError):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _tell(self, events: list[Event]) -> None:
        """Everything that hears of committed events, none of which may stop the writer."""
        counts = dict(self.counts)
        latest = self._latest  # updated in place: one key at a time, each store atomic for readers
        for ev in events:
            counts[ev.kind] = counts.get(ev.kind, 0) + 1
            latest[(ev.agent or "", ev.kind)] = latest[(ev.agent or "", ANY_KIND)] = ev.seq
            self._index.setdefault(ev.agent or "", array("Q")).append(ev.seq)
        self.counts = counts
        self._indexed_to = events[-1].seq
        self.notice(events)
        for notifier in self._notifiers:
            try:
                notifier.announce(events)
            except Exception:
                log.exception("notifier %r failed; events up to %d are durable regardless", notifier, events[-1].seq)

    def last_addressed(self, agent: str, kinds: Collection[str]) -> int:
        """The newest seq, among events of ``kinds`` (``ANY_KIND`` for all) committed since this log was
        opened, that concerns ``agent`` (addressed to it, or to everyone); 0 if none. O(len(kinds)), for
        hot paths: it tells whether a ``read`` for the agent could find anything new."""
        latest = self._latest
        return max((max(latest.get((agent, k), 0), latest.get(("", k), 0)) for k in kinds), default=0)

    def close(self) -> None:
        """Commit what is queued, stop the writer, wake every waiter (they return ``[]``) and close the
        environment."""
        with self._lock:
            if self._shut:
                return
            self._shut, self._accepting = True, False
            if self._writer is not None:
                self._queue.put(None)
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        with self._wlock:
            everyone = [w for group in self._waiters.values() for w in group]
        for w in everyone:
            self._fire(w)
        self.env.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- reads

    def last_seq(self) -> int:
        """The sequence number of the last durable event (0 for an empty log)."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._log)
            return int(_SEQ.unpack(cur.key())[0]) if cur.last() else 0

    def read(
        self,
        since: int = 0,
        *,
        kinds: Collection[str] | None = None,
        agent: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events with ``seq > since``, in order, of one of ``kinds`` (any if ``None``) and for ``agent``
        or for everyone (any agent if ``None``); at most ``limit`` of them."""
        if since < 0:
            raise ValueError(f"since must be >= 0, not {since}")
        if limit is not None and limit <= 0:
            return []
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
                    assert raw is not None, f"invariant: indexed event {seq} is in the log"
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

    def cursor(self, agent: str) -> int:
        """The agent's persisted cursor (0 if it never set one)."""
        with self.env.begin() as txn:
            v = txn.get(agent.encode(), db=self._cursors)
            return int(_SEQ.unpack(v)[0]) if v is not None else 0

    def cursors(self) -> dict[str, int]:
        """Every persisted cursor."""
        with self.env.begin() as txn:
            return {bytes(k).decode(): int(_SEQ.unpack(v)[0]) for k, v in txn.cursor(db=self._cursors)}

    # ----------------------------------------------------------------------------------- waiting

    async def wait(
        self,
        agent: str,
        *,
        kinds: Collection[str] | None = None,
        since: int | None = None,
        timeout: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """The events for ``agent`` or for everyone, of one of ``kinds`` (any if ``None``), after
        ``since`` (default: the agent's cursor), as soon as at least one is durable — at once if one
        already is. ``[]`` if none arrived within ``timeout`` seconds (``None``: no limit) or the log
        closed. The cursor is not moved: the agent moves it (``set_cursor``) once it has dealt with
        the events, so an event is seen at least once even across a crash."""
        if since is None:
            since = self.cursor(agent)
        waiter = _Waiter(agent, None if kinds is None else frozenset(kinds), since)
        # Registered before the first read: an event committed between the read and the sleep still
        # sets the flag, so it cannot be missed.
        with self._wlock:
            self._waiters.setdefault(agent, set()).add(waiter)
        try:
            deadline = None if timeout is None else waiter.loop.time() + max(timeout, 0.0)
            try:
                async with asyncio.timeout_at(deadline):
                    while not self._shut:
                        found = self.read(since, kinds=waiter.kinds, agent=agent, limit=limit)
                        if found:
                            return found
                        await waiter.flag.wait()
                        waiter.flag.clear()
            except TimeoutError:
                pass
            # At the deadline, one last look: an event that became durable just then is still news.
            return [] if self._shut else self.read(since, kinds=waiter.kinds, agent=agent, limit=limit)
        finally:
            with self._wlock:
                group = self._waiters.get(agent)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._waiters[agent]

    def waiting(self) -> int:
        """How many ``wait`` calls are in progress."""
        with self._wlock:
            return sum(len(g) for g in self._waiters.values())

    def notice(self, events: Sequence[Event]) -> None:
        """Wake the waiters these events concern. Called by the writer after each commit, and by a
        notifier that hears of events committed elsewhere (another node). Thread-safe and cheap; the
        woken waiters re-read the log, so an event that is not (yet) in it only costs a look."""
        due: set[_Waiter] = set()
        with self._wlock:
            if not self._waiters:
                return
            for ev in events:
                if ev.agent is None:  # a broadcast concerns every waiter
                    groups: Iterable[set[_Waiter]] = self._waiters.values()
                else:
                    own = self._waiters.get(ev.agent)
                    groups = (own,) if own else ()
                for group in groups:
                    due.update(w for w in group if w.wants(ev))
        for w in due:
            self._fire(w)

    @staticmethod
    def _fire(w: _Waiter) -> None:
        # A closed loop refuses the call: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            w.loop.call_soon_threadsafe(w.flag.set)


if TYPE_CHECKING:

    def _conforms(events: EventLog) -> Events:
        """The class satisfies the interface (checked by mypy)."""
        return events
