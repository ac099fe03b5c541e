"""What only the PostgreSQL artifact store has: roles that keep agents away from history, a history the
database keeps append-only, several nodes writing to one database, and a writer connection that dies.

Every test gets a fresh database (``pg_url``); agent-facing login roles are made per test and dropped.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from psycopg import errors

from runtime.world.store import StoreError, verify
from runtime.world.store.postgres import AGENT_ROLE, PostgresStore, ensure_agent_login
from tests.harness import closing_all
from tests.services import ADMIN_URL

BIG = 1 << 40
#: Tables the agent-facing role must not read: the store's history, the migrations, and a stand-in for
#: the ledger's journal (the ledger's PostgreSQL tables are named ``ledger_*``, and grant agents nothing).
OPERATOR_TABLES = ("store_history", "store_commits", "aeco_migrations", "ledger_journal")


def _as(url: str, role: str) -> str:
    """``url`` with its user replaced by ``role`` (the test server trusts 127.0.0.1)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


@pytest.fixture
def agent_role() -> Iterator[str]:
    """A fresh LOGIN role for the agent-facing path (made by ``ensure_agent_login`` in the test), dropped after."""
    name = f"aeco_t_agent_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def stores() -> Iterator[Callable[..., PostgresStore]]:
    """``open(url, **options)``: a PostgresStore closed after the test."""
    with closing_all(PostgresStore) as opener:
        yield opener


@pytest.fixture
def agent_store(pg_url: str, agent_role: str, stores: Callable[..., PostgresStore]) -> PostgresStore:
    """The operator migrates (and makes the login role); the store then connects as the agent role only."""
    stores(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_agent_login(conn, agent_role)
        # What the ledger would have made in the same database: a table nobody granted agents.
        conn.execute("CREATE TABLE ledger_journal (seq bigserial PRIMARY KEY, op text NOT NULL)")
        conn.execute("INSERT INTO ledger_journal (op) VALUES ('mint 100 scrip to alice')")
    return stores(pg_url, agent_url=_as(pg_url, agent_role))


# ------------------------------------------------------------------------------------------ roles


def test_the_agent_role_cannot_read_history_or_the_ledger_but_the_operator_can(
    pg_url: str, agent_role: str, agent_store: PostgresStore
) -> None:
    # The agent-facing store works for everything agents do, and its writes are recorded.
    r1 = agent_store.write("alice", "doc", b"one", quota=BIG)
    r2 = agent_store.write("alice", "doc", b"two", quota=BIG)
    c3 = agent_store.delete("alice", "doc")
    agent_store.write("bob", "note", b"hi", quota=BIG)
    assert agent_store.read("carol", "note").content == b"hi" and agent_store.usage() == {"bob": 2}
    assert agent_store.last_commit().action == "write" and agent_store.head() != "1"
    # The database refuses every operator table to the agent role...
    with psycopg.connect(_as(pg_url, agent_role), autocommit=True) as conn:
        for table in OPERATOR_TABLES:
            with pytest.raises(errors.InsufficientPrivilege, match=f"permission denied for table {table}"):
                conn.execute(f"SELECT * FROM {table}")
        # ...and it may touch no table but the current artifacts, whatever exists in the schema.
        granted = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'v', 'm', 'S') AND n.nspname = current_schema() AND"
            " (has_table_privilege(c.oid, 'SELECT') OR has_table_privilege(c.oid, 'INSERT')"
            " OR has_table_privilege(c.oid, 'UPDATE') OR has_table_privilege(c.oid, 'DELETE'))"
        ).fetchall()
        assert granted == [("store_artifacts",)]
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
    # ...while the operator reads the whole history, with every agent write in it.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT h.commit_id::text, c.author, h.action FROM store_history h"
            " JOIN store_commits c ON c.id = h.commit_id WHERE h.artifact = 'doc' ORDER BY h.commit_id"
        ).fetchall()
        assert rows == [(r1.commit, "alice", "write"), (r2.commit, "alice", "write"), (c3, "alice", "delete")]
        assert conn.execute("SELECT count(*) FROM ledger_journal").fetchone() == (1,)
    # The agent-facing store object says so instead of leaking or failing obscurely.
    for call in (
        lambda: agent_store.history("doc"),
        lambda: agent_store.show("doc", r1.commit),
        lambda: agent_store.rollback(r1.commit, operator="ops"),
        lambda: agent_store.walk_head(),
    ):
        with pytest.raises(StoreError) as err:
            call()
        assert err.value.code == "forbidden" and "for the operator" in str(err.value), str(err.value)
        assert "permission denied" in str(err.value)
    assert verify(agent_store)[0].startswith("HEAD's tree: the history is for the operator")
    with PostgresStore(pg_url) as operator:
        assert [h.commit for h in operator.history("doc")] == [c3, r2.commit, r1.commit]
        assert operator.show("doc", r1.commit).content == b"one" and verify(operator) == []


