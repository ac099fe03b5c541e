"""The artifact store in PostgreSQL: current artifacts for agents, an append-only history for the operator.

Three tables (created by ``runtime.host.postgres.migrate(conn, "store", STEPS)``):

- ``store_artifacts``: HEAD, one row per artifact (content, kind, creator, owner, price, readable,
  created, updated, size, and ``commit_id``, the commit that last wrote it);
- ``store_commits``: one row per commit (id from a sequence, author, time, action, artifact, subject);
  commit 1 is ``create artifact store``, made by the migration;
- ``store_history``: one row per artifact a commit changed: the artifact as it was after the commit
  (content and metadata; ``content`` NULL when it no longer exists).

The history is written by the database, not by this module: a ``BEFORE INSERT OR UPDATE OR DELETE``
trigger on ``store_artifacts`` (``store_record``, owned by the operator and ``SECURITY DEFINER`` with a
fixed ``search_path``) allocates the commit, appends the commit and history rows, and fills in what the
writer may not choose (creator, created, updated, size, commit id). Both history tables are
append-only: a trigger refuses every UPDATE, DELETE and TRUNCATE, whoever asks.

Roles — the observer-only rule enforced by the database: the migration creates the NOLOGIN group role
``aeco_agent``, grants it SELECT, INSERT, UPDATE and DELETE on ``store_artifacts`` and EXECUTE on
``store_head()`` (HEAD's commit, which the supervisor reads to announce a reset), and nothing else: not
the history, not ``aeco_migrations``, not the ledger's tables. Functions the operator creates later are
not executable by PUBLIC (``ALTER DEFAULT PRIVILEGES``), and tables never are unless granted. A store
opened with ``agent_url`` (a login role in ``aeco_agent``; see ``ensure_agent_login``) does everything
agents need through that role; its ``history``, ``show``, ``rollback`` and ``walk_head`` are refused by
the server and raise ``StoreError("forbidden")``. The operator's store (no ``agent_url``) can do all.

Rollback is a commit of its own (action ``reset``, authored by the operator) whose history rows are
exactly the artifacts it changed. Only the transaction that inserted a ``reset`` commit (which needs
INSERT on ``store_commits``: the operator's) can make the trigger record changes under it.

Group commit: one writer thread per store takes every queued write and delete (up to ``max_batch``)
and applies them in ONE transaction, checks first (so later operations of a batch see earlier ones);
futures resolve after COMMIT. Several stores (nodes) may share one database. Each batch first takes
transaction-level advisory locks on every agent and artifact id it touches, in sorted order (so
batches of different nodes never deadlock), then the table in ROW EXCLUSIVE mode: first writer wins
(the second waits, then sees the owner), quota checks see the agent's every byte, and an artifact's
commit ids increase in the order its writes committed. A rollback locks the table EXCLUSIVE, so it
waits for every batch in flight and sees all of them.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg_pool import ConnectionPool

from runtime.host.pgasync import AsyncReader
from runtime.host.postgres import connect, migrate, redact
from runtime.world.store import (
    Artifact,
    ArtifactInfo,
    CommitInfo,
    DeleteOp,
    HistoryEntry,
    Store,
    StoreError,
    WriteOp,
    WriteReceipt,
    check_agent,
    check_delete,
    check_id,
    check_write,
)
from runtime.world.store.cache import HeadCache

#: The group role of every login role the agent-facing path connects with.
AGENT_ROLE = "aeco_agent"
_ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_COMMIT_RE = re.compile(r"^[0-9]+$")
_MAX_BIGINT = (1 << 63) - 1
_COLUMNS = "kind, creator, owner, price, readable, created, updated"
_READ = (
    "SELECT " + _COLUMNS + ", size, content FROM store_artifacts WHERE id = %s AND (readable <> 'owner' OR owner = %s)"
)
_LIST = "SELECT id, " + _COLUMNS + ", size FROM store_artifacts WHERE readable <> 'owner' OR owner = %s ORDER BY id"
#: HEAD's metadata with the commit that last wrote each artifact (for the node's ``HeadCache``).
_HEAD = "SELECT commit_id, id, " + _COLUMNS + ", size FROM store_artifacts"
#: What a write returns: its commit, and what the history trigger filled in.
_WRITTEN = "commit_id, creator, created, updated, size"

#: Schema migrations of the ``store`` component (append-only: never edit a shipped step, add one).
STEPS: tuple[str, ...] = (
    r"""
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'aeco_agent') THEN
        CREATE ROLE aeco_agent NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created meanwhile for another database of the same server
