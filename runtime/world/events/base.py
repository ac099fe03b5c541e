"""What every event log backend shares: checking and queueing writes, the group-commit writer thread,
acknowledging a committed batch, notifiers, and waiters woken by commits.

A backend (``EventLog`` on LMDB, ``PostgresEventLog``) supplies the storage: ``_commit(batch)`` writes
one batch in one durable transaction and then calls ``_acknowledge`` (or ``_fail`` if nothing of it was
written); ``read``, ``cursor`` and ``last_seq`` read the committed state; ``_close_store`` releases the
storage once the writer has stopped.

Waiting costs nothing while nothing happens: a waiter is an ``asyncio.Event`` registered under its
agent; after each commit the writer thread matches the committed events against the registered
waiters and sets only the matching ones (``call_soon_threadsafe``, which wakes their loop through its
self-pipe). A woken waiter re-reads the log rather than trusting what woke it, so a spurious or remote
wake-up (``notice``) is harmless.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec

from runtime.errors import ErrorCode, storage_failure
from runtime.groupcommit import Delivery, GroupCommitter, Waiting
from runtime.world.events import MAX_FIELDS_BYTES, Event, EventError, Notifier

log = logging.getLogger("runtime.world.events")

_KIND_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_AGENT_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder(dict[str, Any])


class Append:
    """A queued event, not yet numbered."""

    __slots__ = ("agent", "fields", "fut", "kind")

    def __init__(self, kind: str, agent: str | None, fields: dict[str, Any], fut: Waiting[Event]) -> None:
        self.kind, self.agent, self.fields, self.fut = kind, agent, fields, fut


class SetCursor:
    """A queued cursor update."""

    __slots__ = ("agent", "fut", "seq")

    def __init__(self, agent: str, seq: int, fut: Waiting[int]) -> None:
        self.agent, self.seq, self.fut = agent, seq, fut


Item = Append | SetCursor
#: ``follower(events, local)``: told of events in seq order, ``local`` when this log committed them.
Follower = Callable[[Sequence[Event], bool], None]
#: What a commit decided for each cursor update of its batch: the seq written, or why it was refused.
CursorResults = list[tuple[Waiting[int], int | EventError]]


class _Waiter:
    """One ``wait`` in progress: what it waits for, and the flag that wakes it on its own loop."""

    __slots__ = ("agent", "asleep", "flag", "kinds", "loop", "since")

    def __init__(self, agent: str, kinds: frozenset[str] | None, since: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.agent, self.kinds, self.since = agent, kinds, since
        self.flag = asyncio.Event()
        #: It read the log, found nothing, and sleeps until its flag is set.
        self.asleep = False

    def wants(self, event: Event) -> bool:
        return event.seq > self.since and (self.kinds is None or event.kind in self.kinds)


def normalized(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` as plain JSON values, so that what a caller gets back now equals what is read back
    later and what observers print: tuples become lists, bytes base64 text, numeric keys strings."""
    try:
        raw = _json_enc.encode(fields)
    except (TypeError, ValueError) as exc:
        raise EventError("invalid", f"fields are not JSON-able: {exc}") from None
    if len(raw) > MAX_FIELDS_BYTES:
        raise EventError("invalid", f"fields take {len(raw)} bytes, more than {MAX_FIELDS_BYTES}")
    return _json_dec.decode(raw)


def _wanted(since: int, limit: int | None) -> bool:
    """Whether a read from ``since`` for at most ``limit`` events can find any (``since`` is checked)."""
    if not isinstance(since, int) or since < 0:
        raise ValueError(f"since must be an int >= 0, not {since!r}")
    return limit is None or limit > 0