def test_the_agent_role_cannot_forge_history_ownership_or_a_reset(
    pg_url: str, agent_role: str, agent_store: PostgresStore
) -> None:
    receipt = agent_store.write("alice", "doc", b"alice's", quota=BIG)
    with psycopg.connect(_as(pg_url, agent_role), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO store_history (commit_id, artifact, action, size) VALUES (1, 'x', 'write', 0)")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT nextval('store_commits_id_seq')")
        # Ownership moves only with an operator's reset; the creator and times are the database's.
        with pytest.raises(errors.InsufficientPrivilege, match="belongs to alice"):
            conn.execute("UPDATE store_artifacts SET owner = 'mallory' WHERE id = 'doc'")
        conn.execute("UPDATE store_artifacts SET creator = 'mallory', created = 0, price = 5 WHERE id = 'doc'")
        # Claiming to be part of a reset: refused, the reset commit must be this transaction's own.
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('aeco.store_reset', %s, true)", (receipt.commit,))
            with pytest.raises(errors.InsufficientPrivilege, match="not a reset commit made by this transaction"):
                conn.execute("DELETE FROM store_artifacts WHERE id = 'doc'")
        # Security-definer functions other than store_head() are not callable by agents.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT store_append_only()")
    art = agent_store.read("bob", "doc")
    assert (art.owner, art.creator, art.price) == ("alice", "alice", 5) and art.created > 0
    with PostgresStore(pg_url) as operator:
        assert [h.author for h in operator.history("doc")] == ["alice", "alice"]
        assert verify(operator) == []