END $$;

CREATE TABLE store_commits (
    id bigserial PRIMARY KEY,
    author text NOT NULL,
    at double precision NOT NULL,
    action text NOT NULL CHECK (action IN ('create', 'write', 'delete', 'reset')),
    artifact text COLLATE "C",
    subject text NOT NULL
);

CREATE TABLE store_artifacts (
    id text COLLATE "C" PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$'),
    content bytea NOT NULL,
    kind text NOT NULL CHECK (kind IN ('data', 'code')),
    creator text NOT NULL,
    owner text NOT NULL CHECK (owner ~ '^[a-z][a-z0-9_-]{0,31}$'),
    price bigint NOT NULL CHECK (price >= 0),
    readable text NOT NULL CHECK (readable IN ('public', 'owner')),
    created double precision NOT NULL,
    updated double precision NOT NULL,
    size bigint NOT NULL,
    commit_id bigint NOT NULL
);
CREATE INDEX store_artifacts_owner ON store_artifacts (owner);

CREATE TABLE store_history (
    commit_id bigint NOT NULL REFERENCES store_commits (id),
    artifact text COLLATE "C" NOT NULL,
    action text NOT NULL CHECK (action IN ('write', 'delete', 'reset')),
    content bytea,
    kind text,
    creator text,
    owner text,
    price bigint,
    readable text,
    created double precision,
    updated double precision,
    size bigint NOT NULL,
    PRIMARY KEY (artifact, commit_id),
    CHECK ((content IS NULL) = (owner IS NULL))
);

INSERT INTO store_commits (author, at, action, subject)
VALUES ('agent-ecology', extract(epoch FROM clock_timestamp()), 'create', 'create artifact store');

-- Records every change of store_artifacts. Runs as its owner (the operator) so that the agent role,
-- which cannot touch the history, still has every write it makes recorded.
CREATE FUNCTION store_record() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $fn$
DECLARE
    reset bigint := nullif(current_setting('aeco.store_reset', true), '')::bigint;
    c bigint := reset;
    now double precision := extract(epoch FROM clock_timestamp());
BEGIN
    IF reset IS NOT NULL AND NOT EXISTS (
        SELECT FROM store_commits
        WHERE id = reset AND action = 'reset' AND xmin = xid(pg_current_xact_id())
    ) THEN
        RAISE EXCEPTION 'aeco.store_reset = % is not a reset commit made by this transaction', reset
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF c IS NULL THEN
            INSERT INTO store_commits (author, at, action, artifact, subject)
            VALUES (OLD.owner, now, 'delete', OLD.id, 'delete ' || OLD.id) RETURNING id INTO c;
        END IF;
        INSERT INTO store_history (commit_id, artifact, action, size)
        VALUES (c, OLD.id, CASE WHEN reset IS NULL THEN 'delete' ELSE 'reset' END, 0);
        PERFORM set_config('aeco.store_commit', c::text, true);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.id <> OLD.id THEN
        RAISE EXCEPTION 'an artifact id cannot change (% to %)', OLD.id, NEW.id USING ERRCODE = 'check_violation';
    END IF;
    IF reset IS NULL THEN
        -- What a writer may not choose: ownership moves only with a reset; creation is kept.
        IF TG_OP = 'UPDATE' THEN
            IF NEW.owner <> OLD.owner THEN
                RAISE EXCEPTION 'artifact % belongs to %, not %', OLD.id, OLD.owner, NEW.owner
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            NEW.creator := OLD.creator;
            NEW.created := OLD.created;
        ELSE
            NEW.creator := NEW.owner;
            NEW.created := now;
        END IF;
        NEW.updated := now;
    END IF;
    NEW.size := octet_length(NEW.content);
    IF c IS NULL THEN
        INSERT INTO store_commits (author, at, action, artifact, subject)
        VALUES (NEW.owner, now, 'write', NEW.id, format('write %s (%s bytes)', NEW.id, NEW.size))
        RETURNING id INTO c;
    END IF;
    NEW.commit_id := c;
    INSERT INTO store_history
        (commit_id, artifact, action, content, kind, creator, owner, price, readable, created, updated, size)
    VALUES (c, NEW.id, CASE WHEN reset IS NULL THEN 'write' ELSE 'reset' END, NEW.content, NEW.kind,
            NEW.creator, NEW.owner, NEW.price, NEW.readable, NEW.created, NEW.updated, NEW.size);
    RETURN NEW;
