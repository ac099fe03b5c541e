"""Reads from PostgreSQL on the event loop: a small set of psycopg 3 async connections per backend.

A node runs every agent on one asyncio loop, so a synchronous read there stops every agent for a
round trip (0.3–1.3 ms each on these hosts; about 90% of the loop's time in a profile of one node on
PostgreSQL before this module). ``AsyncReader.fetch`` awaits the server instead: other agents run
meanwhile, and the CPU the driver spends stays on the loop's thread, where the supervisor's metering
sees it.

Driver: psycopg 3's async API, not asyncpg. Measured on this host (``/tmp`` script, one indexed SELECT
of a few rows, 60 tasks over 10 connections, under a load average of 10): psycopg 223–252 µs of client
CPU per query, asyncpg 186–235 µs; sequential 243–273 µs against 267–438 µs. The difference is within
this host's noise, while asyncpg would add a second driver with its own parameter style and types next
to the psycopg the writers use. What decides the node's cost is how many reads it makes, not the
driver: the backends cache what is safe and batch the rest into single statements.

Every read is one autocommit statement: it runs in one snapshot of its own, so a read that needs a
consistent view of several tables is written as one statement (sub-selects), not several.

Connections are opened on first use, in the loop that uses them, up to ``size`` at once (callers
beyond that wait for one to come back). A connection the server dropped fails its query once and is
discarded; the read is then repeated on a fresh connection (reads are safe to repeat).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import psycopg

from runtime.host.postgres import DatabaseUnavailable, check_url, redact

Row = tuple[Any, ...]
_Conn = psycopg.AsyncConnection[Row]


class AsyncReader:
    """Up to ``size`` async connections to ``url`` for one backend's reads (see the module docstring).

    ``setup`` is SQL run once on each new connection (``SET default_transaction_read_only = on``, say);
    ``name`` is its ``application_name``. ``close`` is synchronous, so that a backend closes its reader
    from its own synchronous ``close``, whether or not a loop still runs.
    """

    def __init__(
        self, url: str, *, size: int = 4, name: str = "aeco-reader", setup: str = "", what: str = "POSTGRES_URL"
    ) -> None:
        check_url(url, what=what)
        if size < 1:
            raise ValueError(f"an async reader needs at least one connection, not {size}")
        self.url, self.size, self.name, self._setup, self._what = url, size, name, setup, what
        self._idle: list[_Conn] = []
        self._open = 0  # connections made and not discarded (idle or lent)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._closed = False
        #: Statements sent, for tests and benchmarks that count round trips.
        self.queries = 0

    async def fetch(self, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        """The rows of one statement, read without blocking the loop."""
        for attempt in (1, 2):
            conn = await self._take()
            try:
                self.queries += 1
                cur = await conn.execute(query, params)
                rows = await cur.fetchall()
            except psycopg.OperationalError:
                self._discard(conn)
                if attempt == 2 or self._closed:
                    raise
                continue
            except BaseException:
                # A statement error (or a cancellation mid-query) leaves the session unknown: start afresh.
                self._discard(conn)
                raise
            self._give_back(conn)
            return rows
        raise AssertionError("unreachable")

    async def _take(self) -> _Conn:
        if self._closed:
            raise DatabaseUnavailable(f"{self.name}: the reader of {redact(self.url)} is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Connections belong to the loop that made them: a reader used from a new loop (a test's
            # second asyncio.run) starts over rather than reuse sockets bound to a dead one.
            self._drop_all()
            self._loop = loop
        while True:
            if self._idle:
                return self._idle.pop()
            if self._open < self.size:
                self._open += 1
                try:
                    conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, application_name=self.name)
                    if self._setup:
                        await conn.execute(self._setup)
                except BaseException:
                    self._open -= 1
                    self._hand(None)
                    raise
                return conn
            # Every connection is lent out: wait for one to come back (or for a slot to free up: None).
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self._waiters.append(fut)
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._hand(fut.result())  # handed to us just as we gave up: pass it on
                raise
            if got is not None:
                return got

    def _hand(self, conn: _Conn | None) -> None:
        """Give a returned connection (or, with None, a freed slot) to the first waiter, else keep it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            self._idle.append(conn)

    def _give_back(self, conn: _Conn) -> None:
        if self._closed or conn.closed:
            self._discard(conn)
        else:
            self._hand(conn)

    def _discard(self, conn: _Conn) -> None:
        # Not below 0: a connection lent out before the reader moved to a new loop, or closed, was
        # already forgotten by ``_drop_all``.
        self._open = max(0, self._open - 1)
        _finish(conn)
        self._hand(None)

    def _drop_all(self) -> None:
        for conn in self._idle:
            _finish(conn)
        self._idle.clear()
        self._waiters.clear()
        self._open = 0

    def close(self) -> None:
        """Close every idle connection; one lent out is closed when it comes back."""
        self._closed = True
        self._drop_all()


def _finish(conn: _Conn) -> None:
    # ``AsyncConnection.close`` is a coroutine whose work is this one synchronous call (outside a pool):
    # calling it directly lets ``close`` run without a loop.
    if not conn.closed:
        conn.pgconn.finish()
