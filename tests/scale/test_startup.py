"""A node's start-up against PostgreSQL and Redis: clear failures, patience with slow servers.

A node whose ``POSTGRES_URL`` is wrong, or whose servers never answer, exits with status 2 and one
``error:`` line naming the URL without its password. A node started before its servers are up (the
usual order in a deployment) waits for them with back-off and then runs: here the servers are put
behind TCP forwarders that only start listening a few seconds after the node.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.scale.nodes import ROOT, Node
from tests.services import Forwarder, free_port, via

SECRET = "s3cret-pw"


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
    nowhere = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    node = _node(tmp_path, POSTGRES_URL=pg_url, REDIS_URL=nowhere, AECO_CONNECT_TIMEOUT_S="3")
    line = _fails_clearly(node, names="REDIS_URL=")
    assert "no Redis server answered within 3 s" in line and ":***@" in line
    assert "retrying" in node.output()  # it did wait with back-off before giving up


def test_an_unreachable_postgres_fails_after_retrying(tmp_path: Path) -> None:
    nowhere = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/aeco"
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
        POSTGRES_URL=via(pg_url, pg.port),
        REDIS_URL=via(redis_url, rd.port),
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
