"""The real PostgreSQL and Redis servers the scale-out tests use, and a fresh database per test.

``make test`` starts them when they are down (``scripts/ensure-services``). Each test that asks for
``pg_url`` gets a database of its own, created from nothing and dropped afterwards, so tests never
see each other's rows and may run in any order.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

#: The server's administrative URL; override with AECO_TEST_POSTGRES (a role allowed to create databases).
ADMIN_URL = os.environ.get("AECO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AECO_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def create_database(name: str | None = None, *, exist_ok: bool = False) -> str:
    """Create an empty database (a fresh random name unless ``name`` is given) and return its URL (as the
    administrative role). With ``exist_ok``, a database of that name already there is simply reused."""
    name = name or f"aeco_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            # UniqueViolation: another session created the same name at the same moment.
            if not exist_ok:
                raise
    return _with_db(ADMIN_URL, name)


def drop_database(url: str) -> None:
    """Drop a database made by ``create_database``, closing whatever still connects to it."""
    name = url.rpartition("/")[2]
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped afterwards)."""
    try:
        url = create_database()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {ADMIN_URL} is not usable ({exc}); run scripts/ensure-services")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The Redis server, checked to answer; the test's keys and channels should carry a unique prefix."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not usable ({exc}); run scripts/ensure-services")
    finally:
        client.close()
    yield REDIS_URL
