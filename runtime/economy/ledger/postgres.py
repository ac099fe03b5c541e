"""The shared ledger backend: PostgreSQL, for several nodes writing one ledger, with group commit.

Each node has one writer thread (``runtime.groupcommit``) that applies every queued
operation of a batch in ONE transaction and resolves each caller's future only after COMMIT returned
(``synchronous_commit`` on: the WAL is flushed, so the operation is durable).

Several nodes, one total order. A batch's journal entries are numbered, written and committed while its
transaction holds a transaction-level advisory lock on the ledger, so:

- journal sequence numbers are gapless and *commit order is seq order*, so replaying the journal
  gives exactly the stored balances. Row locks alone would let two batches that touch disjoint
  accounts commit in the other order than they numbered their entries, and a batch that later reads
  a row changed by both would make the replay order matter (an overdraft refused in one order is
  accepted in the other);
- a reader polling ``journal(since)`` never sees entry N+1 before entry N.

Batches are optimistic, so the lock is held only while the server works, never across a round trip or
the node's Python (a node throttled by its CPU quota, or descheduled on a busy host, while it held the
lock stopped every node). A batch reads the rows its operations touch (and the op ids already journalled)
outside any transaction, applies the shared rule book (``runtime.economy.ledger.rules``) to them in
memory, and then sends in one round trip: BEGIN, the lock, a check that every row it read still holds
what it read (``_BatchView.unchanged``, by value: the rules read nothing else, so an unchanged read
gives the same result now), its writes in bulk, its journal entries numbered on from the last one
(``_APPEND``), COMMIT. If another node changed what it read meanwhile, the check raises and nothing is
written; if another node journalled one of its op ids, the unique index refuses the entry. Either
way the batch runs again holding the lock from its first read, as every batch did before (one round
trip for BEGIN, the lock and the reads, the rules, one for the writes and COMMIT), which cannot fail
that way: no update is lost, and a batch never waits behind more than one conflict of its own. Under
contention (nodes writing the same accounts all the time) each failure costs a round trip more than
the lock would have, so after one the next ``_LOCKED_AFTER_CONFLICT`` batches take the lock first.
A writer alone (no other writer journalled anything between its last two batches) takes the rows its
last batches left instead of reading them (``_Rows``): its batch is then that one round trip. The
check verifies those rows as it does reads, so a change made behind its back is caught the same way.

The writer's transactions are READ COMMITTED on purpose: every statement sees what committed before it
started, and the statements after the lock start only once the lock is held. (A REPEATABLE READ
snapshot would be taken by the lock statement itself, before the wait, and miss the previous writer.)
Reads use a per-node pool of connections in read-only REPEATABLE READ transactions: one consistent
snapshot per call, never waiting for the writer.

Reads on the event loop (``holdings_async``, ``balance_async``, ``accounts_async``) await the server
through ``runtime.host.pgasync`` instead of blocking the loop, each one statement. Holdings come from a
per-node cache (``runtime.economy.ledger.cache``, where the rule that keeps it true is stated) when it
has a fresh entry: each batch writes through the exact balances of every account it touched, and the
node's event stream forgets an account that another node credited.

Tables (schema ``ledger`` in ``aeco_migrations``): ``ledger_accounts``, ``ledger_balances`` (only
non-zero amounts), ``ledger_supply``, ``ledger_journal`` (seq, at, op id, the operation in msgpack; the
unique op id is the idempotency index), ``ledger_usage`` (task id -> record), ``ledger_buckets``
(agent -> levels), ``ledger_offers`` (offer id -> the open offer's ``PostOffer``), ``ledger_tasks``
(task id -> ``TaskState``), ``ledger_standing`` (``standing_key`` -> the standing trigger or
sponsorship), ``ledger_checkpoint`` (one row: the journal's folded entries as one ``Checkpoint``, once
``compact`` has folded some).

Retention (``compact``, from ``admin compact --postgres`` or a node's ``retention:``) folds old entries
while every node writes: chunks are replayed from read snapshots, and each is deleted with the new
checkpoint in one short transaction under an advisory lock of its own (``ledger-compact``: one fold at
a time), never the ledger's, so no node's batch waits for it beyond the row locks of its deletes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import msgspec
import psycopg
from msgspec import Struct
from psycopg_pool import ConnectionPool

from runtime.economy.buckets import BucketState
from runtime.economy.ledger import (
    SYSTEM_ACCOUNTS,
    AcceptOffer,
    AccountKind,
    Asset,
    AwardTask,
    CancelOffer,
    EndTrigger,
    JournalEntry,
    LedgerError,
    Op,
    OpenAccount,
    PostOffer,
    PostTask,
    Receipt,
    RecordUsage,
    SetBuckets,
    Sponsor,
    SponsorUsed,
    Standing,
    Subscribe,
    TaskState,
    Transfer,
    codec,
    rules,
)
from runtime.economy.ledger.cache import HoldingsCache
from runtime.economy.ledger.checkpoint import Checkpoint, LedgerCompaction, fold, next_checkpoint
from runtime.economy.ledger.writer import GroupCommitted, Item, fail, resolve
from runtime.host.pgasync import AsyncReader
from runtime.host.postgres import commit_with_last, connect, lock_key, migrate

#: Append-only migration steps of the ``ledger`` component (never edit a shipped step; add one).
STEPS: tuple[str, ...] = (
    """
    CREATE TABLE ledger_accounts (
        account text PRIMARY KEY,
        kind text NOT NULL CHECK (kind IN ('agent', 'system'))
    );
    CREATE TABLE ledger_balances (
        account text NOT NULL REFERENCES ledger_accounts (account),
        asset text NOT NULL,
        amount bigint NOT NULL CHECK (amount > 0),
        PRIMARY KEY (account, asset)
    );
    CREATE TABLE ledger_supply (
        asset text PRIMARY KEY,
        minted bigint NOT NULL CHECK (minted >= 0),
        burned bigint NOT NULL CHECK (burned BETWEEN 0 AND minted)
    );
    CREATE TABLE ledger_journal (
        seq bigint PRIMARY KEY CHECK (seq > 0),
        at double precision NOT NULL,
        op_id text NOT NULL UNIQUE,
        op bytea NOT NULL
    );
    CREATE TABLE ledger_usage (task_id text PRIMARY KEY, record bytea NOT NULL);
    CREATE TABLE ledger_buckets (
        agent text PRIMARY KEY REFERENCES ledger_accounts (account),
        levels bytea NOT NULL
    );
    """,
    "CREATE TABLE ledger_offers (offer text PRIMARY KEY, post bytea NOT NULL);",
    "CREATE TABLE ledger_tasks (task text PRIMARY KEY, state bytea NOT NULL);",
    'CREATE TABLE ledger_standing (key text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);',
    # An optimistic batch's check, run under the ledger lock before it writes (``_BatchView.unchanged``):
    # what it read changed meanwhile, so its transaction fails whole and the writer runs it again.
    """
    CREATE FUNCTION ledger_expect(unchanged boolean) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT unchanged THEN
            RAISE EXCEPTION 'ledger rows a batch read changed before it took the ledger lock'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END $$;
    """,
    """
    CREATE TABLE ledger_checkpoint (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        state bytea NOT NULL
    );
    """,
)

#: What ``pg_stat_activity.application_name`` shows for this backend's connections.
WRITER_NAME, READER_NAME = "aeco-ledger-writer", "aeco-ledger-reader"
#: One statement, one snapshot: the journal's head, whether the account exists, and its balances.
_HOLDINGS = (
    "SELECT (SELECT coalesce(max(seq), 0) FROM ledger_journal),"
    " (SELECT kind FROM ledger_accounts WHERE account = %(a)s),"
    " (SELECT coalesce(json_object_agg(asset, amount), '{}') FROM ledger_balances WHERE account = %(a)s)"
)
_LOCK = lock_key("ledger")
_COMPACT_LOCK = lock_key("ledger-compact")
_JOURNAL_PAGE = 1000
#: After an optimistic batch failed its check, this many batches take the lock from their first read.
_LOCKED_AFTER_CONFLICT = 8
# Array parameters (a batch's keys, rows and entries) are sent in binary (``%b``): psycopg's text format
# escapes every element with a regular expression, about 3.6 times the cost of the binary one.
#: A batch's journal entries, numbered on from the journal's last one and stamped no earlier than it
#: (nodes' clocks differ). Run under the ledger lock: the seq stays gapless and commit order is seq order.
_APPEND = (
    "WITH last AS (SELECT seq, at FROM ledger_journal ORDER BY seq DESC LIMIT 1)"
    " INSERT INTO ledger_journal (seq, at, op_id, op)"
    " SELECT coalesce((SELECT seq FROM last), 0) + z.n, greatest(%s::float8, (SELECT at FROM last)), z.i, z.o"
    " FROM unnest(%b::text[], %b::bytea[]) WITH ORDINALITY AS z(i, o, n) RETURNING seq, at"
)


_Conn = psycopg.Connection[tuple[Any, ...]]
#: A row of a keyed table, decoded (``_BatchView._read_one``).
_R = TypeVar("_R")


def _touched(op: Op) -> tuple[set[str], set[str], set[str]]:
    """The accounts, task ids and bucket owners whose rows ``op`` reads (preloaded per batch)."""
    if isinstance(op, Transfer):
        return {op.src, op.dst}, set(), set()
    if isinstance(op, RecordUsage):
        return {op.agent}, {op.task_id}, {op.agent} if op.buckets else set()
    if isinstance(op, SetBuckets):
        return {op.agent}, set(), {op.agent}
    if isinstance(op, PostOffer | CancelOffer):
        return {op.seller}, set(), set()
    if isinstance(op, AcceptOffer):
        # The seller is known only once the offer is read: ``balance`` loads its row on demand.
        return {op.buyer}, set(), set()
    if isinstance(op, AwardTask):
        return {op.agent}, set(), set()
    if isinstance(op, PostTask):
        return set(), set(), set()
    if isinstance(op, Subscribe | EndTrigger):
        return {op.subscriber}, set(), set()
    if isinstance(op, Sponsor | SponsorUsed):
        return {op.owner}, set(), set()
    return {op.account}, set(), set()


#: An operation of a batch applied but not yet numbered: its op id, its entry's index in the batch's
#: new entries, and whether it is that entry's own op (False: a repeat of its op id in the batch).
_New = tuple[str, int, bool]


def _apply_all(
    view: _BatchView, batch: list[Item], done: dict[str, tuple[int, float, Op]]
) -> tuple[list[Receipt | LedgerError | _New], list[tuple[str, bytes]]]:
    """Apply each operation of the batch with the rule book, in order: the outcome of each (a receipt
    for an op id already journalled, ``done``; a refusal; or a new entry) and the new entries (op id,
    encoded op)."""
    outcomes: list[Receipt | LedgerError | _New] = []
    rows: list[tuple[str, bytes]] = []
    new: dict[str, tuple[int, Op]] = {}
    for op, _ in batch:
        if op.id in done:
            seq, at, prev = done[op.id]
            outcomes.append(Receipt(op.id, seq, at, fresh=False) if prev == op else _reused(op))
            continue
        if op.id in new:
            index, earlier = new[op.id]
            outcomes.append((op.id, index, False) if earlier == op else _reused(op))
            continue
        try:
            rules.apply(view, op)
        except LedgerError as exc:
            outcomes.append(exc)
            continue
        new[op.id] = (len(rows), op)
        outcomes.append((op.id, len(rows), True))
        rows.append((op.id, codec.encode(op)))
    return outcomes, rows


def _reused(op: Op) -> LedgerError:
    return LedgerError("conflict", f"op id `{op.id}` was already used for another operation")


def _receipts(outcomes: list[Receipt | LedgerError | _New], first: int, at: float) -> list[Receipt | LedgerError]:
    """The batch's outcomes once its new entries were journalled from seq ``first`` at time ``at``."""
    return [Receipt(o[0], first + o[1], at, fresh=o[2]) if isinstance(o, tuple) else o for o in outcomes]