END
$fn$;
CREATE TRIGGER store_record BEFORE INSERT OR UPDATE OR DELETE ON store_artifacts
    FOR EACH ROW EXECUTE FUNCTION store_record();

CREATE FUNCTION store_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END
$fn$;
CREATE TRIGGER store_append_only BEFORE UPDATE OR DELETE ON store_commits
    FOR EACH ROW EXECUTE FUNCTION store_append_only();
CREATE TRIGGER store_append_only_truncate BEFORE TRUNCATE ON store_commits
    FOR EACH STATEMENT EXECUTE FUNCTION store_append_only();
CREATE TRIGGER store_append_only BEFORE UPDATE OR DELETE ON store_history
    FOR EACH ROW EXECUTE FUNCTION store_append_only();
CREATE TRIGGER store_append_only_truncate BEFORE TRUNCATE ON store_history
    FOR EACH STATEMENT EXECUTE FUNCTION store_append_only();

-- HEAD's commit: the one piece of the commit log the agent-facing path may read.
CREATE FUNCTION store_head() RETURNS TABLE (id bigint, author text, at double precision, action text,
                                            artifact text, subject text)
LANGUAGE sql STABLE SECURITY DEFINER AS $fn$
    SELECT c.id, c.author, c.at, c.action, c.artifact, c.subject FROM store_commits c ORDER BY c.id DESC LIMIT 1
$fn$;

DO $$ BEGIN
    -- A SECURITY DEFINER function must not resolve names through a schema its caller controls.
    EXECUTE format('ALTER FUNCTION store_record() SET search_path = pg_catalog, %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION store_head() SET search_path = pg_catalog, %I, pg_temp', current_schema());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO aeco_agent', current_schema());
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());
END $$;