class LogBase(GroupCommitter[Item]):
    """The backend-independent half of an event log (see the module docstring)."""

    #: A read-only log refuses writes with the code ``readonly`` instead of ``closed``.
    readonly: bool = False

    def __init__(self, *, notifiers: Iterable[Notifier], max_batch: int) -> None:
        self._notifiers: list[Notifier] = list(notifiers)
        self._followers: list[Follower] = []
        #: Events committed since this log was opened, per kind (replaced, never mutated, so that
        #: another thread can iterate it).
        self.counts: dict[str, int] = {}
        self._init_writer("events-writer", max_batch)
        self._waiters: dict[str, set[_Waiter]] = {}
        self._wlock = threading.Lock()  # guards _waiters: registered on loops, matched on the writer

    def attach(self, notifier: Notifier) -> None:
        """Tell ``notifier`` of every event committed from now on."""
        with self._lock:
            # Copy-on-write: the writer thread iterates the list it saw, without a lock.
            self._notifiers = [*self._notifiers, notifier]

    def follow(self, follower: Follower) -> None:
        """Tell ``follower`` of every event this node learns of from now on: those it commits (on the
        writer thread, right after the commit) and, with a relay, those other nodes commit (on the
        relay's thread, as ``heard``). Followers keep the node's caches true; they must be quick and
        must not raise."""
        with self._lock:
            self._followers = [*self._followers, follower]  # copy-on-write, as the notifiers

    def followed(self) -> bool:
        """Whether something follows the stream (a relay then reads other nodes' events even when no
        waiter would be woken by them)."""
        return bool(self._followers)

    def heard(self, events: Sequence[Event]) -> None:
        """Events another node committed (from a relay): the followers are told, then the waiters woken."""
        self._follow(events, local=False)
        self.notice(events)

    def _follow(self, events: Sequence[Event], *, local: bool) -> None:
        for follower in self._followers:
            try:
                follower(events, local)
            except Exception:
                log.exception("a follower failed on events %d..%d", events[0].seq, events[-1].seq)

    # ------------------------------------------------------------------------------------ writes

    def submit(self, kind: str, agent: str | None = None, fields: dict[str, Any] | None = None) -> Future[Event]:
        """Queue one event; the future gets it, numbered, once it is durable (or an ``EventError``).
        Never blocks: safe from the event loop, from threads, from synchronous callbacks."""
        fut: Future[Event] = Future()
        # Running from the start: a queued event cannot be withdrawn (cancelling the future, or an
        # asyncio wrapper of it, only stops the waiting), and the writer may always resolve it.
        fut.set_running_or_notify_cancel()
        self._queue_event(kind, agent, fields, fut)
        return fut

    def _queue_event(self, kind: str, agent: str | None, fields: dict[str, Any] | None, fut: Waiting[Event]) -> None:
        try:
            if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
                raise EventError("invalid", f"bad event kind {kind!r}")
            if agent is not None and (not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent)):
                raise EventError("invalid", f"bad agent id {agent!r}")
            clean = normalized(fields) if fields else {}
        except EventError as exc:
            fut.set_exception(exc)
            return
        self._queue_item(Append(kind, agent, clean, fut))

    def append(self, kind: str, agent: str | None = None, **fields: Any) -> Event:
        """Append one event and wait until it is durable. Blocks on the sync, so it refuses to run on
        an event loop's thread: use ``publish`` (or ``submit``) there."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop on this thread: blocking is fine (outside the handler, so failures chain nothing)
        else:
            raise RuntimeError(f"{type(self).__name__}.append would block the event loop; await publish() instead")
        return self.submit(kind, agent, fields).result()

    async def publish(self, kind: str, agent: str | None = None, **fields: Any) -> Event:
        """Append one event and return it once durable. By then the waiters it concerns have been
        woken and the notifiers (the observers' PUB socket) told. Cancelling it only stops the waiting."""
        return await self.submit_async(kind, agent, fields)

    def submit_async(
        self, kind: str, agent: str | None = None, fields: dict[str, Any] | None = None
    ) -> asyncio.Future[Event]:
        """``submit`` for code on an event loop (call it there): a future of that loop, resolved with the rest
        of its batch in one call on the loop. Cancelling it only stops the waiting."""
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._queue_event(kind, agent, fields, fut)
        return fut

    def set_cursor(self, agent: str, seq: int) -> Future[int]:
        """Queue an update of ``agent``'s cursor to ``seq`` (backwards is allowed: an agent may re-read);
        the future resolves with ``seq`` once durable, or with an ``EventError`` if ``seq`` is past the
        last event. Committed in order with the events queued before it."""
        fut: Future[int] = Future()
        fut.set_running_or_notify_cancel()
        self._queue_cursor(agent, seq, fut)
        return fut

    def set_cursor_async(self, agent: str, seq: int) -> asyncio.Future[int]:
        """``set_cursor`` for code on an event loop (call it there): a future of that loop."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue_cursor(agent, seq, fut)
        return fut

    def _queue_cursor(self, agent: str, seq: int, fut: Waiting[int]) -> None:
        if not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent):
            fut.set_exception(EventError("invalid", f"bad agent id {agent!r}"))
        elif not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 63:
            fut.set_exception(EventError("invalid", f"bad cursor {seq!r}"))
        else:
            self._queue_item(SetCursor(agent, seq, fut))

    def _queue_item(self, item: Item) -> None:
        if not self._enqueue(item):
            code: ErrorCode = "readonly" if self.readonly else "closed"
            item.fut.set_exception(EventError(code, f"the event log is {code}"))

    @staticmethod
    def _fail(batch: list[Item], exc: BaseException) -> None:
        """The transaction was aborted: nothing of the batch is written; every caller hears why."""
        err = storage_failure(exc, "the event log")
        delivery = Delivery()
        for it in batch:
            delivery.exception(it.fut, err)
        delivery.send()

    def _acknowledge(self, batch: list[Item], events: list[Event], cursors: CursorResults) -> None:
        """After the commit of ``batch``: tell everyone of its ``events`` (numbered, one per ``Append`` in
        order), then resolve the callers' futures."""
        if events:
            try:
                self._tell(events)
            except Exception:  # the batch is durable whatever went wrong downstream: acknowledge it
                log.exception("telling of events %d..%d failed", events[0].seq, events[-1].seq)
        delivery = Delivery()
        appends = (it for it in batch if isinstance(it, Append))
        for it, ev in zip(appends, events, strict=True):
            delivery.result(it.fut, ev)
        for fut, res in cursors:
            if isinstance(res, EventError):
                delivery.exception(fut, res)
            else:
                delivery.result(fut, res)
        delivery.send()

    def _tell(self, events: list[Event]) -> None:
        """Everything that hears of committed events, none of which may stop the writer."""
        counts = dict(self.counts)
        for ev in events:
            counts[ev.kind] = counts.get(ev.kind, 0) + 1
        self.counts = counts
        self._follow(events, local=True)
        self.notice(events)
        for notifier in self._notifiers:
            try:
                notifier.announce(events)
            except Exception:
                log.exception("notifier %r failed; events up to %d are durable regardless", notifier, events[-1].seq)

    def close(self) -> None:
        """Commit what is queued, stop the writer, wake every waiter (they return ``[]``) and close the
        store."""
        if not self._stop_writer():
            return
        with self._wlock:
            everyone = [w for group in self._waiters.values() for w in group]
        for w in everyone:
            self._fire(w)
        self._close_store()

    @abc.abstractmethod
    def _close_store(self) -> None:
        """Release the storage; the writer has stopped."""

    # ------------------------------------------------------------------------------------- reads

    def read(
        self,
        since: int = 0,
        *,
        kinds: Collection[str] | None = None,
        agent: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events with ``seq > since``, in order, of one of ``kinds`` (any if ``None``) and for ``agent``
        or for everyone (any agent if ``None``): those that pass ``concerns(event, kinds, agent)``; at
        most ``limit`` of them."""
        if not _wanted(since, limit):
            return []
        return self._read(since, kinds, agent, limit)

    @abc.abstractmethod
    def _read(self, since: int, kinds: Collection[str] | None, agent: str | None, limit: int | None) -> list[Event]:
        """``read`` on the committed state, its arguments checked."""

    @abc.abstractmethod
    def cursor(self, agent: str) -> int:
        """The agent's persisted cursor (0 if it never set one)."""

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The sequence number of the last durable event (0 for an empty log)."""

    @abc.abstractmethod
    def last_addressed(self, agent: str, kinds: Collection[str]) -> int:
        """The newest seq of an event of ``kinds`` for ``agent`` (or everyone)."""

    @abc.abstractmethod
    def archived(self) -> int:
        """The last seq ``archive`` moved out of the log (0: none)."""

    @abc.abstractmethod
    def archive(self, horizon: float, directory: Path) -> tuple[int, int, Path] | None:
        """Move the events committed before ``horizon`` (a UNIX time), except the last, into a file under
        ``directory`` and out of the log (``runtime.world.events.archive``); (first, last, file), or None
        when there was nothing to move."""

    # The reads for the event loop. Here they are the synchronous ones, right for a log whose reads are
    # local lookups (LMDB: microseconds); a backend whose reads cross a network overrides them.

    async def read_async(
        self,
        since: int = 0,
        *,
        kinds: Collection[str] | None = None,
        agent: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """``read``, for code on the event loop."""
        if not _wanted(since, limit):
            return []
        return await self._read_async(since, kinds, agent, limit)

    async def _read_async(
        self, since: int, kinds: Collection[str] | None, agent: str | None, limit: int | None
    ) -> list[Event]:
        return self._read(since, kinds, agent, limit)

    async def cursor_async(self, agent: str) -> int:
        """``cursor``, for code on the event loop."""
        return self.cursor(agent)

    async def last_seq_async(self) -> int:
        """``last_seq``, for code on the event loop."""
        return self.last_seq()

    async def last_addressed_async(self, agent: str, kinds: Collection[str]) -> int:
        """``last_addressed``, for code on the event loop."""
        return self.last_addressed(agent, kinds)

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
            since = await self.cursor_async(agent)
        waiter = _Waiter(agent, None if kinds is None else frozenset(kinds), since)
        # Registered before the first read: an event committed between the read and the sleep still
        # sets the flag, so it cannot be missed.
        with self._wlock:
            self._waiters.setdefault(agent, set()).add(waiter)
        try:
            deadline = None if timeout is None else waiter.loop.time() + max(timeout, 0.0)
            try:
                async with asyncio.timeout_at(deadline):
                    while not self.stopped:
                        found = await self.read_async(since, kinds=waiter.kinds, agent=agent, limit=limit)
                        if found:
                            return found
                        waiter.asleep = True
                        await waiter.flag.wait()
                        waiter.asleep = False
                        waiter.flag.clear()
            except TimeoutError:
                pass
            # At the deadline, one last look: an event that became durable just then is still news.
            return [] if self.stopped else await self.read_async(since, kinds=waiter.kinds, agent=agent, limit=limit)
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

    def sleeping(self) -> int:
        """How many ``wait`` calls have read the log, found nothing, and sleep until woken (a read on a
        shared log is awaited: a wait is registered before its first read is done)."""
        with self._wlock:
            return sum(w.asleep for g in self._waiters.values() for w in g)

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
