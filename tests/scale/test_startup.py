"""A node's start-up against PostgreSQL and Redis: clear failures, patience with slow servers.

A node whose ``POSTGRES_URL`` is wrong, or whose servers never answer, exits with status 2 and one
``error:`` line naming the URL without its password. A node started before its servers are up (the
usual order in a deployment) waits for them with back-off and then runs: here the servers are put
behind TCP forwarders that only start listening a few seconds after the node. The deployment's one-shot
``setup`` creates the agents' login role only with a password, and refuses before touching anything
when it has none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from tests.harness import ROOT
from tests.scale.nodes import Node
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


def _setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m runtime.backends setup`` as a deployment's one-shot job runs it."""
    return subprocess.run(
        [sys.executable, "-m", "runtime.backends", "setup"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("agent_url", ["postgresql://aeco_node_agent@{at}", "postgresql://aeco_node_agent:@{at}"])
def test_setup_refuses_to_make_the_agent_role_without_a_password(pg_url: str, agent_url: str) -> None:
    at = pg_url.partition("@")[2]
    out = _setup({"POSTGRES_URL": pg_url, "POSTGRES_AGENT_URL": agent_url.format(at=at)})
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("error: POSTGRES_AGENT_URL=") and "has no password" in line, line
    # Refused before touching the database: not even the schemas were migrated.
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('aeco_migrations')").fetchone() == (None,)
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'aeco_node_agent'").fetchone() is None


def test_setup_migrates_and_makes_the_agent_role_with_its_password(pg_url: str) -> None:
    role = f"aeco_t_agent_{uuid.uuid4().hex[:8]}"
    host = pg_url.partition("@")[2]
    try:
        out = _setup({"POSTGRES_URL": pg_url, "POSTGRES_AGENT_URL": f"postgresql://{role}:{SECRET}@{host}"})
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"agent role '{role}' ready" in out.stdout and SECRET not in out.stdout + out.stderr
        with psycopg.connect(pg_url) as conn:
            (stored,) = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone() or (
                None,
            )
        assert isinstance(stored, str) and stored.startswith("SCRAM-SHA-256$"), stored  # a password, hashed
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
