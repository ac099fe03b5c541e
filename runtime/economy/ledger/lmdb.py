"""The embedded ledger backend: one LMDB environment under the data directory, with group commit.

One writer thread takes every queued operation it can (up to ``max_batch``), applies them in a single
write transaction, commits it durably (``fdatasync``), and only then resolves each caller's future:
many operations share one sync, and no caller is acknowledged before its operation is on disk.
Readers use their own read transactions (LMDB's MVCC): they see the last committed state and never
wait for the writer.

Databases in the environment: ``accounts`` (account -> kind), ``balances`` (account NUL asset ->
int64), ``supply`` (asset -> minted, burned), ``journal`` (seq -> entry), ``ops`` (op id -> seq),
``usage`` (task id -> record), ``buckets`` (agent -> levels), ``offers`` (offer id -> the open offer's
``PostOffer``), ``tasks`` (task id -> ``TaskState``), ``standing`` (``standing_key`` -> the standing
trigger's ``Subscribe`` or sponsorship's ``Sponsor``), ``checkpoint`` (the journal's folded entries as one
``Checkpoint``, once retention has folded some).
"""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
from msgspec import DecodeError

from runtime.economy.buckets import BucketState
from runtime.economy.ledger import (
    SYSTEM_ACCOUNTS,
    AccountKind,
    Asset,
    JournalEntry,
    LedgerError,
    Op,
    OpenAccount,
    PostOffer,
    Receipt,
    RecordUsage,
    Standing,
    TaskState,
    codec,
    rules,
)
from runtime.economy.ledger.checkpoint import Checkpoint, LedgerCompaction, fold, next_checkpoint
from runtime.economy.ledger.writer import GroupCommitted, Item, fail, resolve
from runtime.host.lmdbfile import check_length

_I64 = struct.Struct(">q")
_SEQ = struct.Struct(">Q")
_SUPPLY = struct.Struct(">qq")
_OPREF = struct.Struct(">Qd")  # seq, applied at
_CHECKPOINT = b"state"
_DBS = (
    "accounts",
    "balances",
    "supply",
    "journal",
    "ops",
    "usage",
    "buckets",
    "offers",
    "tasks",
    "standing",
    "checkpoint",
)


def replay_journal(source: str | Path, target: str | Path) -> int:
    """Build a new ledger at ``target`` from the journal of the one at ``source`` (opened read-only): from
    its checkpoint if retention folded some entries (``Checkpoint``), every entry applied by the rules,
    with its own seq and time, in one durable transaction; every other table (balances, supply,
    accounts, usage, buckets, offers, tasks, op ids) is derived from them. Bucket levels come from the
    remaining entries' usage records only (levels refill; the next start restores the last ones
    recorded). Return the entries replayed. Raises ``LedgerError`` (``conflict``) when the journal has
    a gap, an entry that does not decode or one that does not apply: then it is not intact, and nothing
    is made at ``target``.
    """
    src = lmdb.open(str(source), readonly=True, lock=False, max_dbs=16)
    try:
        check_length(src, source)
        journal = src.open_db(b"journal", create=False)
        Path(target).mkdir(parents=True)
        dst = lmdb.open(str(target), map_size=1 << 34, max_dbs=16)
        try:
            dbs = {n: dst.open_db(n.encode()) for n in _DBS}
            n = 0
            with src.begin() as rtxn, dst.begin(write=True) as wtxn:
                view = _TxnView(wtxn, dbs)
                seq = _from_checkpoint(src, rtxn, wtxn, view, dbs)
                for key, raw in rtxn.cursor(db=journal):
                    seq += 1
                    try:
                        entry = codec.entry.decode(raw)
                    except DecodeError as exc:
                        raise LedgerError("conflict", f"journal entry {seq} does not decode: {exc}") from None
                    if _SEQ.unpack(key)[0] != seq or entry.seq != seq:
                        raise LedgerError("conflict", f"journal entry {seq} is numbered {entry.seq}: a gap")
                    rules.apply(view, entry.op)
                    wtxn.put(key, raw, db=dbs["journal"], append=True)
                    wtxn.put(entry.op.id.encode(), _OPREF.pack(seq, entry.at), db=dbs["ops"])
                    n += 1
            dst.sync(True)
        except BaseException:
            dst.close()
            shutil.rmtree(target)
            raise
        dst.close()
    finally:
        src.close()
    return n


