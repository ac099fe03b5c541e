"""The real PostgreSQL and Redis servers the scale-out tests use, and a fresh database per test.

``make test`` starts them when they are down (``scripts/ensure-services``). Each test that asks for
``pg_url`` gets a database of its own, created from nothing and dropped afterwards, so tests never
see each other's rows and may run in any order. ``Forwarder`` stands for a server that comes up late.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Forwarder:
    """A TCP forwarder from ``127.0.0.1:port`` to ``target``, listening only once ``open`` is called:
    a server that comes up late, as it does when a node is started before its servers."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        """Start accepting connections (and forwarding each to the target)."""
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._spawn(self._accept)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting; open connections end when either side closes."""
        self._stop.set()
        if self._server is not None:
            self._server.close()


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by ``127.0.0.1:port`` (its user and password kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"))


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