REVOKE ALL ON store_commits, store_history, store_artifacts, aeco_migrations FROM PUBLIC;
REVOKE ALL ON SEQUENCE store_commits_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION store_record(), store_append_only(), store_head() FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON store_artifacts TO aeco_agent;
GRANT EXECUTE ON FUNCTION store_head() TO aeco_agent;
-- Whatever the operator creates later (the ledger's tables and functions) is closed to other roles
-- unless granted: tables are by default, functions are not.
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
""",
    # Access policies beyond public/owner (runtime.world.store.READABLE_PATTERN); the store keeps only
    # owner-only artifacts from others, so the rest need no rule here beyond their shape.
    r"""
ALTER TABLE store_artifacts DROP CONSTRAINT store_artifacts_readable_check;
ALTER TABLE store_artifacts ADD CONSTRAINT store_artifacts_readable_check CHECK (
    readable ~ ('^(public|owner|allow:[a-z][a-z0-9_-]{0,31}(\+[a-z][a-z0-9_-]{0,31}){0,15}|price:[0-9]{1,15}'
        || '|contract:[A-Za-z0-9][A-Za-z0-9_-]{0,127})$')
);
""",
)


def ensure_agent_login(conn: psycopg.Connection[Any], name: str, password: str | None = None) -> None:
    """Create (or update) the LOGIN role ``name`` as a member of ``aeco_agent``, the role the agent-facing
    path of a deployment connects with. Needs a connection of a role allowed to create roles, to a
    database whose store schema exists (the group role is made by the migration). Roles are per server:
    one login serves every database of it."""
    if not _ROLE_RE.match(name) or name == AGENT_ROLE:
        raise ValueError(f"role name {name!r} is not allowed (lower-case letters, digits and _, not {AGENT_ROLE})")
    secret = sql.SQL(" PASSWORD {}").format(sql.Literal(password)) if password is not None else sql.SQL("")
    role = sql.Identifier(name)
    with conn.transaction():
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS{}").format(
                sql.SQL(verb), role, secret
            )
        )
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(AGENT_ROLE), role))


@dataclass(frozen=True, slots=True)
class _Reset:
    target: int
    operator: str


_Op = WriteOp | DeleteOp | _Reset
_Item = tuple[_Op, "Future[Any]"]


def _lock_key(what: str, name: str) -> int:
    """A signed 64-bit advisory lock key for an agent or an artifact id (a collision only serialises more)."""
    digest = hashlib.blake2b(f"aeco-store:{what}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _info(aid: str, row: tuple[Any, ...]) -> ArtifactInfo:
    kind, creator, owner, price, readable, created, updated, size = row[:8]
    return ArtifactInfo(aid, kind, creator, owner, int(price), readable, float(created), float(updated), int(size))


def _artifact(aid: str, rows: builtins.list[tuple[Any, ...]]) -> Artifact:
    """The artifact ``_READ`` found, or ``not_found``."""
    if not rows:
        raise StoreError("not_found", f"no artifact `{aid}`")
    info, content = _info(aid, rows[0]), bytes(rows[0][8])
    assert len(content) == info.size, f"invariant: `{aid}` is {len(content)} bytes, recorded as {info.size}"
    return Artifact(**{f: getattr(info, f) for f in ArtifactInfo.__struct_fields__}, content=content)


class PostgresStore(Store):
    """The artifact store in the PostgreSQL database at ``url`` (the operator's URL: its role owns the
    schema, which is created or migrated on open).

    With ``agent_url`` the store is agent-facing: after migrating with ``url`` it connects only as
    ``agent_url``'s role (a member of ``aeco_agent``), and the operator calls are refused by the server.
    ``create=False`` refuses a database without a store instead of making one (for ``runtime.ops.admin``).
    ``max_batch`` bounds the operations of one group commit; ``readers`` the connections for reads.
    """

    def __init__(
        self,
        url: str,
        *,
        agent_url: str | None = None,
        create: bool = True,
        max_batch: int = 512,
        readers: int = 4,
        async_readers: int = 4,
        head_max_age_s: float = 5.0,
        deadline_s: float = 30.0,
    ) -> None:
        with connect(url, what="POSTGRES_URL", deadline_s=deadline_s) as conn:
            if not create:
                found = conn.execute("SELECT to_regclass('store_commits') IS NOT NULL").fetchone()
                if not (found and found[0]):
                    raise StoreError("not_found", f"no artifact store in the database at {redact(url)}")
            migrate(conn, "store", STEPS)
        #: False for an agent-facing store (``agent_url``): history is then out of its reach.
        self.operator = agent_url is None
        self.url = agent_url if agent_url is not None else url
        self._what = "the agent URL" if agent_url is not None else "POSTGRES_URL"
        self._deadline_s = deadline_s
        self._wconn = connect(self.url, what=self._what, deadline_s=deadline_s, autocommit=True)
        #: Reads on the event loop (``read_async``, ``list_async``), through the same role as the pool.
        self.reader = AsyncReader(self.url, size=async_readers, name="aeco-store-reader", what=self._what)
        #: The node's copy of HEAD's metadata, for listings (``runtime.world.store.cache``).
        self.head_cache = HeadCache(head_max_age_s)
        self._head_read: asyncio.Future[None] | None = None
        try:
            self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
                self.url,
                min_size=1,
                max_size=max(1, readers),
                kwargs={"autocommit": True},
                check=ConnectionPool.check_connection,
                name="store-readers",
                open=True,
            )
            self._pool.wait(timeout=deadline_s)
        except BaseException:
            self._wconn.close()
            raise
        self._init_writer("pg-store-writer", max_batch)
        self._start_writer()

    # ------------------------------------------------------------------------------ requests

    def rollback(self, to_commit: str, operator: str = "system") -> str:
        """A new commit, authored by ``operator``, that makes every artifact what it was at ``to_commit``;
        return it. Operator only."""
        check_agent(operator, "operator")
        target = self._resolve(to_commit)
        fut: Future[str] = self._submit(_Reset(target, operator))
        return fut.result()

    # -------------------------------------------------------------------------------- writer

    def _commit(self, batch: list[_Item]) -> None:
        """Apply a batch: its writes and deletes in one transaction; a reset, rare, in one of its own."""
        run: list[_Item] = []
        for item in batch:
            if isinstance(item[0], _Reset):
                if run:
                    self._commit_run(run)
                    run = []
                self._commit_run([item])
            else:
                run.append(item)
        if run:
            self._commit_run(run)

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The writer's connection, opened again if the last one broke (server restart, terminated backend)."""
        if self._wconn.closed or self._wconn.broken:
            self._wconn.close()
            self._wconn = connect(self.url, what=self._what, deadline_s=self._deadline_s, autocommit=True)
        return self._wconn

    def _commit_run(self, items: list[_Item]) -> None:
        outcomes: list[object] = []
        changed: list[tuple[int, ArtifactInfo | str]] = []
        try:
            conn = self._connection()
            with conn.transaction():
                first = items[0][0]
                if isinstance(first, _Reset):
                    outcomes.append(self._apply_reset(conn, first))
                else:
                    self._lock_for(conn, [op for op, _ in items])
                    usage: dict[str, int] = {}
                    for op, _ in items:
                        try:
                            outcomes.append(self._apply(conn, usage, op, changed))
                        except StoreError as exc:  # refused before it wrote anything
                            outcomes.append(exc)
        except Exception as exc:
            # The transaction rolled back: nothing of the run was written.
            for _, fut in items:
                fut.set_exception(exc)
            return
        # Committed: the node's copy of HEAD learns it before any caller does.
        if isinstance(items[0][0], _Reset):
            self.head_cache.drop()
        for commit, change in changed:
            if isinstance(change, str):
                self.head_cache.deleted(commit, change)
            else:
                self.head_cache.wrote(commit, change)
        for (_, fut), res in zip(items, outcomes, strict=True):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _lock_for(self, conn: psycopg.Connection[Any], ops: list[_Op]) -> None:
        keys: set[int] = set()
        for op in ops:
            assert isinstance(op, WriteOp | DeleteOp)
            keys.add(_lock_key("agent", op.agent))
            keys.add(_lock_key("artifact", op.id))
        # Sorted: every batch of every node takes its locks in one global order, so none deadlocks.
        conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k", (sorted(keys),))
        # Conflicts with a rollback's EXCLUSIVE lock: a batch and a rollback never interleave.
        conn.execute("LOCK TABLE store_artifacts IN ROW EXCLUSIVE MODE")

    def _owned_in(self, conn: psycopg.Connection[Any], usage: dict[str, int], agent: str) -> int:
        if agent not in usage:
            row = conn.execute(
                "SELECT coalesce(sum(size), 0) FROM store_artifacts WHERE owner = %s", (agent,)
            ).fetchone()
            usage[agent] = int(row[0]) if row else 0
        return usage[agent]

    def _apply(
        self,
        conn: psycopg.Connection[Any],
        usage: dict[str, int],
        op: _Op,
        changed: builtins.list[tuple[int, ArtifactInfo | str]],
    ) -> object:
        """Apply one write or delete; append what it made of HEAD to ``changed`` (the new metadata, or
        the deleted id, with the commit)."""
        if isinstance(op, WriteOp):
            row = conn.execute("SELECT owner, size FROM store_artifacts WHERE id = %s", (op.id,)).fetchone()
            before = self._owned_in(conn, usage, op.agent)
            after = check_write(op, row[0] if row else None, int(row[1]) if row else 0, before)
            if row is None:
                cur = conn.execute(
                    "INSERT INTO store_artifacts (id, content, kind, owner, price, readable)"
                    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING " + _WRITTEN,
                    (op.id, op.content, op.kind, op.agent, op.price, op.readable),
                )
            else:
                cur = conn.execute(
                    "UPDATE store_artifacts SET content = %s, kind = %s, owner = %s, price = %s, readable = %s"
                    " WHERE id = %s RETURNING " + _WRITTEN,
                    (op.content, op.kind, op.agent, op.price, op.readable, op.id),
                )
            made = cur.fetchone()
            assert made is not None, f"invariant: the write of `{op.id}` returned no commit"
            usage[op.agent] = after
            commit, creator, created, updated, size = made
            info = ArtifactInfo(
                op.id, op.kind, creator, op.agent, op.price, op.readable, float(created), float(updated), int(size)
            )
            changed.append((int(commit), info))
            return WriteReceipt(op.id, str(commit), row is None, len(op.content), after)
        assert isinstance(op, DeleteOp)
        row = conn.execute("SELECT owner, readable, size FROM store_artifacts WHERE id = %s", (op.id,)).fetchone()
        check_delete(op, row[0] if row else None, row[1] if row else None)
        assert row is not None
        before = self._owned_in(conn, usage, op.agent)
        made = conn.execute(
            "DELETE FROM store_artifacts WHERE id = %s RETURNING current_setting('aeco.store_commit')", (op.id,)
        ).fetchone()
        assert made is not None, f"invariant: the delete of `{op.id}` returned no commit"
        usage[op.agent] = before - int(row[2])
        changed.append((int(made[0]), op.id))
        return str(made[0])

    def _apply_reset(self, conn: psycopg.Connection[Any], op: _Reset) -> str:
        with self._translated("rollback"):
            return self._reset(conn, op)

    def _reset(self, conn: psycopg.Connection[Any], op: _Reset) -> str:
        # EXCLUSIVE: waits for every batch in flight (of every node) and keeps new ones out, so that the
        # state at the target is final and nothing lands between reading it and restoring it.
        conn.execute("LOCK TABLE store_artifacts IN EXCLUSIVE MODE")
        if conn.execute("SELECT 1 FROM store_commits WHERE id = %s", (op.target,)).fetchone() is None:
            raise StoreError("not_found", f"no commit {op.target} in the store's history")
        row = conn.execute(
            "INSERT INTO store_commits (author, at, action, subject)"
            " VALUES (%s, extract(epoch FROM clock_timestamp()), 'reset', %s) RETURNING id",
            (op.operator, f"system reset to {op.target}"),
        ).fetchone()
        assert row is not None
        reset = int(row[0])
        conn.execute("SELECT set_config('aeco.store_reset', %s, true)", (str(reset),))
        target = (
            "WITH t AS (SELECT DISTINCT ON (artifact) artifact, content, " + _COLUMNS + " FROM store_history"
            " WHERE commit_id <= %(to)s ORDER BY artifact, commit_id DESC) "
        )
        conn.execute(
            target + "DELETE FROM store_artifacts a WHERE NOT EXISTS"
            " (SELECT FROM t WHERE t.artifact = a.id AND t.content IS NOT NULL)",
            {"to": op.target},
        )
        conn.execute(
            target + "UPDATE store_artifacts a SET content = t.content, kind = t.kind, creator = t.creator,"
            " owner = t.owner, price = t.price, readable = t.readable, created = t.created, updated = t.updated"
            " FROM t WHERE t.artifact = a.id AND t.content IS NOT NULL"
            " AND (a.content, a.kind, a.creator, a.owner, a.price, a.readable, a.created, a.updated)"
            " IS DISTINCT FROM (t.content, t.kind, t.creator, t.owner, t.price, t.readable, t.created, t.updated)",
            {"to": op.target},
        )
        conn.execute(
            target + "INSERT INTO store_artifacts (id, content, " + _COLUMNS + ")"
            " SELECT t.artifact, t.content, t.kind, t.creator, t.owner, t.price, t.readable, t.created, t.updated"
            " FROM t WHERE t.content IS NOT NULL"
            " AND NOT EXISTS (SELECT FROM store_artifacts a WHERE a.id = t.artifact)",
            {"to": op.target},
        )
        conn.execute("SELECT set_config('aeco.store_reset', '', true)")
        return str(reset)

    # --------------------------------------------------------------------------------- reads

    def _check_open(self) -> None:
        if self.stopped:
            raise StoreError("closed", "the store is closed")

    def _query(self, query: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> builtins.list[tuple[Any, ...]]:
        self._check_open()
        with self._pool.connection() as conn:
            return conn.execute(query, params).fetchall()

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Turn the server's refusal of an operator-only table into a ``StoreError`` that says so."""
        try:
            yield
        except errors.InsufficientPrivilege as exc:
            detail = (exc.diag.message_primary or str(exc)).strip()
            raise StoreError(
                "forbidden",
                f"{what} is for the operator: this store connects as an agent-facing role ({detail})",
            ) from None

    def read(self, agent: str, id: str) -> Artifact:
        """The artifact at HEAD, if ``agent`` may read it; ``not_found`` otherwise (even when it exists
        but is readable by its owner only: its existence is not revealed)."""
        aid = check_id(id)
        return _artifact(aid, self._query(_READ, (aid, agent)))

    async def read_async(self, agent: str, id: str) -> Artifact:
        """``read``, awaited."""
        aid = check_id(id)
        self._check_open()
        return _artifact(aid, await self.reader.fetch(_READ, (aid, agent)))

    def list(self, agent: str) -> builtins.list[ArtifactInfo]:
        """Every artifact at HEAD that ``agent`` can see (public ones and its own), by id."""
        return [_info(r[0], r[1:]) for r in self._query(_LIST, (agent,))]

    async def list_async(self, agent: str, limit: int | None = None) -> builtins.list[ArtifactInfo]:
        """The first ``limit`` (all if None) of ``list``, from the node's copy of HEAD's metadata once it
        has read what changed elsewhere since (``runtime.world.store.cache``). One read at a time: a
        listing that finds one in flight waits for it rather than repeat it."""
        self._check_open()
        reading = self._head_read
        if reading is None or reading.done():
            full, ids = self.head_cache.needs()
            if full or ids:
                reading = self._head_read = asyncio.ensure_future(self._read_head(None if full else ids))
        if reading is not None and not reading.done():
            await asyncio.shield(reading)
        return self.head_cache.visible(agent, limit)

    async def _read_head(self, ids: set[str] | None) -> None:
        """Read HEAD's metadata (whole, or of ``ids``) into the node's copy."""
        token = self.head_cache.token()
        try:
            if ids is None:
                rows = await self.reader.fetch(_HEAD)
            else:
                rows = await self.reader.fetch(_HEAD + " WHERE id = ANY(%s)", (list(ids),))
        except BaseException:
            if ids:
                self.head_cache.dirty(ids)  # still to be read
            raise
        self.head_cache.merge([(int(r[0]), _info(r[1], r[2:])) for r in rows], ids, token)

    def owned_bytes(self, agent: str) -> int:
        """Content bytes ``agent`` owns at HEAD."""
        rows = self._query("SELECT coalesce(sum(size), 0) FROM store_artifacts WHERE owner = %s", (agent,))
        return int(rows[0][0])

    def usage(self) -> dict[str, int]:
        """Content bytes owned at HEAD, per agent that owns any."""
        rows = self._query("SELECT owner, sum(size) FROM store_artifacts GROUP BY owner HAVING sum(size) > 0")
        return {owner: int(n) for owner, n in rows}

    def head(self) -> str:
        """The commit id of HEAD (the last commit), as a decimal string."""
        return self.last_commit().commit

    def last_commit(self) -> CommitInfo:
        """What the HEAD commit did (for example, a reset made while the runtime was stopped)."""
        rows = self._query("SELECT id, author, at, action, artifact, subject FROM store_head()")
        c, author, at, action, artifact, subject = rows[0]
        return CommitInfo(str(c), author, float(at), action, artifact, subject)

    def indexed(self) -> dict[str, tuple[ArtifactInfo, str]]:
        """Every artifact at HEAD (the current table), with the SHA-256 of its content."""
        rows = self._query(
            "SELECT id, " + _COLUMNS + ", size, encode(sha256(content), 'hex') FROM store_artifacts ORDER BY id"
        )
        return {r[0]: (_info(r[0], r[1:]), r[9]) for r in rows}

    # ------------------------------------------------------------------------- operator only

    def walk_head(self) -> dict[str, tuple[ArtifactInfo, str]]:
        """Every artifact as the history says it is now (the last history row of each id), with the
        SHA-256 of its content; sizes are the contents' real lengths. Operator only."""
        with self._translated("the history"):
            rows = self._query(
                "SELECT * FROM (SELECT DISTINCT ON (artifact) artifact, " + _COLUMNS + ", octet_length(content),"
                " encode(sha256(content), 'hex') AS digest FROM store_history ORDER BY artifact, commit_id DESC) h"
                " WHERE digest IS NOT NULL"
            )
        return {r[0]: (_info(r[0], r[1:]), r[9]) for r in rows}

    def _resolve(self, commit: str) -> int:
        """A commit of the store's history, by its id (a decimal number)."""
        self._check_open()
        want = commit.strip() if isinstance(commit, str) else ""
        if not _COMMIT_RE.match(want):
            raise StoreError("invalid", f"{commit!r} is not a commit id (a decimal number)")
        n = int(want)
        with self._translated("the history"):
            found = n <= _MAX_BIGINT and bool(self._query("SELECT 1 FROM store_commits WHERE id = %s", (n,)))
        if not found:
            raise StoreError("not_found", f"no commit {want} in the store's history")
        return n

    def history(self, id: str) -> builtins.list[HistoryEntry]:
        """Every commit that changed ``id`` (write, delete, or an operator's reset that touched it), newest
        first. Operator only."""
        aid = check_id(id)
        with self._translated("the history"):
            rows = self._query(
                "SELECT h.commit_id, c.author, c.at, h.action, h.size FROM store_history h"
                " JOIN store_commits c ON c.id = h.commit_id WHERE h.artifact = %s ORDER BY h.commit_id DESC",
                (aid,),
            )
        return [HistoryEntry(str(c), author, float(at), action, int(size)) for c, author, at, action, size in rows]

    def show(self, id: str, commit: str) -> Artifact:
        """``id`` as it was at ``commit``. Operator only."""
        aid = check_id(id)
        n = self._resolve(commit)
        with self._translated("the history"):
            rows = self._query(
                "SELECT " + _COLUMNS + ", size, content FROM store_history"
                " WHERE artifact = %s AND commit_id <= %s ORDER BY commit_id DESC LIMIT 1",
                (aid, n),
            )
        if not rows or rows[0][8] is None:
            raise StoreError("not_found", f"no artifact `{aid}` at commit {n}")
        info = _info(aid, rows[0])
        return Artifact(**{f: getattr(info, f) for f in ArtifactInfo.__struct_fields__}, content=bytes(rows[0][8]))

    # -------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Apply what is queued, stop the writer, and close the connections."""
        if self._stop_writer():
            self._wconn.close()
            self._pool.close()
            self.reader.close()
