"""Connecting to the shared PostgreSQL server and migrating its schema, for every PostgreSQL backend.

Nodes of a scale-out deployment start together, often before the server is ready: a connection that
is *refused* (the server is down or still starting) is retried with exponential back-off up to a
deadline, while a connection that is *rejected* (unknown database or role, bad password, malformed URL)
fails at once, because waiting will not fix it. Either way the error names the URL without its
password and says what to do.

Schema migrations are numbered steps per component (``ledger``, ``store``, ``events``), recorded in
``aeco_migrations`` and applied under a transaction-level advisory lock, so several nodes starting at
once apply each step exactly once and none sees a half-made schema.

Writers that hold a lock other nodes wait for (the ledger's, the event log's head row) commit with
``commit_with_last``: the COMMIT travels with the transaction's last statements, one round trip.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from runtime.errors import Unavailable
from runtime.host.retry import GaveUp, reason, retry_transient

#: Connection failures that mean "not yet": the server is down, starting, or its name not resolvable yet.
_TRANSIENT = (
    "connection refused",
    "could not translate host name",
    "timeout expired",
    "no route to host",
    "server closed the connection unexpectedly",
    "no such file or directory",
)


class DatabaseUnavailable(Unavailable):
    """The PostgreSQL server could not be used; the message says which URL, why, and what to do."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str, *, what: str = "POSTGRES_URL") -> None:
    """Refuse a URL that is not a ``postgresql://`` URL, naming ``what`` it came from."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise DatabaseUnavailable(
            f"{what}={redact(url)!r} is not a PostgreSQL URL (expected postgresql://USER@HOST:PORT/DATABASE)"
        )


#: FATAL refusals that still mean "not yet" (SQLSTATE 57P03, cannot_connect_now): every other FATAL
#: (a wrong password, an unknown role or database) is the URL's fault and is not retried.
_NOT_YET = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
)


def _transient(exc: psycopg.OperationalError) -> bool:
    text = str(exc).lower()
    if any(words in text for words in _NOT_YET):
        return True
    return "fatal" not in text and any(word in text for word in _TRANSIENT)


def connect(
    url: str,
    *,
    what: str = "POSTGRES_URL",
    deadline_s: float = 30.0,
    first_backoff_s: float = 0.1,
    autocommit: bool = False,
    log: bool = True,
) -> psycopg.Connection[tuple[object, ...]]:
    """Open one connection to ``url``, retrying with back-off while the server is refusing connections.

    Raises ``DatabaseUnavailable`` at once for a malformed URL or a rejected login, and after
    ``deadline_s`` for a server that never came up.
    """
    check_url(url, what=what)

    def waiting(exc: psycopg.OperationalError) -> None:
        print(f"postgres: {redact(url)} not reachable yet ({reason(exc)}); retrying for up to {deadline_s:g} s")

    try:
        return retry_transient(
            lambda: psycopg.connect(url, autocommit=autocommit, connect_timeout=max(1, min(10, int(deadline_s)))),
            catch=psycopg.OperationalError,
            is_transient=_transient,
            deadline_s=deadline_s,
            first_backoff_s=first_backoff_s,
            on_first_failure=waiting if log else None,
        )
    except psycopg.ProgrammingError as exc:
        raise DatabaseUnavailable(f"{what}={redact(url)!r} is malformed: {exc}".strip()) from exc
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"{what}={redact(url)!r} was rejected by the server: {reason(exc)}. "
            "Check the database name, role and password in the URL."
        ) from exc
    except GaveUp as gave_up:
        raise DatabaseUnavailable(
            f"{what}={redact(url)!r}: no PostgreSQL server answered within {deadline_s:g} s "
            f"({gave_up.attempts} attempts; last: {reason(gave_up.last)}). Is the server running and reachable?"
        ) from gave_up.last


@contextlib.contextmanager
def commit_with_last(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction on the autocommit connection ``conn`` whose COMMIT is sent with the statements
    queued last, in one round trip (``Connection.transaction`` syncs the block before its COMMIT: a
    round trip more while the transaction holds its locks).

    The block runs in pipeline mode: a fetch, or an inner ``conn.pipeline()`` block, sends what is
    queued and waits; statements queued after the last one are sent with the COMMIT when the block
    ends, and their errors are raised then. Any exception rolls the transaction back (on a connection
    still usable).
    """
    try:
        with conn.pipeline() as pipeline:
            conn.execute("BEGIN")
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                # A statement failed (its error is what propagates) and aborted the rest: collect their
                # results here, or leaving the pipeline raises "pipeline aborted" again and psycopg logs a
                # warning for it (a conflicting optimistic ledger batch, retried at once, did so).
                with contextlib.suppress(psycopg.Error):
                    pipeline.sync()
                raise
    except BaseException:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``; the high word marks "ours" in pg_locks."""
    return (0x4145434F << 32 | zlib.crc32(name.encode())) - (1 << 63)


def migrate(conn: psycopg.Connection[tuple[object, ...]], component: str, steps: Sequence[str]) -> int:
    """Apply ``steps[v:]`` for ``component`` where ``v`` steps are already recorded; return the version.

    Each step is SQL (several statements allowed); all pending steps run in one transaction under an
    advisory lock, so concurrent callers serialise and each step is applied once. Steps are append-only:
    never edit one that has shipped, add a new one.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("aeco_migrations"),))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS aeco_migrations ("
            " component text NOT NULL, version integer NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (component, version))"
        )
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM aeco_migrations WHERE component = %s", (component,)
        ).fetchone()
        done = int(row[0]) if row else 0  # type: ignore[call-overload]
        if done > len(steps):
            raise DatabaseUnavailable(
                f"the database's {component} schema is at version {done}, newer than this code knows "
                f"({len(steps)}); upgrade this node"
            )
        for version, sql in enumerate(steps[done:], start=done + 1):
            conn.execute(sql)
            conn.execute("INSERT INTO aeco_migrations (component, version) VALUES (%s, %s)", (component, version))
    return len(steps)
