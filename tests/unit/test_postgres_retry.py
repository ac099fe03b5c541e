"""Which refusals of a PostgreSQL connection are worth another try: "not yet", never a wrong URL."""

from __future__ import annotations

import psycopg
import pytest

from runtime.host.postgres import _transient

SEEN = {
    # a server still starting (compose starts nodes as soon as its container runs): retried
    'connection failed: connection to server at "10.89.0.2", port 5432 failed: FATAL:  the database system '
    "is starting up": True,
    'connection failed: connection to server at "db", port 5432 failed: FATAL:  the database system is '
    "shutting down": True,
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused': True,
    'connection failed: could not translate host name "postgres" to address': True,
    # the URL's own fault: said at once
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password '
    'authentication failed for user "aeco"': False,
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "nope" does '
    "not exist": False,
}


@pytest.mark.parametrize("message", sorted(SEEN))
def test_only_not_yet_is_retried(message: str) -> None:
    assert _transient(psycopg.OperationalError(message)) is SEEN[message]