def test_ensure_agent_login_is_idempotent_and_refuses_bad_names(pg_url: str, agent_role: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_agent_login(conn, agent_role, password="s3cret")
        ensure_agent_login(conn, agent_role)  # again: still one role, still in the group
        row = conn.execute(
            "SELECT r.rolcanlogin, r.rolsuper, pg_has_role(r.oid, %s, 'MEMBER') FROM pg_roles r WHERE rolname = %s",
            (AGENT_ROLE, agent_role),
        ).fetchone()
        assert row == (True, False, True)
        for bad in ("Robert'); DROP TABLE x; --", "", AGENT_ROLE, "x" * 64):
            with pytest.raises(ValueError, match="is not allowed"):
                ensure_agent_login(conn, bad)


# ----------------------------------------------------------------------------- append-only history


def test_history_is_append_only_even_for_the_operator(pg_url: str, stores: Callable[..., PostgresStore]) -> None:
    store = stores(pg_url)
    store.write("alice", "doc", b"one", quota=BIG)
    store.write("alice", "doc", b"two", quota=BIG)
    history = store.history("doc")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for sql in (
            "UPDATE store_history SET content = 'forged' WHERE artifact = 'doc'",
            "DELETE FROM store_history WHERE artifact = 'doc'",
            "TRUNCATE store_history",
            "UPDATE store_commits SET author = 'mallory'",
            "DELETE FROM store_commits WHERE action = 'write'",
            "TRUNCATE store_commits CASCADE",
        ):
            with pytest.raises(errors.InsufficientPrivilege, match="is append-only"):
                conn.execute(sql)
        # The current table may change (that is a write), and the change is recorded, not overwritten.
        conn.execute("UPDATE store_artifacts SET content = 'three' WHERE id = 'doc'")
    assert store.history("doc")[1:] == history and store.history("doc")[0].size == 5
    assert store.read("bob", "doc").content == b"three" and verify(store) == []


def test_verify_notices_a_current_table_changed_behind_the_history(
    pg_url: str, stores: Callable[..., PostgresStore]
) -> None:
    store = stores(pg_url)
    store.write("alice", "a", b"12345", quota=BIG)
    store.write("bob", "b", b"123", quota=BIG)
    assert verify(store) == []
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the owner switching its own trigger off
        conn.execute("ALTER TABLE store_artifacts DISABLE TRIGGER store_record")
        conn.execute("UPDATE store_artifacts SET size = 4 WHERE id = 'a'")
        conn.execute("DELETE FROM store_artifacts WHERE id = 'b'")
        conn.execute("ALTER TABLE store_artifacts ENABLE TRIGGER store_record")
    problems = verify(store)
    assert any("usage of `alice`" in p for p in problems), problems
    assert any("`b` is in HEAD's tree but not in the index" in p for p in problems), problems


# ------------------------------------------------------------------------------ several nodes


def test_two_nodes_writing_one_database_lose_nothing_and_the_first_writer_wins(
    pg_url: str, stores: Callable[..., PostgresStore]
) -> None:
    opened: list[PostgresStore] = []
    openers = [threading.Thread(target=lambda: opened.append(stores(pg_url))) for _ in range(2)]
    for t in openers:  # both migrate at once: the schema is made exactly once
        t.start()
    for t in openers:
        t.join(60)
    assert len(opened) == 2
    nodes = opened
    agents = [f"agent{i}" for i in range(8)]
    contested = [f"race{i}" for i in range(200)]
    winners: dict[str, set[str]] = {aid: set() for aid in contested}
    versions: dict[str, list[int]] = {}  # own id -> versions acknowledged, in order
    lock = threading.Lock()
    errors_seen: list[str] = []

    def node_agent(node: PostgresStore, agent: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            order = contested[:]
            rng.shuffle(order)
            futs: list[tuple[str, Future[Any]]] = [
                (aid, node.submit_write(agent, aid, f"{agent} {aid}".encode(), quota=BIG)) for aid in order
            ]
            mine = f"own-{agent}"
            for v in range(30):
                futs.append((mine, node.submit_write(agent, mine, f"{mine} v{v}".encode(), quota=BIG)))
            for aid, fut in futs:
                exc = fut.exception(timeout=120)
                if exc is None:
                    with lock:
                        if aid == mine:
                            versions.setdefault(aid, []).append(int(node.read(agent, aid).content.split(b" v")[1]))
                        else:
                            winners[aid].add(agent)
                elif not (isinstance(exc, StoreError) and exc.code == "forbidden" and aid != mine):
                    errors_seen.append(f"{agent} {aid}: {exc!r}")
        except Exception as exc:
            errors_seen.append(f"{agent}: {exc!r}")

    threads = [threading.Thread(target=node_agent, args=(nodes[i % 2], agent, i)) for i, agent in enumerate(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors_seen == []
    # First writer wins: exactly one agent wrote each contested id, and it is the owner on both nodes.
    assert all(len(w) == 1 for w in winners.values()), {a: w for a, w in winners.items() if len(w) != 1}
    for aid, (winner,) in winners.items():
        assert nodes[0].read("x", aid).owner == nodes[1].read("x", aid).owner == winner
        assert [h.author for h in nodes[0].history(aid)] == [winner]
    # Nothing lost: every agent's own artifact has its 30 versions, in order, in the history.
    for agent in agents:
        aid = f"own-{agent}"
        assert nodes[1].read(agent, aid).content == f"{aid} v29".encode()
        hist = nodes[0].history(aid)
        assert len(hist) == 30 and [int(h.commit) for h in hist] == sorted((int(h.commit) for h in hist), reverse=True)
        assert [nodes[1].show(aid, h.commit).content for h in reversed(hist)] == [
            f"{aid} v{v}".encode() for v in range(30)
        ]
    assert sum(nodes[0].usage().values()) == sum(len(f"{w} {aid}") for aid, (w,) in winners.items()) + sum(
        len(f"own-{a} v29") for a in agents
    )
    assert verify(nodes[0]) == [] and verify(nodes[1]) == []


def test_a_rollback_on_one_node_waits_for_the_other_nodes_batch(
    pg_url: str, stores: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    node1, node2 = stores(pg_url), stores(pg_url)
    base = node1.write("alice", "a", b"base", quota=BIG).commit
    # Hold node2's batch open inside its transaction (locks taken, row written, not committed).
    inside, release = threading.Event(), threading.Event()
    real = node2._lock_for

    def held(conn: psycopg.Connection[Any], ops: list[Any]) -> None:
        real(conn, ops)
        inside.set()
        release.wait(30)

    monkeypatch.setattr(node2, "_lock_for", held)
    pending = node2.submit_write("bob", "b", b"during", quota=BIG)
    assert inside.wait(30)
    rolled: list[str] = []
    rollback = threading.Thread(target=lambda: rolled.append(node1.rollback(base, operator="ops")))
    rollback.start()
    # The rollback's EXCLUSIVE lock request waits behind the batch's ROW EXCLUSIVE one.
    with psycopg.connect(pg_url, autocommit=True) as admin:
        deadline = time.monotonic() + 30
        while not admin.execute(
            "SELECT 1 FROM pg_locks WHERE NOT granted AND mode = 'ExclusiveLock'"
            " AND relation = 'store_artifacts'::regclass"
        ).fetchone():
            assert time.monotonic() < deadline, "the rollback never waited for the batch in flight"
            time.sleep(0.02)
    assert rollback.is_alive() and not rolled
    release.set()
    written = pending.result(timeout=30)
    rollback.join(30)
    # The write committed first, the reset after it: the reset removed it, and says so in the history.
    assert int(rolled[0]) > int(written.commit)
    assert [(h.commit, h.action) for h in node1.history("b")] == [(rolled[0], "reset"), (written.commit, "write")]
    with pytest.raises(StoreError):
        node2.read("bob", "b")
    assert verify(node1) == []


# ------------------------------------------------------------------------------ failures


def test_a_batch_whose_connection_dies_writes_nothing_and_the_next_reconnects(
    pg_url: str, stores: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stores(pg_url)
    store.write("alice", "keep", b"kept", quota=BIG)
    head, usage = store.head(), store.usage()
    real = store._lock_for
    calls = [0]

    def dying(conn: psycopg.Connection[Any], ops: list[Any]) -> None:
        real(conn, ops)
        calls[0] += 1
        if calls[0] == 1:  # the server ends the writer's session in the middle of the transaction
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))

    monkeypatch.setattr(store, "_lock_for", dying)
    futs = [store.submit_write("alice", f"lost{i}", b"x" * 10, quota=BIG) for i in range(20)]
    outcomes = [f.exception(timeout=60) for f in futs]
    assert isinstance(outcomes[0], psycopg.OperationalError)
    failed = [i for i, e in enumerate(outcomes) if e is not None]
    assert failed == list(range(len(failed))) and all(isinstance(outcomes[i], psycopg.Error) for i in failed)
    committed = len(futs) - len(failed)
    assert store.usage()["alice"] == usage["alice"] + 10 * committed
    for i in failed:
        with pytest.raises(StoreError):
            store.read("alice", f"lost{i}")
    assert committed or store.head() == head
    store.write("alice", "after", b"after", quota=BIG)  # on a new connection
    assert store.read("bob", "after").content == b"after" and verify(store) == []


def test_a_missing_store_is_not_created_when_asked_not_to(pg_url: str) -> None:
    with pytest.raises(StoreError, match="no artifact store in the database"):
        PostgresStore(pg_url, create=False)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('store_commits')").fetchone() == (None,)