class _Rows:
    """What the writer knows of the rows its batches touched, as its last batch left them: exact at journal
    ``seq`` (-1: nothing known). ``usable`` while no other writer has journalled anything between this
    writer's last two batches (as on a node alone): then a batch takes these rows instead of reading them
    and, when it finds all it needs here, sends its one round trip without any read before it. Only ever a
    hint: the check under the lock verifies every value taken from here exactly as a value read.
    """

    #: Accounts kept at most (a node runs thousands of agents, not millions): past it, start again.
    LIMIT = 100_000

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything (a check failed: some row here was stale)."""
        self.accounts: dict[str, tuple[AccountKind, dict[str, int]]] = {}
        self.levels: dict[str, bytes | None] = {}
        self.supply: dict[str, tuple[int, int]] | None = None
        self.seq = -1
        self.usable = False


class _BatchView:
    """``rules.View`` over one batch: the rows the batch touches, read once, changed in memory, written
    back in bulk by ``flush``.

    A refused operation leaves the view untouched because the rule book checks everything before it
    writes (as the LMDB backend relies on too). A row the preload missed is read on demand, so the
    preload is only an optimisation, never a correctness condition. The view keeps what it read, as
    read, so that a batch read without the ledger lock can check it under the lock (``unchanged``).
    """

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._kinds: dict[str, AccountKind | None] = {}
        self._balances: dict[tuple[str, str], int] = {}
        self._supply: dict[str, tuple[int, int]] = {}
        self._supply_loaded = False
        self._usage: dict[str, bool] = {}
        self._levels: dict[str, dict[str, BucketState]] = {}
        self._new_accounts: dict[str, AccountKind] = {}
        self._dirty_balances: set[tuple[str, str]] = set()
        self._dirty_supply: set[str] = set()
        self._new_usage: list[RecordUsage] = []
        self._dirty_levels: set[str] = set()
        self._offers: dict[str, PostOffer | None] = {}
        self._dirty_offers: set[str] = set()
        self._tasks: dict[str, TaskState | None] = {}
        self._dirty_tasks: set[str] = set()
        self._standing: dict[str, Standing | None] = {}
        self._dirty_standing: set[str] = set()
        # What was read, as read (``unchanged``): every account loaded (and those absent), all their
        # balances, the task ids without a usage record, the supply as loaded and the assets whose
        # supply the rules used, and per keyed table the stored blob (None: no row) of each key read.
        self._read_accounts: list[str] = []
        self._absent: list[str] = []
        self._read_held: list[tuple[str, str, int]] = []
        self._unused: list[str] = []
        self._read_supply: dict[str, tuple[int, int]] = {}
        self._supply_used: set[str] = set()
        self._read_keyed: dict[tuple[str, str, str], dict[str, bytes | None]] = {}

    def load(
        self,
        accounts: Collection[str],
        task_ids: Collection[str],
        agents: Collection[str],
        then: Callable[[], object] | None = None,
    ) -> None:
        """Read the rows of these keys (and the whole supply, a few rows) that are not loaded yet.

        Every query is sent before any result is read: inside a pipeline that is one round trip.
        ``then`` sends one more query after these (read by its caller): outside a transaction each
        statement has a snapshot of its own, so that one sees at least what these saw.
        """
        accts = [a for a in accounts if a not in self._kinds]
        tasks = [t for t in task_ids if t not in self._usage]
        owners = [a for a in agents if a not in self._levels]
        ex = self._conn.execute
        kinds = ex("SELECT account, kind FROM ledger_accounts WHERE account = ANY(%b)", (accts,))
        held = ex("SELECT account, asset, amount FROM ledger_balances WHERE account = ANY(%b)", (accts,))
        used = ex("SELECT task_id FROM ledger_usage WHERE task_id = ANY(%b)", (tasks,))
        levels = ex("SELECT agent, levels FROM ledger_buckets WHERE agent = ANY(%b)", (owners,))
        supply = None if self._supply_loaded else ex("SELECT asset, minted, burned FROM ledger_supply")
        if then is not None:
            then()
        found: dict[str, AccountKind] = dict(kinds.fetchall())
        self._kinds.update((a, found.get(a)) for a in accts)
        self._read_accounts += accts
        self._absent += [a for a in accts if a not in found]
        rows: list[tuple[str, str, int]] = held.fetchall()
        self._read_held += rows
        self._balances.update(((account, asset), amount) for account, asset, amount in rows)
        recorded = {task_id for (task_id,) in used.fetchall()}
        self._usage.update((t, t in recorded) for t in tasks)
        self._unused += [t for t in tasks if t not in recorded]
        blobs: dict[str, bytes | None] = dict.fromkeys(owners)
        blobs.update(levels.fetchall())
        self._read_keyed.setdefault(("ledger_buckets", "agent", "levels"), {}).update(blobs)
        self._levels.update((a, codec.buckets.decode(b) if b is not None else {}) for a, b in blobs.items())
        if supply is not None:
            self._read_supply = {asset: (minted, burned) for asset, minted, burned in supply.fetchall()}
            self._supply.update(self._read_supply)
            self._supply_loaded = True

    def prefill(
        self, rows: _Rows, accounts: Collection[str], task_ids: Collection[str], agents: Collection[str]
    ) -> bool:
        """Take what ``rows`` knows of these keys as read (``unchanged`` checks it like a read), and take
        the task ids to have no usage record yet (checked too: a task is charged once, by the node that
        ran it); return whether anything is still to be read."""
        for account in accounts:
            known = rows.accounts.get(account)
            if known is not None:
                self._kinds[account] = known[0]
                self._read_accounts.append(account)
                for asset, amount in known[1].items():
                    self._balances[(account, asset)] = amount
                    self._read_held.append((account, asset, amount))
        blobs = self._read_keyed.setdefault(("ledger_buckets", "agent", "levels"), {})
        for agent in agents:
            if agent in rows.levels:
                blobs[agent] = blob = rows.levels[agent]
                self._levels[agent] = codec.buckets.decode(blob) if blob is not None else {}
        if rows.supply is not None:
            self._read_supply = dict(rows.supply)
            self._supply.update(rows.supply)
            self._supply_loaded = True
        self._usage.update(dict.fromkeys(task_ids, False))
        self._unused += task_ids
        return (
            rows.supply is None
            or any(a not in rows.accounts for a in accounts)
            or any(g not in rows.levels for g in agents)
        )

    def remember(self, rows: _Rows, seq: int) -> None:
        """Keep in ``rows`` every row this batch read, as its own operations left them (exact at ``seq``)."""
        if len(rows.accounts) > _Rows.LIMIT:
            rows.clear()
        for account, amounts in self.held().items():
            kind = self._kinds[account]
            assert kind is not None
            rows.accounts[account] = (kind, amounts)
        read = self._read_keyed.get(("ledger_buckets", "agent", "levels"), {})
        for agent, levels in self._levels.items():
            # Encoded as ``flush`` wrote it: the check compares the stored bytes.
            rows.levels[agent] = codec.encode(levels) if agent in self._dirty_levels else read.get(agent)
        if self._supply_loaded:
            rows.supply = dict(self._supply)
        rows.seq = seq

    def account_kind(self, account: str) -> AccountKind | None:
        if account not in self._kinds:
            self.load([account], (), ())
        return self._kinds[account]

    def add_account(self, account: str, kind: AccountKind) -> None:
        self._kinds[account] = self._new_accounts[account] = kind

    def balance(self, account: str, asset: Asset) -> int:
        if account not in self._kinds:
            self.load([account], (), ())
        return self._balances.get((account, asset), 0)

    def set_balance(self, account: str, asset: Asset, value: int) -> None:
        assert value >= 0, f"invariant: {account} {asset} would be {value}"
        self._balances[(account, asset)] = value
        self._dirty_balances.add((account, asset))

    def supply(self, asset: Asset) -> tuple[int, int]:
        if not self._supply_loaded:
            self.load((), (), ())
        self._supply_used.add(asset)
        return self._supply.get(asset, (0, 0))

    def set_supply(self, asset: Asset, minted: int, burned: int) -> None:
        self._supply[asset] = (minted, burned)
        self._dirty_supply.add(asset)

    def has_usage(self, task_id: str) -> bool:
        if task_id not in self._usage:
            self.load((), [task_id], ())
        return self._usage[task_id]

    def put_usage(self, record: RecordUsage) -> None:
        self._usage[record.task_id] = True
        self._new_usage.append(record)

    def put_buckets(self, agent: str, buckets: dict[str, BucketState]) -> None:
        if agent not in self._levels:
            self.load((), (), [agent])
        self._levels[agent] = {**self._levels[agent], **buckets}
        self._dirty_levels.add(agent)

    def _read_one(
        self, rows: dict[str, _R | None], decoder: msgspec.msgpack.Decoder[_R], where: tuple[str, str, str], value: str
    ) -> _R | None:
        """The row of ``value`` in a keyed table (None: no row), read once per batch into ``rows``; its
        stored blob is kept as read for ``unchanged``. (``where``, the table, its key column and its
        blob's column, are this module's own names, never input.)"""
        if value not in rows:
            table, key, column = where
            row = self._conn.execute(f"SELECT {column} FROM {table} WHERE {key} = %s", (value,)).fetchone()
            blob: bytes | None = row[0] if row else None
            self._read_keyed.setdefault(where, {})[value] = blob
            rows[value] = decoder.decode(blob) if blob is not None else None
        return rows[value]

    def offer(self, offer_id: str) -> PostOffer | None:
        return self._read_one(self._offers, codec.offer, ("ledger_offers", "offer", "post"), offer_id)

    def put_offer(self, offer: PostOffer) -> None:
        self._offers[offer.offer] = offer
        self._dirty_offers.add(offer.offer)

    def drop_offer(self, offer_id: str) -> None:
        self._offers[offer_id] = None
        self._dirty_offers.add(offer_id)

    def task(self, task_id: str) -> TaskState | None:
        return self._read_one(self._tasks, codec.task, ("ledger_tasks", "task", "state"), task_id)

    def put_task(self, state: TaskState) -> None:
        self._tasks[state.post.task] = state
        self._dirty_tasks.add(state.post.task)

    def standing(self, key: str) -> Standing | None:
        return self._read_one(self._standing, codec.standing, ("ledger_standing", "key", "record"), key)

    def put_standing(self, key: str, record: Standing | None) -> None:
        self._standing[key] = record
        self._dirty_standing.add(key)

    def held(self) -> dict[str, dict[str, int]]:
        """Every non-zero balance of every existing account the batch loaded (all its assets were)."""
        out: dict[str, dict[str, int]] = {a: {} for a, kind in self._kinds.items() if kind is not None}
        for (account, asset), amount in self._balances.items():
            if amount and account in out:
                out[account][asset] = amount
        return out

    def unchanged(self) -> tuple[str, list[object]]:
        """One SQL condition (and its parameters) that holds exactly when every row the batch read still
        holds what it read, every account it loaded has the balances it read, and none it found absent
        exists. Checked under the ledger lock, it makes what the batch computed what it would compute
        there: the rule book reads nothing else (and its writes are absolute values of rows it read)."""
        conds: list[str] = []
        params: list[object] = []
        if self._absent:
            conds.append("NOT EXISTS (SELECT 1 FROM ledger_accounts WHERE account = ANY(%b))")
            params.append(self._absent)
        if self._read_accounts:
            conds.append(
                "NOT EXISTS (SELECT 1 FROM (SELECT account, asset, amount FROM ledger_balances"
                " WHERE account = ANY(%b)) AS b FULL JOIN unnest(%b::text[], %b::text[], %b::bigint[])"
                " AS z(account, asset, amount) USING (account, asset) WHERE b.amount IS DISTINCT FROM z.amount)"
            )
            held = self._read_held
            params += [self._read_accounts, [r[0] for r in held], [r[1] for r in held], [r[2] for r in held]]
        if self._unused:
            conds.append("NOT EXISTS (SELECT 1 FROM ledger_usage WHERE task_id = ANY(%b))")
            params.append(self._unused)
        assets = sorted(self._supply_used | self._dirty_supply)
        if assets:
            conds.append(
                "NOT EXISTS (SELECT 1 FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS z(asset, minted, burned)"
                " LEFT JOIN ledger_supply s USING (asset)"
                " WHERE (coalesce(s.minted, 0), coalesce(s.burned, 0)) <> (z.minted, z.burned))"
            )
            read = [self._read_supply.get(a, (0, 0)) for a in assets]
            params += [assets, [m for m, _ in read], [b for _, b in read]]
        for (table, key, column), blobs in self._read_keyed.items():
            if blobs:
                conds.append(
                    f"NOT EXISTS (SELECT 1 FROM unnest(%b::text[], %b::bytea[]) AS z(k, v)"
                    f" LEFT JOIN {table} t ON t.{key} = z.k WHERE t.{column} IS DISTINCT FROM z.v)"
                )
                params += [list(blobs), list(blobs.values())]
        return " AND ".join(conds) or "true", params

    def flush(self) -> None:
        """Write every changed row back: one statement per table (new accounts go first, for the keys)."""
        ex = self._conn.execute
        if self._new_accounts:
            ex(
                "INSERT INTO ledger_accounts (account, kind) SELECT * FROM unnest(%b::text[], %b::text[])",
                (list(self._new_accounts), list(self._new_accounts.values())),
            )
        keep = [k for k in self._dirty_balances if self._balances[k]]
        gone = [k for k in self._dirty_balances if not self._balances[k]]
        if keep:
            ex(
                "INSERT INTO ledger_balances (account, asset, amount)"
                " SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])"
                " ON CONFLICT (account, asset) DO UPDATE SET amount = excluded.amount",
                ([a for a, _ in keep], [s for _, s in keep], [self._balances[k] for k in keep]),
            )
        if gone:
            ex(
                "DELETE FROM ledger_balances b USING unnest(%b::text[], %b::text[]) AS z(account, asset)"
                " WHERE b.account = z.account AND b.asset = z.asset",
                ([a for a, _ in gone], [s for _, s in gone]),
            )
        if self._dirty_supply:
            assets = list(self._dirty_supply)
            ex(
                "INSERT INTO ledger_supply (asset, minted, burned)"
                " SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[])"
                " ON CONFLICT (asset) DO UPDATE SET minted = excluded.minted, burned = excluded.burned",
                (assets, [self._supply[a][0] for a in assets], [self._supply[a][1] for a in assets]),
            )
        if self._new_usage:
            ex(
                "INSERT INTO ledger_usage (task_id, record) SELECT * FROM unnest(%b::text[], %b::bytea[])",
                ([r.task_id for r in self._new_usage], [codec.encode(r) for r in self._new_usage]),
            )
        if self._dirty_levels:
            owners = list(self._dirty_levels)
            ex(
                "INSERT INTO ledger_buckets (agent, levels) SELECT * FROM unnest(%b::text[], %b::bytea[])"
                " ON CONFLICT (agent) DO UPDATE SET levels = excluded.levels",
                (owners, [codec.encode(self._levels[a]) for a in owners]),
            )
        self._write_keyed("ledger_tasks", "task", "state", {t: self._tasks[t] for t in self._dirty_tasks})
        self._write_keyed("ledger_standing", "key", "record", {k: self._standing[k] for k in self._dirty_standing})
        self._write_keyed("ledger_offers", "offer", "post", {o: self._offers[o] for o in self._dirty_offers})

    def _write_keyed(self, table: str, key: str, column: str, rows: dict[str, Struct | None]) -> None:
        """Write a keyed table's changed rows back: a row that became None is deleted, the rest upserted.
        (``table``, ``key`` and ``column`` are this module's own names, never input.)"""
        gone = [k for k, v in rows.items() if v is None]
        kept = [(k, v) for k, v in rows.items() if v is not None]
        if gone:
            self._conn.execute(f"DELETE FROM {table} WHERE {key} = ANY(%b)", (gone,))
        if kept:
            self._conn.execute(
                f"INSERT INTO {table} ({key}, {column}) SELECT * FROM unnest(%b::text[], %b::bytea[])"
                f" ON CONFLICT ({key}) DO UPDATE SET {column} = excluded.{column}",
                ([k for k, _ in kept], [codec.encode(v) for _, v in kept]),
            )


class PostgresLedger(GroupCommitted):
    """The PostgreSQL ledger at ``url`` (its schema is created or upgraded on open; safe when several
    nodes open at once). ``durable=False`` commits with ``synchronous_commit=off`` (for tests of logic,
    never for real runs); ``group=False`` commits one operation per transaction (the benchmark's
    baseline). ``pool_size`` bounds this node's synchronous read connections, ``async_readers`` those of
    the reads on the event loop; ``cache_max_age_s`` is the longest a cached holding is used (0: never).
    ``optimistic=False`` holds the ledger lock from a batch's first read (the benchmarks' baseline; see
    the module docstring).

    Raises ``runtime.host.postgres.DatabaseUnavailable`` for a malformed URL, a rejected login, or a server
    that does not answer within ``connect_deadline_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        durable: bool = True,
        group: bool = True,
        max_batch: int = 4096,
        pool_size: int = 4,
        connect_deadline_s: float = 30.0,
        cache_max_age_s: float = 1.0,
        async_readers: int = 4,
        optimistic: bool = True,
    ) -> None:
        self._url = url
        self._optimistic = optimistic
        #: Optimistic batches that found what they read changed under the lock and ran again holding it.
        self.retried = 0
        self._locked_left = 0  # batches still to run locked after the last conflict
        self._rows = _Rows()  # the writer thread's own: only it reads or changes them
        #: The node's holdings cache (``runtime.economy.ledger.cache``); ``cache_max_age_s=0`` disables it.
        self.holdings_cache = HoldingsCache(cache_max_age_s)
        self.reader = AsyncReader(url, size=async_readers, name=READER_NAME, setup=_READ_ONLY)
        self._durable = durable
        self._deadline_s = connect_deadline_s
        self._conn = self._connect_writer()
        try:
            migrate(self._conn, "ledger", STEPS)
            self._pool: ConnectionPool[_Conn] = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                kwargs={"application_name": READER_NAME},
                configure=_configure_reader,
                open=False,
                name=READER_NAME,
            )
            self._pool.open(wait=True, timeout=connect_deadline_s)
        except BaseException:
            self._conn.close()
            raise
        self._start_ledger_writer(max_batch if group else 1)
        present = self.accounts()
        for name in SYSTEM_ACCOUNTS:
            if name not in present:
                # Several nodes may do this at once: the fixed op id makes all but one a replay.
                self.apply(OpenAccount(id=f"open:{name}", account=name, kind="system"))

    def _connect_writer(self) -> _Conn:
        conn: _Conn = connect(self._url, deadline_s=self._deadline_s, autocommit=True, log=False)
        conn.execute("SELECT set_config('application_name', %s, false)", (WRITER_NAME,))
        # A node that stalls inside a batch (stopped, partitioned) would hold the ledger lock and stop
        # every other node: the server ends its session instead, and the node's writer reconnects and
        # retries. A batch is milliseconds of work between statements, so this never hits a live one.
        conn.execute("SET idle_in_transaction_session_timeout = '30s'")
        if not self._durable:
            conn.execute("SET synchronous_commit = off")
        elif conn.execute("SHOW synchronous_commit").fetchone() == ("off",):
            # The server's (or the role's) default would acknowledge commits that a crash can lose.
            conn.execute("SET synchronous_commit = on")
        return conn

    # ------------------------------------------------------------------------------------ writes

    def _commit(self, batch: list[Item]) -> None:
        try:
            outcomes = self._run_batch(batch)
        except psycopg.OperationalError as exc:
            if not self._conn.closed:
                fail(batch, exc)
                return
            # The connection was lost (server restart, failover, terminated backend): whether the
            # COMMIT got through is unknown, so run the batch again on a new connection. Op ids make
            # that safe: what did commit comes back as a replay, with its first receipt.
            try:
                self._conn = self._connect_writer()
                outcomes = self._run_batch(batch)
            except Exception as again:
                fail(batch, again)
                return
        except Exception as exc:
            fail(batch, exc)
            return
        resolve(batch, outcomes)

    def _run_batch(self, batch: list[Item]) -> list[Receipt | LedgerError]:
        """Apply the batch optimistically (read, apply the rules, then check what was read, write and
        commit under the ledger lock in one round trip); when what it read changed meanwhile, or another
        node journalled one of its op ids, nothing was written and it runs again holding the lock from
        its first read, which cannot fail that way."""
        if self._optimistic and not self._locked_left:
            try:
                return self._attempt(batch, locked=False)
            except (psycopg.errors.SerializationFailure, psycopg.errors.UniqueViolation):
                self.retried += 1
                self._rows.clear()
                # Under contention an optimistic batch fails again and again, each failure a round trip
                # more than the lock costs: the next batches hold it from the start.
                self._locked_left = _LOCKED_AFTER_CONFLICT
        else:
            self._locked_left = max(self._locked_left - 1, 0)
        return self._attempt(batch, locked=True)

    def _attempt(self, batch: list[Item], *, locked: bool, reuse: bool = True) -> list[Receipt | LedgerError]:
        """One transaction of the batch. ``locked``: BEGIN, the lock and the reads in one round trip,
        then the writes and COMMIT in another (the lock is held across both and the rules). Else the
        reads first, outside any transaction, and BEGIN, the lock, the check, the writes and COMMIT in
        one round trip: the lock is held only while the server runs them. ``reuse``: take the writer's
        own rows instead of reading them when it may (``_Rows``)."""
        conn = self._conn
        accounts: set[str] = set()
        task_ids: set[str] = set()
        agents: set[str] = set()
        for op, _ in batch:
            a, t, g = _touched(op)
            accounts |= a
            task_ids |= t
            agents |= g
        token = self.holdings_cache.token()
        view = _BatchView(conn)
        # Alone, the rows of the writer's last batches stand in for reads; an op id journalled already
        # then shows as the journal's unique index refusing it, and the batch runs again under the lock.
        to_read = locked or not reuse or not self._rows.usable or view.prefill(self._rows, accounts, task_ids, agents)
        done: dict[str, tuple[int, float, Op]] = {}
        with contextlib.ExitStack() as transaction:
            if locked:
                transaction.enter_context(commit_with_last(conn))
            if to_read:
                with conn.pipeline():  # synced on exit
                    if locked:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                        head = conn.execute("SELECT coalesce(max(seq), 0) FROM ledger_journal")
                    ids = list({op.id for op, _ in batch})
                    sent: list[psycopg.Cursor[Any]] = []
                    # The journal is read after the rows: read before them, another node's op journalled in
                    # between would show as its effect (an account that exists) without its op id, and its
                    # replay here would be refused instead of answered with its first receipt.
                    view.load(
                        accounts,
                        task_ids,
                        agents,
                        then=lambda: sent.append(
                            conn.execute("SELECT op_id, seq, at, op FROM ledger_journal WHERE op_id = ANY(%b)", (ids,))
                        ),
                    )
                    (known,) = sent
                    done.update((op_id, (seq, at, codec.op.decode(blob))) for op_id, seq, at, blob in known.fetchall())
            pending, rows = _apply_all(view, batch, done)
            if not to_read and any(isinstance(p, LedgerError) for p in pending):
                # A refused op may be a replay of one journalled already, which must get its first
                # receipt: only the journal knows, so read it (and the rows) and apply the batch again.
                return self._attempt(batch, locked=False, reuse=False)
            if not locked:
                check, params = view.unchanged()
                if rows:
                    transaction.enter_context(commit_with_last(conn))
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                    conn.execute(f"SELECT ledger_expect({check})", params)
                elif any(isinstance(p, LedgerError) for p in pending):
                    # Refusals read in several statements: one snapshot in which all those reads
                    # still hold is a moment at which the ledger refused them all.
                    conn.execute(f"SELECT ledger_expect({check})", params)
            if not rows:
                if locked:  # what it read under the lock is exact at the journal's head
                    self._cache(view, int(head.fetchall()[0][0]), token)
                return _receipts(pending, 0, 0.0)
            view.flush()
            appended = conn.execute(_APPEND, (time.time(), [r[0] for r in rows], [r[1] for r in rows]))
        # Committed: the batch's entries follow the journal's last one at the lock, in batch order.
        numbered = appended.fetchall()
        first = min(seq for seq, _ in numbered)
        at = float(numbered[0][1])
        last = first + len(rows) - 1
        assert len(numbered) == len(rows), "invariant: one journal entry per new operation"
        # What the batch read (under the lock, or checked unchanged under it), changed by its own
        # operations, is every touched account's exact state at ``last``: nothing was written between.
        self._cache(view, last, token)
        # Another writer journalled something since this one's last batch: what it remembers of other
        # rows may be stale, and is likely to go stale again (the next batches read).
        alone = first == self._rows.seq + 1
        if not alone:
            self._rows.clear()
        view.remember(self._rows, last)
        self._rows.usable = alone
        return _receipts(pending, first, at)

    def _cache(self, view: _BatchView, seq: int, token: int) -> None:
        """Put the holdings of every account the batch loaded, exact at journal ``seq``, in the cache."""
        self.holdings_cache.put_all(view.held(), seq, token)

    def _close_store(self) -> None:
        self._conn.close()
        self._pool.close()
        self.reader.close()

    # ------------------------------------------------------------------------------------- reads

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one query, in its own read-only snapshot."""
        with self._pool.connection() as conn:
            return conn.execute(sql, params).fetchall()

    def balance(self, account: str, asset: Asset) -> int:
        """One balance; ``LedgerError`` if the account does not exist."""
        rows = self._read(
            "SELECT coalesce(b.amount, 0) FROM ledger_accounts a"
            " LEFT JOIN ledger_balances b ON b.account = a.account AND b.asset = %s WHERE a.account = %s",
            (asset, account),
        )
        if not rows:
            raise LedgerError("unknown_account", f"no account `{account}`")
        return int(rows[0][0])

    async def holdings_async(self, account: str, *, fresh: bool = False) -> dict[str, int]:
        """Every non-zero balance of ``account`` (``LedgerError`` if it does not exist), read without
        blocking the loop: from the node's cache when it has a fresh entry (unless ``fresh``), else in
        one statement whose result then fills the cache."""
        if not fresh:
            cached = self.holdings_cache.get(account)
            if cached is not None:
                return cached
        token = self.holdings_cache.token()
        rows = await self.reader.fetch(_HOLDINGS, {"a": account})
        seq, kind, amounts = rows[0]
        if kind is None:
            raise LedgerError("unknown_account", f"no account `{account}`")
        held = {str(asset): int(n) for asset, n in amounts.items()}
        self.holdings_cache.put(account, int(seq), held, token)
        return held

    async def balance_async(self, account: str, asset: Asset, *, fresh: bool = False) -> int:
        """One balance, as ``holdings_async`` reads it."""
        return (await self.holdings_async(account, fresh=fresh)).get(asset, 0)

    async def accounts_async(self) -> dict[str, AccountKind]:
        """Every account and its kind, read without blocking the loop."""
        return dict(await self.reader.fetch("SELECT account, kind FROM ledger_accounts"))

    def balances(self) -> dict[str, dict[str, int]]:
        """Every non-zero balance, from one snapshot."""
        out: dict[str, dict[str, int]] = {}
        for account, asset, amount in self._read("SELECT account, asset, amount FROM ledger_balances"):
            out.setdefault(account, {})[asset] = amount
        return out

    def accounts(self) -> dict[str, AccountKind]:
        """Every account and its kind."""
        return dict(self._read("SELECT account, kind FROM ledger_accounts"))

    def supply(self) -> dict[str, tuple[int, int]]:
        """Per asset: (minted, burned)."""
        return {asset: (minted, burned) for asset, minted, burned in self._read("SELECT * FROM ledger_supply")}

    def usage(self, task_id: str) -> RecordUsage | None:
        """The usage record of one task."""
        rows = self._read("SELECT record FROM ledger_usage WHERE task_id = %s", (task_id,))
        return codec.usage.decode(rows[0][0]) if rows else None

    def usage_records(self) -> Iterator[RecordUsage]:
        """Every usage record (from one snapshot)."""
        for (blob,) in self._read("SELECT record FROM ledger_usage"):
            yield codec.usage.decode(blob)

    def buckets(self, agent: str) -> dict[str, BucketState]:
        """The persisted bucket levels of an agent."""
        rows = self._read("SELECT levels FROM ledger_buckets WHERE agent = %s", (agent,))
        return codec.buckets.decode(rows[0][0]) if rows else {}

    def offers(self) -> list[PostOffer]:
        """Every open offer, by offer id (from one snapshot)."""
        return [codec.offer.decode(blob) for (blob,) in self._read("SELECT post FROM ledger_offers ORDER BY offer")]

    async def offers_async(self, limit: int | None = None) -> list[PostOffer]:
        """Every open offer (the first ``limit`` by id), read without blocking the loop."""
        rows = await self.reader.fetch("SELECT post FROM ledger_offers ORDER BY offer LIMIT %s", (limit,))
        return [codec.offer.decode(blob) for (blob,) in rows]

    async def offer_async(self, offer_id: str) -> PostOffer | None:
        """One open offer, or None, read without blocking the loop."""
        rows = await self.reader.fetch("SELECT post FROM ledger_offers WHERE offer = %s", (offer_id,))
        return codec.offer.decode(rows[0][0]) if rows else None

    def tasks(self) -> list[TaskState]:
        """Every posted task and who was paid for it, by task id (from one snapshot)."""
        return [codec.task.decode(blob) for (blob,) in self._read("SELECT state FROM ledger_tasks ORDER BY task")]

    def standing(self) -> list[Standing]:
        """Every standing trigger and sponsorship, by key (from one snapshot)."""
        rows = self._read("SELECT record FROM ledger_standing ORDER BY key")
        return [codec.standing.decode(blob) for (blob,) in rows]

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint the journal's folded entries left, or None if none were folded."""
        rows = self._read("SELECT state FROM ledger_checkpoint")
        return codec.checkpoint.decode(rows[0][0]) if rows else None

    def compact(self, horizon: float, chunk: int = 2_000) -> LedgerCompaction:
        """Fold the journal's entries applied before ``horizon`` (a UNIX time) into the checkpoint, a
        ``chunk`` at a time (see the module docstring), deleting them with their usage records; the last
        entry always stays. An op id folded away is no longer recognised as a replay, as with LMDB
        (``runtime.economy.ledger.checkpoint``)."""
        folded = usage = 0
        cp = self.checkpoint()
        view = cp.view() if cp is not None else rules.MemoryView()
        conn: _Conn = connect(self._url, deadline_s=self._deadline_s, autocommit=True, log=False)
        with conn:
            while True:
                through = cp.through if cp is not None else 0
                (last,) = self._read("SELECT coalesce(max(seq), 0) FROM ledger_journal")[0]
                rows = self._read(
                    "SELECT seq, at, op FROM ledger_journal"
                    " WHERE seq > %s AND seq < %s AND at < %s ORDER BY seq LIMIT %s",
                    (through, last, horizon, chunk),
                )
                taken = fold(view, (JournalEntry(q, a, codec.op.decode(o)) for q, a, o in rows), last, horizon, chunk)
                if not taken:
                    break
                new = next_checkpoint(view, cp, taken)
                tasks = [e.op.task_id for e in taken if isinstance(e.op, RecordUsage)]
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_COMPACT_LOCK,))
                    row = conn.execute("SELECT state FROM ledger_checkpoint").fetchone()
                    if (codec.checkpoint.decode(row[0]).through if row else 0) != through:
                        raise LedgerError("conflict", "another compaction folded the journal meanwhile (retry)")
                    usage += conn.execute("DELETE FROM ledger_usage WHERE task_id = ANY(%s)", (tasks,)).rowcount
                    conn.execute(
                        "DELETE FROM ledger_journal WHERE seq BETWEEN %s AND %s", (taken[0].seq, taken[-1].seq)
                    )
                    conn.execute(
                        "INSERT INTO ledger_checkpoint (state) VALUES (%s)"
                        " ON CONFLICT (only_row) DO UPDATE SET state = excluded.state",
                        (codec.encode(new),),
                    )
                folded += len(taken)
                cp = new
        return LedgerCompaction(folded, usage, cp.through if cp is not None else 0)

    def journal(self, since: int = 0) -> Iterator[JournalEntry]:
        """Journal entries after ``since``, in order, read in pages so a long journal streams."""
        while True:
            page = self._read(
                "SELECT seq, at, op FROM ledger_journal WHERE seq > %s ORDER BY seq LIMIT %s", (since, _JOURNAL_PAGE)
            )
            for seq, at, blob in page:
                yield JournalEntry(seq, at, codec.op.decode(blob))
            if len(page) < _JOURNAL_PAGE:
                return
            since = page[-1][0]


#: The async readers' sessions, like the pool's: nothing they run can write.
_READ_ONLY = "SET default_transaction_read_only = on"


def _configure_reader(conn: _Conn) -> None:
    # Each read runs in one transaction (the pool commits it on return): one snapshot per call.
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
