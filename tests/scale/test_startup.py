"""A node's start-up against PostgreSQL and Redis: clear failures, patience with slow servers.

A node whose ``POSTGRES_URL`` is wrong, or whose servers never answer, exits with status 2 and one
``error:`` line naming the URL without its password. A node started before its servers are up (the
usual order in a deployment) waits for them with back-off and then runs: here the servers are put
behind TCP forwarders that only start listening a few seconds after the node.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.scale.nodes import ROOT, Node

SECRET = "s3cret-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Forwarder:
    """A TCP forwarder from ``127.0.0.1:port`` to ``target``, listening only once ``open`` is called."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = _free_port()
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


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"))


def _node(tmp_path: Path, **env: str) -> Node:
    return Node("node", "1-5", ROOT / "config" / "scale-out.yaml", tmp_path, {"AECO_WORKERS": "1", **env})


def _fails_clearly(node: Node, *, names: str) -> str:
    node.start()
    assert node.proc is not None
    code = node.proc.wait(timeout=120)
    err = node.output()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and names in errors[0], err[-2000:]
    assert SECRET not in err and "Traceback" not in err
    return errors[0]


def test_a_rejected_postgres_url_fails_at_once(tmp_path: Path, redis_url: str) -> None:
    bad = f"postgresql://no_such_role:{SECRET}@127.0.0.1:5432/no_such_db"
    line = _fails_clearly(_node(tmp_path, POSTGRES_URL=bad, REDIS_URL=redis_url), names="POSTGRES_URL=")
    assert "no_such_role:***@" in line and "rejected" in line


def test_a_postgres_url_that_is_not_one_is_refused(tmp_path: Path) -> None:
    line = _fails_clearly(_node(tmp_path, POSTGRES_URL=f"mysql://root:{SECRET}@db/x"), names="POSTGRES_URL=")
    assert "not a PostgreSQL URL" in line


def test_an_unreachable_redis_fails_after_retrying(tmp_path: Path, pg_url: str) -> None:
    nowhere = f"redis://:{SECRET}@127.0.0.1:{_free_port()}/0"
    node = _node(tmp_path, POSTGRES_URL=pg_url, REDIS_URL=nowhere, AECO_CONNECT_TIMEOUT_S="3")
    line = _fails_clearly(node, names="REDIS_URL=")
    assert "no Redis server answered within 3 s" in line and ":***@" in line
    assert "retrying" in node.output()  # it did wait with back-off before giving up


def test_an_unreachable_postgres_fails_after_retrying(tmp_path: Path) -> None:
    nowhere = f"postgresql://postgres:{SECRET}@127.0.0.1:{_free_port()}/aeco"
    node = _node(tmp_path, POSTGRES_URL=nowhere, AECO_CONNECT_TIMEOUT_S="3")
    line = _fails_clearly(node, names="POSTGRES_URL=")
    assert "no PostgreSQL server answered within 3 s" in line


def _wait_for(node: Node, prefix: str, timeout_s: float = 60.0) -> None:
    """Until the node says it is retrying a server (a line with ``prefix``)."""
    end = time.monotonic() + timeout_s
    while not any(prefix in line and "not reachable yet" in line for line in node.output().splitlines()):
        assert node.alive() and time.monotonic() < end, node.output()[-2000:]
        time.sleep(0.1)


@pytest.fixture
def forwarders(pg_url: str, redis_url: str) -> Iterator[tuple[Forwarder, Forwarder]]:
    pg, rd = urlsplit(pg_url), urlsplit(redis_url)
    made = (Forwarder((pg.hostname or "", pg.port or 5432)), Forwarder((rd.hostname or "", rd.port or 6379)))
    try:
        yield made
    finally:
        for f in made:
            f.close()


def test_a_node_waits_for_servers_that_come_up_late(
    tmp_path: Path, pg_url: str, redis_url: str, forwarders: tuple[Forwarder, Forwarder]
) -> None:
    pg, rd = forwarders
    node = _node(
        tmp_path,
        POSTGRES_URL=_via(pg_url, pg.port),
        REDIS_URL=_via(redis_url, rd.port),
        AECO_NAMESPACE=f"test-{uuid.uuid4().hex[:8]}",
        AECO_CONNECT_TIMEOUT_S="60",
    )
    node.start()
    try:
        time.sleep(3)  # trying a server that is not there yet (silently: the ledger connects without a log)
        assert node.alive(), node.output()[-2000:]
        pg.open()
        _wait_for(node, "redis: ")  # and now Redis is the late one
        assert node.alive()
        rd.open()
        node.wait_up(timeout_s=120)
        assert node.alive()
    finally:
        code = node.stop()
    assert code == 0, node.output()[-2000:]
