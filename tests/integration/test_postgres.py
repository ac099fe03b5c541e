"""Connecting to PostgreSQL (retry while refused, fail fast when rejected) and concurrent migrations."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from runtime.host.postgres import DatabaseUnavailable, commit_with_last, connect, migrate, redact
from tests.harness import together
from tests.services import Forwarder, free_port, via


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://agent:s3cret@db:5432/eco") == "postgresql://agent:***@db:5432/eco"
    assert redact("postgresql://agent@db/eco") == "postgresql://agent@db/eco"


def test_a_url_of_another_scheme_is_refused_at_once() -> None:
    with pytest.raises(DatabaseUnavailable, match=r"POSTGRES_URL='mysql://x' is not a PostgreSQL URL"):
        connect("mysql://x")


def test_an_unknown_database_is_rejected_at_once_with_the_url(pg_url: str) -> None:
    bad = pg_url.rpartition("/")[0] + "/no_such_db_here"
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=r"rejected by the server.*no_such_db_here"):
        connect(bad, deadline_s=20)
    assert time.monotonic() - t0 < 5, "a rejected login must not be retried until the deadline"


def test_a_server_that_never_answers_fails_after_the_deadline_and_hides_the_password() -> None:
    url = f"postgresql://agent:hunter2@127.0.0.1:{free_port()}/eco"
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=r"no PostgreSQL server answered within 1 s") as info:
        connect(url, deadline_s=1.0, log=False)
    assert "hunter2" not in str(info.value) and ":***@" in str(info.value)
    assert 0.9 <= time.monotonic() - t0 < 10


def test_a_server_slow_to_come_up_is_waited_for(pg_url: str) -> None:
    """A forwarder that starts listening 1 s late stands for a server still starting."""
    target = urlsplit(pg_url)
    forwarder = Forwarder((target.hostname or "", target.port or 5432))
    opening = threading.Timer(1.0, forwarder.open)
    opening.start()
    try:
        t0 = time.monotonic()
        with connect(via(pg_url, forwarder.port), deadline_s=15, log=False) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - t0 >= 0.9
    finally:
        opening.cancel()
        opening.join()
        forwarder.close()


def test_concurrent_migrations_apply_each_step_once(pg_url: str) -> None:
    steps = [
        "CREATE TABLE t (x integer)",
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (2)",
    ]

    def node() -> None:
        with connect(pg_url) as conn:
            assert migrate(conn, "demo", steps) == 3

    errors = together(node, 6)
    assert not errors, errors
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
        versions = conn.execute("SELECT version FROM aeco_migrations WHERE component = 'demo' ORDER BY 1").fetchall()
        assert versions == [(1,), (2,), (3,)]
        # A later release adds a step; an older node then refuses a schema newer than it knows.
        assert migrate(conn, "demo", [*steps, "INSERT INTO t VALUES (3)"]) == 4
        with pytest.raises(DatabaseUnavailable, match="newer than this code knows"):
            migrate(conn, "demo", steps)


def test_commit_with_last_commits_the_block_or_nothing(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TEMPORARY TABLE t (k int PRIMARY KEY)")
        with commit_with_last(conn):
            with conn.pipeline():  # synced here, as a writer reads before it writes
                first = conn.execute("INSERT INTO t VALUES (1) RETURNING k")
            assert first.fetchone() == (1,)
            conn.execute("INSERT INTO t VALUES (2)")  # sent with the COMMIT
        assert conn.execute("SELECT k FROM t ORDER BY k").fetchall() == [(1,), (2,)]
        with pytest.raises(psycopg.errors.UniqueViolation), commit_with_last(conn):
            conn.execute("INSERT INTO t VALUES (3)")
            conn.execute("INSERT INTO t VALUES (1)")  # fails when the COMMIT is sent: nothing of the block stays
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT k FROM t ORDER BY k").fetchall() == [(1,), (2,)]
        with pytest.raises(RuntimeError), commit_with_last(conn):
            conn.execute("INSERT INTO t VALUES (4)")
            raise RuntimeError("the writer gave up")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
        # An error the server returned before the COMMIT was sent (psycopg raises it on sending): nothing
        # of the block stays, and the connection is left clean for the next transaction.
        with pytest.raises(psycopg.errors.DivisionByZero), commit_with_last(conn):
            conn.execute("INSERT INTO t VALUES (5)")
            conn.execute("SELECT 1/0")
            time.sleep(0.05)  # its error is back before the COMMIT is sent
        with commit_with_last(conn):
            conn.execute("INSERT INTO t VALUES (6)")
        assert conn.execute("SELECT k FROM t ORDER BY k").fetchall() == [(1,), (2,), (6,)]