def _from_checkpoint(
    src: lmdb.Environment, rtxn: lmdb.Transaction, wtxn: lmdb.Transaction, view: _TxnView, dbs: dict[str, Any]
) -> int:
    """Copy the checkpoint of ``src`` (if any) into the new ledger and set its state there; the seq it
    covers (0 without one)."""
    try:
        raw = rtxn.get(_CHECKPOINT, db=src.open_db(b"checkpoint", txn=rtxn, create=False))
    except lmdb.NotFoundError:
        return 0
    if raw is None:
        return 0
    cp = codec.checkpoint.decode(raw)
    for account, kind in cp.kinds.items():
        view.add_account(account, kind)
    for account, held in cp.balances.items():
        for asset, value in held.items():
            view.set_balance(account, asset, value)  # type: ignore[arg-type]
    for asset, (minted, burned) in cp.supply.items():
        view.set_supply(asset, minted, burned)  # type: ignore[arg-type]
    for offer in cp.offers:
        view.put_offer(offer)
    for task in cp.tasks:
        view.put_task(task)
    wtxn.put(_CHECKPOINT, raw, db=dbs["checkpoint"])
    return cp.through


def _bkey(account: str, asset: str) -> bytes:
    return f"{account}\x00{asset}".encode()


class _TxnView:
    """``rules.View`` over one LMDB write transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn, self.dbs = txn, dbs

    def account_kind(self, account: str) -> AccountKind | None:
        v = self.txn.get(account.encode(), db=self.dbs["accounts"])
        return bytes(v).decode() if v is not None else None  # type: ignore[return-value]

    def add_account(self, account: str, kind: AccountKind) -> None:
        self.txn.put(account.encode(), kind.encode(), db=self.dbs["accounts"])

    def balance(self, account: str, asset: Asset) -> int:
        v = self.txn.get(_bkey(account, asset), db=self.dbs["balances"])
        return _I64.unpack(v)[0] if v is not None else 0

    def set_balance(self, account: str, asset: Asset, value: int) -> None:
        assert value >= 0, f"invariant: {account} {asset} would be {value}"
        if value:
            self.txn.put(_bkey(account, asset), _I64.pack(value), db=self.dbs["balances"])
        else:
            self.txn.delete(_bkey(account, asset), db=self.dbs["balances"])

    def supply(self, asset: Asset) -> tuple[int, int]:
        v = self.txn.get(asset.encode(), db=self.dbs["supply"])
        return _SUPPLY.unpack(v) if v is not None else (0, 0)

    def set_supply(self, asset: Asset, minted: int, burned: int) -> None:
        self.txn.put(asset.encode(), _SUPPLY.pack(minted, burned), db=self.dbs["supply"])

    def has_usage(self, task_id: str) -> bool:
        return self.txn.get(task_id.encode(), db=self.dbs["usage"]) is not None

    def put_usage(self, record: RecordUsage) -> None:
        self.txn.put(record.task_id.encode(), codec.encode(record), db=self.dbs["usage"])

    def put_buckets(self, agent: str, buckets: dict[str, BucketState]) -> None:
        key = agent.encode()
        old = self.txn.get(key, db=self.dbs["buckets"])
        merged = {**(codec.buckets.decode(old) if old else {}), **buckets}
        self.txn.put(key, codec.encode(merged), db=self.dbs["buckets"])

    def offer(self, offer_id: str) -> PostOffer | None:
        v = self.txn.get(offer_id.encode(), db=self.dbs["offers"])
        return codec.offer.decode(v) if v is not None else None

    def put_offer(self, offer: PostOffer) -> None:
        self.txn.put(offer.offer.encode(), codec.encode(offer), db=self.dbs["offers"])

    def drop_offer(self, offer_id: str) -> None:
        self.txn.delete(offer_id.encode(), db=self.dbs["offers"])

    def task(self, task_id: str) -> TaskState | None:
        v = self.txn.get(task_id.encode(), db=self.dbs["tasks"])
        return codec.task.decode(v) if v is not None else None

    def put_task(self, state: TaskState) -> None:
        self.txn.put(state.post.task.encode(), codec.encode(state), db=self.dbs["tasks"])

    def standing(self, key: str) -> Standing | None:
        v = self.txn.get(key.encode(), db=self.dbs["standing"])
        return codec.standing.decode(v) if v is not None else None

    def put_standing(self, key: str, record: Standing | None) -> None:
        if record is None:
            self.txn.delete(key.encode(), db=self.dbs["standing"])
        else:
            self.txn.put(key.encode(), codec.encode(record), db=self.dbs["standing"])


class LmdbLedger(GroupCommitted):
    """The LMDB ledger. ``durable=False`` skips the sync (for tests of logic, never for real runs);
    ``group=False`` commits one operation per transaction (the benchmark's baseline)."""

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        group: bool = True,
        max_batch: int = 4096,
        map_size: int = 1 << 34,
    ) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=16, sync=durable, metasync=durable, max_readers=512)
        try:
            check_length(self.env, path)
        except lmdb.Error:
            self.env.close()
            raise
        self.dbs = {n: self.env.open_db(n.encode()) for n in _DBS}
        self._start_ledger_writer(max_batch if group else 1)
        present = self.accounts()
        for name in SYSTEM_ACCOUNTS:
            if name not in present:
                self.apply(OpenAccount(id=f"open:{name}", account=name, kind="system"))

    # ------------------------------------------------------------------------------------ writes

    def _commit(self, batch: list[Item]) -> None:
        outcomes: list[Receipt | LedgerError] = []
        try:
            with self.env.begin(write=True) as txn:
                view = _TxnView(txn, self.dbs)
                cur = txn.cursor(db=self.dbs["journal"])
                seq = _SEQ.unpack(cur.key())[0] if cur.last() else 0
                now = time.time()
                for op, _ in batch:
                    res = self._apply_one(txn, view, op, seq + 1, now)
                    outcomes.append(res)
                    if isinstance(res, Receipt) and res.fresh:
                        seq += 1
        except BaseException as exc:
            fail(batch, exc)
            return
        resolve(batch, outcomes)

    def _apply_one(self, txn: lmdb.Transaction, view: _TxnView, op: Op, seq: int, now: float) -> Receipt | LedgerError:
        key = op.id.encode()
        prev = txn.get(key, db=self.dbs["ops"])
        if prev is not None:
            pseq, pat = _OPREF.unpack(prev)
            stored = txn.get(_SEQ.pack(pseq), db=self.dbs["journal"])
            assert stored is not None, f"invariant: op {op.id} indexed at seq {pseq} with no journal entry"
            first = codec.entry.decode(stored)
            if first.op != op:
                return LedgerError("conflict", f"op id `{op.id}` was already used for another operation")
            return Receipt(op.id, pseq, pat, fresh=False)
        try:
            rules.apply(view, op)
        except LedgerError as exc:
            return exc
        txn.put(_SEQ.pack(seq), codec.encode(JournalEntry(seq, now, op)), db=self.dbs["journal"], append=True)
        txn.put(key, _OPREF.pack(seq, now), db=self.dbs["ops"])
        return Receipt(op.id, seq, now)

    def _close_store(self) -> None:
        self.env.close()

    def compact(self, horizon: float, chunk: int = 2_000) -> LedgerCompaction:
        """Fold the journal's entries applied before ``horizon`` (a UNIX time) into the checkpoint,
        deleting them with their op ids and usage records; the last entry always stays, so that seqs
        keep counting from it. A journal that does not replay onto the checkpoint is not folded
        (``LedgerError``: run ``admin check``).

        ``chunk`` entries at a time: each is read and replayed in a read transaction (the group commits
        go on meanwhile: journal entries never change once written), then deleted in one short write
        transaction with the new checkpoint, which LMDB serialises with the group commits (the pause it
        makes is the deletion of one chunk, not the fold). A crash leaves the last chunk folded or not,
        never half."""
        folded = usage = 0
        cp = self.checkpoint()
        view = cp.view() if cp is not None else rules.MemoryView()
        while True:
            with self.env.begin() as txn:
                cur = txn.cursor(db=self.dbs["journal"])
                last = _SEQ.unpack(cur.key())[0] if cur.last() else 0
                entries = (codec.entry.decode(v) for v in cur.iternext(keys=False, values=True)) if cur.first() else ()
                taken = fold(view, entries, last, horizon, chunk)
            if not taken:
                break
            new = next_checkpoint(view, cp, taken)
            with self.env.begin(write=True) as txn:
                raw = txn.get(_CHECKPOINT, db=self.dbs["checkpoint"])
                through = codec.checkpoint.decode(raw).through if raw is not None else 0
                if through != (cp.through if cp else 0):
                    raise LedgerError("conflict", "another compaction folded the journal meanwhile (retry)")
                for entry in taken:
                    txn.delete(_SEQ.pack(entry.seq), db=self.dbs["journal"])
                    txn.delete(entry.op.id.encode(), db=self.dbs["ops"])
                    if isinstance(entry.op, RecordUsage):
                        usage += txn.delete(entry.op.task_id.encode(), db=self.dbs["usage"])
                txn.put(_CHECKPOINT, codec.encode(new), db=self.dbs["checkpoint"])
            folded += len(taken)
            cp = new
        return LedgerCompaction(folded, usage, cp.through if cp is not None else 0)

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint the journal's folded entries left, or None if none were folded."""
        with self.env.begin() as txn:
            raw = txn.get(_CHECKPOINT, db=self.dbs["checkpoint"])
        return codec.checkpoint.decode(raw) if raw is not None else None

    # ------------------------------------------------------------------------------------- reads

    def balance(self, account: str, asset: Asset) -> int:
        """One balance; ``LedgerError`` if the account does not exist."""
        with self.env.begin() as txn:
            # A balance is kept only for an account (never removed): when there is one, that is one read.
            v = txn.get(_bkey(account, asset), db=self.dbs["balances"])
            if v is not None:
                return int(_I64.unpack(v)[0])
            if _TxnView(txn, self.dbs).account_kind(account) is None:
                raise LedgerError("unknown_account", f"no account `{account}`")
            return 0

    # The reads for the event loop are the synchronous ones: an LMDB read is a few microseconds of
    # memory-mapped lookups, cheaper than any cache or hand-off to a thread would be.

    async def holdings_async(self, account: str, *, fresh: bool = False) -> dict[str, int]:
        """Every non-zero balance of ``account``; ``LedgerError`` if it does not exist."""
        with self.env.begin() as txn:
            if _TxnView(txn, self.dbs).account_kind(account) is None:
                raise LedgerError("unknown_account", f"no account `{account}`")
            cur = txn.cursor(db=self.dbs["balances"])
            prefix = f"{account}\x00".encode()
            out: dict[str, int] = {}
            if cur.set_range(prefix):
                for k, v in cur:
                    if not bytes(k).startswith(prefix):
                        break
                    out[bytes(k)[len(prefix) :].decode()] = _I64.unpack(v)[0]
            return out

    async def balance_async(self, account: str, asset: Asset, *, fresh: bool = False) -> int:
        """One balance; ``LedgerError`` if the account does not exist."""
        return self.balance(account, asset)

    async def accounts_async(self) -> dict[str, AccountKind]:
        """Every account and its kind."""
        return self.accounts()

    def balances(self) -> dict[str, dict[str, int]]:
        """Every non-zero balance, from one snapshot."""
        out: dict[str, dict[str, int]] = {}
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.dbs["balances"]):
                account, asset = bytes(k).decode().split("\x00")
                out.setdefault(account, {})[asset] = _I64.unpack(v)[0]
        return out

    def accounts(self) -> dict[str, AccountKind]:
        """Every account and its kind."""
        with self.env.begin() as txn:
            return {
                bytes(k).decode(): bytes(v).decode()  # type: ignore[misc]
                for k, v in txn.cursor(db=self.dbs["accounts"])
            }

    def supply(self) -> dict[str, tuple[int, int]]:
        """Per asset: (minted, burned)."""
        with self.env.begin() as txn:
            return {bytes(k).decode(): _SUPPLY.unpack(v) for k, v in txn.cursor(db=self.dbs["supply"])}

    def usage(self, task_id: str) -> RecordUsage | None:
        """The usage record of one task."""
        with self.env.begin() as txn:
            v = txn.get(task_id.encode(), db=self.dbs["usage"])
            return codec.usage.decode(v) if v is not None else None

    def usage_records(self) -> Iterator[RecordUsage]:
        """Every usage record (from one snapshot)."""
        with self.env.begin() as txn:
            records = [codec.usage.decode(v) for _, v in txn.cursor(db=self.dbs["usage"])]
        yield from records

    def buckets(self, agent: str) -> dict[str, BucketState]:
        """The persisted bucket levels of an agent."""
        with self.env.begin() as txn:
            v = txn.get(agent.encode(), db=self.dbs["buckets"])
            return codec.buckets.decode(v) if v is not None else {}

    def offers(self) -> list[PostOffer]:
        """Every open offer, by offer id (from one snapshot)."""
        with self.env.begin() as txn:
            return [codec.offer.decode(v) for _, v in txn.cursor(db=self.dbs["offers"])]

    async def offers_async(self, limit: int | None = None) -> list[PostOffer]:
        """Every open offer, the first ``limit`` by id (an LMDB read does not block the loop for long)."""
        with self.env.begin() as txn:
            found = zip(range(limit if limit is not None else 1 << 62), txn.cursor(db=self.dbs["offers"]), strict=False)
            return [codec.offer.decode(v) for _, (_, v) in found]

    async def offer_async(self, offer_id: str) -> PostOffer | None:
        """One open offer, or None."""
        with self.env.begin() as txn:
            return _TxnView(txn, self.dbs).offer(offer_id)

    def tasks(self) -> list[TaskState]:
        """Every posted task and who was paid for it, by task id (from one snapshot)."""
        with self.env.begin() as txn:
            return [codec.task.decode(v) for _, v in txn.cursor(db=self.dbs["tasks"])]

    def standing(self) -> list[Standing]:
        """Every standing trigger and sponsorship, by key (from one snapshot)."""
        with self.env.begin() as txn:
            return [codec.standing.decode(v) for _, v in txn.cursor(db=self.dbs["standing"])]

    def journal(self, since: int = 0) -> Iterator[JournalEntry]:
        """Journal entries after ``since``, in order, read in pages so a long journal streams."""
        while True:
            page: list[JournalEntry] = []
            with self.env.begin() as txn:
                cur = txn.cursor(db=self.dbs["journal"])
                if not cur.set_range(_SEQ.pack(since + 1)):
                    return
                for _, v in cur:
                    page.append(codec.entry.decode(v))
                    if len(page) == 1000:
                        break
            if not page:
                return
            yield from page
            since = page[-1].seq
