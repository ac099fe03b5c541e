"""The event log in PostgreSQL, shared by every node of a scale-out deployment.

Same contract as the LMDB ``EventLog`` (``runtime.world.events.Events``): one writer thread per node takes
every queued item it can, numbers the events, writes them and the cursor updates in one transaction,
and only after ``COMMIT`` (durable: ``synchronous_commit`` is on) wakes the local waiters, tells the
notifiers and resolves the callers' futures.

Sequence numbers are gapless across all nodes. A batch takes its seqs by incrementing a one-row
counter (``events_head``) in the same transaction that inserts the events:

- the ``UPDATE`` holds the row's lock until ``COMMIT``, so batches of different nodes are numbered
  one after the other, never interleaved;
- a batch that aborts rolls its increment back with its rows, so no number is ever skipped (a
  PostgreSQL ``SEQUENCE`` is not transactional: an aborted batch would leave a gap);
- the next batch can only take the lock once the previous one committed, so commit order is seq
  order and no reader ever sees seq N without every seq below it. This is what lets another node
  catch up by "everything after the last seq I saw" (``runtime.world.events.redis``) without missing an
  event that commits late, which a ``SEQUENCE`` (numbers handed out before commit) would allow.

The row also carries the last ``at``, so timestamps come from one clock (the server's) and never go
back along the sequence whichever node writes. The price is that batches of all nodes commit one
at a time; each batch holds the lock only for its inserts and its commit, and group commit makes
batches larger as load grows.

A node rides out a server restart or a dropped session: a batch whose connection turns out dead
before its ``COMMIT`` is written again on a new connection (nothing of it was written), and a read
is repeated once on another pooled connection. Only a connection lost *during* ``COMMIT`` fails its
callers, since the outcome is then unknown.

Local waiters are woken by local commits. Events committed by *other* nodes wake them only through a
notifier that hears of those events and calls ``heard`` (``runtime.world.events.redis.RedisRelay``).

Reads on the event loop (``read_async``, ``cursor_async``, ``last_addressed_async``, ``last_seq_async``)
await the server through ``runtime.host.pgasync``, one statement each, and two of them are answered
from memory when that is exact:

- an agent's cursor: its only writer is the node that runs the agent (``AGENT_RANGE``s do not overlap),
  so what this log last committed for it, or read of it, is its value;
- ``last_addressed``: the log follows every event it learns of (its own commits; with a relay, every
  other node's, ``relayed``) and keeps the newest seq per (agent, kind). The database is asked once per
  (agent, kinds) for what came before, and the answer is the larger of the two. Without a relay other
  nodes' events never reach this log, so every call asks the database.

Tables (prefix ``events_``): ``events_head`` (the counter), ``events_log`` (one row per event;
``agent`` is ``''`` for a broadcast so that it can be indexed and compared), ``events_cursors``,
``events_archived`` (the last seq ``archive`` moved out).

Retention (``archive``) moves the oldest events into files, as the LMDB log does
(``runtime.world.events.archive``): the file first, then the rows out a chunk per transaction with the
mark, while every node writes (a delete of old rows takes no lock a new batch needs).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg_pool import ConnectionPool

from runtime.host.pgasync import AsyncReader
from runtime.host.postgres import DatabaseUnavailable, commit_with_last, connect, migrate, redact
from runtime.world.events import ANY_KIND, Event, EventError, Notifier
from runtime.world.events import archive as archives
from runtime.world.events.base import Append, CursorResults, Item, LogBase

#: Schema steps for ``runtime.host.postgres.migrate``: append-only, never edit a step that has shipped.
STEPS: tuple[str, ...] = (
    """
    CREATE TABLE events_head (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        seq bigint NOT NULL,
        at double precision NOT NULL
    );
    INSERT INTO events_head (seq, at) VALUES (0, 0);
    CREATE TABLE events_log (
        seq bigint PRIMARY KEY,
        at double precision NOT NULL,
        kind text NOT NULL,
        agent text NOT NULL,
        fields json NOT NULL
    );
    CREATE INDEX events_log_agent_seq ON events_log (agent, seq);
    CREATE INDEX events_log_agent_kind_seq ON events_log (agent, kind, seq);
    CREATE TABLE events_cursors (
        agent text PRIMARY KEY,
        seq bigint NOT NULL
    );
    """,
    """
    CREATE TABLE events_archived (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        seq bigint NOT NULL
    );
    INSERT INTO events_archived (seq) VALUES (0);
    """,
)

_json_enc = msgspec.json.Encoder()
_fields_dec = msgspec.json.Decoder(dict[str, Any])

# Numbers a batch's events and inserts them in one statement: the head row's lock is taken by the
# UPDATE and held until COMMIT, so everything between them is kept to one more round trip (the COMMIT).
# ``%(n)s`` events take the seqs after the old head, in the order of the arrays (ordinality from 1).
_NUMBER_AND_INSERT = (
    "WITH h AS (UPDATE events_head SET seq = seq + %(n)s,"
    " at = greatest(at, extract(epoch FROM clock_timestamp())::float8) RETURNING seq, at),"
    " rows AS (INSERT INTO events_log (seq, at, kind, agent, fields)"
    " SELECT h.seq - %(n)s + z.i, h.at, z.kind, z.agent, z.fields::json"
    " FROM h, unnest(%(kinds)s::text[], %(agents)s::text[], %(fields)s::text[])"
    " WITH ORDINALITY AS z(kind, agent, fields, i))"
    " SELECT seq, at FROM h"
)
_SET_CURSOR = (
    "INSERT INTO events_cursors (agent, seq) VALUES (%s, %s) ON CONFLICT (agent) DO UPDATE SET seq = excluded.seq"
)
_COLUMNS = "SELECT seq, at, kind, agent, fields::text FROM events_log WHERE seq > %s"
# The newest event of one (agent, kind), or of one agent: one backward step down an index. Several are
# combined with greatest() (which skips NULLs): cheaper to plan and run than a join over arrays.
_NEWEST_OF_KIND = "(SELECT seq FROM events_log WHERE agent = %s AND kind = %s ORDER BY seq DESC LIMIT 1)"
_NEWEST = "(SELECT seq FROM events_log WHERE agent = %s ORDER BY seq DESC LIMIT 1)"
_CURSOR = "SELECT seq FROM events_cursors WHERE agent = %s"

Row = tuple[int, float, str, str, str]


def _event(row: Row) -> Event:
    seq, at, kind, agent, fields = row
    return Event(seq, at, kind, agent or None, _fields_dec.decode(fields))


class PostgresEventLog(LogBase):
    """The event log in the PostgreSQL database at ``url`` (see the module docstring).

    Connecting follows ``runtime.host.postgres.connect``: a server that is still starting is waited for up
    to ``deadline_s``, a rejected URL fails at once, and errors name the URL as ``what`` (without its
    password). ``durable=False`` turns off ``synchronous_commit`` for this node's writes (for tests of
    logic, never for real runs). ``readers`` bounds the pooled connections that serve reads.
    """

    def __init__(
        self,
        url: str,
        *,
        durable: bool = True,
        notifiers: Iterable[Notifier] = (),
        max_batch: int = 4096,
        readers: int = 4,
        async_readers: int = 4,
        what: str = "POSTGRES_URL",
        deadline_s: float = 30.0,
    ) -> None:
        super().__init__(notifiers=notifiers, max_batch=max_batch)
        self.url, self._what, self._deadline_s, self._durable = url, what, deadline_s, durable
        self.reader = AsyncReader(url, size=async_readers, name="aeco-events-reader", what=what)
        #: Set by a relay once every event another node commits reaches this log (``heard``).
        self.relayed = False
        self._cursor_cache: dict[str, int] = {}
        self._seen_lock = threading.Lock()  # the writer and the relay both update ``_latest``
        self._latest: dict[tuple[str, str], int] = {}
        #: seq -> at of every event this log is committing or committed and a relay has not passed yet:
        #: recorded before the COMMIT, so a relay that reads the log at any moment can tell them apart.
        self._own: dict[int, float] = {}
        self._before: dict[tuple[str, frozenset[str]], int] = {}
        self.follow(self._learn)
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = self._connect()
        self._committing = False  # the writer's current batch has reached its COMMIT
        # The writer connection proved the server is up: the pool only has to open its own.
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, readers),
            kwargs={"autocommit": True},
            name="events-readers",
            num_workers=1,
            open=False,
        )
        try:
            migrate(self._conn, "events", STEPS)
            try:
                self._pool.open(wait=True, timeout=deadline_s)
            except Exception as exc:
                self._pool.close()
                raise DatabaseUnavailable(f"{what}={redact(url)!r}: the event log's readers: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise
        #: The last seq when this log was opened: no waiter of this node has read anything before it.
        self.opened_seq = self.last_seq()
        self._start_writer()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = connect(self.url, what=self._what, deadline_s=self._deadline_s, autocommit=True)
        if not self._durable:
            conn.execute("SET synchronous_commit TO off")
        return conn

    # ------------------------------------------------------------------------------------ writes

    def _commit(self, batch: list[Item]) -> None:
        for attempt in (1, 2):
            try:
                events, cursors = self._write(batch)
            except psycopg.OperationalError as exc:
                if attempt == 1 and not self._committing and self._conn is not None and self._conn.broken:
                    # The connection died before COMMIT (the server restarted, or dropped an idle
                    # session): nothing was written, so the batch is tried once more on a new one.
                    continue
                self._fail(batch, exc)
                return
            except BaseException as exc:
                self._fail(batch, exc)
                return
            self._acknowledge(batch, events, cursors)
            return

    def _write(self, batch: list[Item]) -> tuple[list[Event], CursorResults]:
        """One attempt at ``batch`` in one transaction; ``_committing`` turns true once all that is left
        is the COMMIT (a failure from then on leaves the outcome unknown: never retried). Any
        exception rolls the counter back with the rows, so the numbers stay gapless."""
        self._committing = False
        if self._conn is None or self._conn.broken:
            self._conn = None
            self._conn = self._connect()
        conn = self._conn
        events: list[Event] = []
        cursors: CursorResults = []
        appended = [it for it in batch if isinstance(it, Append)]
        # The numbering statement takes the head row's lock, held until the COMMIT returns: the cursor
        # moves and the COMMIT share the round trip after it.
        with commit_with_last(conn):
            with conn.pipeline():  # synced on exit: BEGIN and the numbering in one round trip
                if appended:
                    numbered = conn.execute(
                        _NUMBER_AND_INSERT,
                        {
                            "n": len(appended),
                            "kinds": [it.kind for it in appended],
                            "agents": [it.agent or "" for it in appended],
                            "fields": [_json_enc.encode(it.fields).decode() for it in appended],
                        },
                    )
                else:
                    numbered = conn.execute("SELECT seq, 0::float8 FROM events_head")
            row = numbered.fetchone()
            assert row is not None, "invariant: events_head has its row"
            seq, at = int(row[0]) - len(appended), float(row[1])
            moves: list[tuple[str, int]] = []
            for item in batch:
                if isinstance(item, Append):
                    seq += 1
                    events.append(Event(seq, at, item.kind, item.agent, item.fields))
                elif item.seq > seq:
                    cursors.append((item.fut, EventError("cursor", f"{item.seq} is past the last event {seq}")))
                else:
                    moves.append((item.agent, item.seq))
                    cursors.append((item.fut, item.seq))
            # If the connection dies during the COMMIT the batch may be durable after all; its callers
            # hear of the failure, while other nodes (and this node's own relay catch-up) see it.
            # A batch that fails leaves its (seq, at) pairs behind: another node's events that later take
            # those seqs have another ``at``, so they are never mistaken for this node's.
            if self.relayed:  # only a relay asks (and forgets them as it passes)
                with self._seen_lock:
                    self._own.update((ev.seq, ev.at) for ev in events)
            self._committing = True
            # A failure from here on is one of the COMMIT's round trip: the outcome is unknown.
            if moves:
                with conn.cursor() as cur:
                    cur.executemany(_SET_CURSOR, moves)
        self._cursor_cache.update(moves)
        return events, cursors

    def _close_store(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._pool.close()
        self.reader.close()

    def own(self, event: Event) -> bool:
        """Whether this log committed ``event`` (for its relay: its own commits are not news)."""
        with self._seen_lock:
            return self._own.get(event.seq) == event.at

    def forget_own(self, upto: int) -> None:
        """The relay has passed ``upto``: nothing at or below it needs telling apart any more."""
        with self._seen_lock:
            for seq in [s for s in self._own if s <= upto]:
                del self._own[seq]

    def _learn(self, events: Sequence[Event], local: bool) -> None:
        """Follow the stream: the newest seq per (agent or everyone, kind), and per agent of any kind."""
        with self._seen_lock:
            latest = self._latest
            for ev in events:
                for key in ((ev.agent or "", ev.kind), (ev.agent or "", ANY_KIND)):
                    if latest.get(key, 0) < ev.seq:
                        latest[key] = ev.seq

    # ------------------------------------------------------------------------------------- reads

    def _fetch(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(query, params).fetchall()
        except psycopg.OperationalError:
            # A pooled connection the server dropped fails once (and the pool discards it); a read
            # can safely be repeated on another.
            with self._pool.connection() as conn:
                return conn.execute(query, params).fetchall()

    def last_seq(self) -> int:
        """The sequence number of the last durable event of any node (0 for an empty log)."""
        return int(self._fetch("SELECT seq FROM events_head", ())[0][0])

    def archived(self) -> int:
        """The last seq ``archive`` moved out of the log (0: none)."""
        return int(self._fetch("SELECT seq FROM events_archived", ())[0][0])

    def archive(self, horizon: float, directory: Path) -> tuple[int, int, Path] | None:
        """Move the events committed before ``horizon`` (a UNIX time), except the last event, to
        ``directory/events-FIRST-LAST.jsonl.gz`` and out of the log (``runtime.world.events.archive``);
        return (first, last, file), or None when there was nothing to move."""
        if (rest := archives.interrupted(directory, self.archived())) is not None:
            self._remove(self.archived() + 1, rest)
        first, last = self.archived() + 1, self.last_seq()
        rows = self._fetch(_COLUMNS + " AND seq < %s AND at < %s ORDER BY seq", (first - 1, last, horizon))
        if not rows:
            return None
        upto = first + len(rows) - 1
        assert rows[-1][0] == upto, f"invariant: the log's events {first}..{rows[-1][0]} have gaps"
        path = archives.write(directory, first, upto, [msgspec.json.encode(_event(r)) for r in rows])
        self._remove(first, upto)
        return first, upto, path

    def _remove(self, first: int, upto: int) -> None:
        """Delete events ``first..upto`` (archived) from the log, a chunk per transaction with the mark."""
        with connect(self.url, what=self._what, deadline_s=self._deadline_s, autocommit=True) as conn:
            for lo, hi in archives.chunks(first, upto):
                with conn.transaction():
                    conn.execute("DELETE FROM events_log WHERE seq BETWEEN %s AND %s", (lo, hi))
                    conn.execute("UPDATE events_archived SET seq = greatest(seq, %s)", (hi,))

    def _read(self, since: int, kinds: Collection[str] | None, agent: str | None, limit: int | None) -> list[Event]:
        query = _read_query(since, kinds, agent, limit)
        return [] if query is None else [_event(row) for row in self._fetch(*query)]

    def read_except(self, since: int, skip: Collection[str], limit: int) -> list[Event]:
        """The first ``limit`` events after ``since`` whose kind is not in ``skip``, in seq order."""
        rows = self._fetch(_COLUMNS + " AND kind <> ALL(%s) ORDER BY seq LIMIT %s", (since, list(skip), limit))
        return [_event(row) for row in rows]

    def last_addressed(self, agent: str, kinds: Collection[str]) -> int:
        """The newest seq, among events of ``kinds`` (``ANY_KIND`` for all) in the whole log, that
        concerns ``agent`` (addressed to it, or to everyone); 0 if none. One query whose cost does not
        grow with the log: one index step per (agent or everyone, kind)."""
        if not kinds:
            return 0
        return int(self._fetch(*_addressed_query(agent, kinds))[0][0])

    def cursor(self, agent: str) -> int:
        """The agent's persisted cursor (0 if it never set one)."""
        if agent in self._cursor_cache:
            return self._cursor_cache[agent]
        rows = self._fetch(_CURSOR, (agent,))
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------------ reads on the loop

    async def _read_async(
        self, since: int, kinds: Collection[str] | None, agent: str | None, limit: int | None
    ) -> list[Event]:
        query = _read_query(since, kinds, agent, limit)
        return [] if query is None else [_event(row) for row in await self.reader.fetch(*query)]

    async def cursor_async(self, agent: str) -> int:
        """The agent's cursor: what this node last committed or read for it (its only writer), else read."""
        if agent in self._cursor_cache:
            return self._cursor_cache[agent]
        rows = await self.reader.fetch(_CURSOR, (agent,))
        seq = int(rows[0][0]) if rows else 0
        # setdefault: a set_cursor committed while we read is newer than what we read.
        return self._cursor_cache.setdefault(agent, seq)

    async def last_seq_async(self) -> int:
        """``last_seq``, awaited."""
        return int((await self.reader.fetch("SELECT seq FROM events_head"))[0][0])

    async def last_addressed_async(self, agent: str, kinds: Collection[str]) -> int:
        """``last_addressed``: with a relay, the larger of what the stream brought and what the database
        held when first asked for (agent, kinds); without one, the database's answer every time."""
        if not kinds:
            return 0
        if not self.relayed:
            return await self._addressed_in_db(agent, kinds)
        key = (agent, frozenset(kinds))
        before = self._before.get(key)
        if before is None:
            before = self._before[key] = await self._addressed_in_db(agent, kinds)
        latest = self._latest
        wanted = (ANY_KIND,) if ANY_KIND in kinds else kinds
        streamed = max((max(latest.get((agent, k), 0), latest.get(("", k), 0)) for k in wanted), default=0)
        return max(before, streamed)

    async def _addressed_in_db(self, agent: str, kinds: Collection[str]) -> int:
        query, params = _addressed_query(agent, kinds)
        return int((await self.reader.fetch(query, params))[0][0])

    def cursors(self) -> dict[str, int]:
        """Every persisted cursor."""
        return {str(a): int(s) for a, s in self._fetch("SELECT agent, seq FROM events_cursors", ())}


def _read_query(
    since: int, kinds: Collection[str] | None, agent: str | None, limit: int | None
) -> tuple[str, tuple[Any, ...]] | None:
    """The statement ``read`` runs (its arguments checked), or None when it can find nothing."""
    if kinds is not None and not kinds:
        return None
    query = _COLUMNS
    params: list[Any] = [since]
    if kinds is not None:
        query += " AND kind = ANY(%s)"
        params.append(list(kinds))
    if agent is not None:
        query += " AND agent IN (%s, '')"
        params.append(agent)
    query += " ORDER BY seq"
    if limit is not None:
        query += " LIMIT %s"
        params.append(limit)
    return query, tuple(params)


def _addressed_query(agent: str, kinds: Collection[str]) -> tuple[str, tuple[Any, ...]]:
    """The statement of ``last_addressed`` (``kinds`` not empty)."""
    if ANY_KIND in kinds:
        parts, params = [_NEWEST, _NEWEST], [agent, ""]
    else:
        parts = [_NEWEST_OF_KIND] * (2 * len(kinds))
        params = [x for who in (agent, "") for kind in kinds for x in (who, kind)]
    return f"SELECT coalesce(greatest({', '.join(parts)}), 0)", tuple(params)
