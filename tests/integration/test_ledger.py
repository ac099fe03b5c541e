"""The ledger against real storage: semantics, refusals, a concurrent bank, SIGKILL, and group commit.

Every test takes its ledger from the ``backend`` fixture, parametrized over
``tests.integration.ledger_crash_writer.BACKENDS`` (LMDB on files in ``tmp_path``; PostgreSQL in a test
database named after the path, dropped after the test), and uses only the ``Ledger`` protocol, so both
backends pass the very same tests.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from runtime.economy import ledger as ops
from runtime.economy.buckets import BucketState
from runtime.economy.ledger import Ledger, LedgerError, Op, Receipt
from runtime.economy.ledger.check import check
from runtime.economy.ledger.rules import MemoryView
from runtime.economy.ledger.rules import apply as apply_rule
from tests.crash import kill_mid_write, live_children
from tests.harness import ROOT, closing_all, counting
from tests.integration.ledger_crash_writer import (
    ACCOUNTS,
    BACKENDS,
    FUNDS,
    RIGHTS,
    drop_postgres_databases,
    fund_bank,
    open_ledger,
)

Make = Callable[..., Ledger]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the backend under test; the PostgreSQL databases the test opened are dropped after it
    (this fixture is set up before, so torn down after, the ledgers that use them)."""
    name: str = request.param
    try:
        yield name
    finally:
        drop_postgres_databases()


@pytest.fixture
def make_ledger(backend: str, tmp_path: Path) -> Iterator[Make]:
    """``make(name="ledger", durable=True, group=True)``: a fresh ledger, closed after the test."""

    def make(name: str = "ledger", *, durable: bool = True, group: bool = True) -> Ledger:
        return open_ledger(backend, tmp_path / name, durable=durable, group=group)

    with closing_all(make) as opener:
        yield opener


@pytest.fixture
def ledger(make_ledger: Make) -> Ledger:
    """A fresh durable, group-committing ledger."""
    return make_ledger()


def snapshot(led: Ledger) -> tuple[Any, ...]:
    """Everything an operation could change, to prove that a refused or replayed one changed nothing."""
    return (
        led.balances(),
        led.supply(),
        led.accounts(),
        len(list(led.journal())),
        sorted(msgspec.json.encode(r) for r in led.usage_records()),
    )


def journal_len(led: Ledger) -> int:
    """Number of journal entries."""
    return sum(1 for _ in led.journal())


def replay(led: Ledger) -> MemoryView:
    """The journal replayed from empty by the shared rule book."""
    view = MemoryView()
    for entry in led.journal():
        apply_rule(view, entry.op)
    return view


def open_and_fund(led: Ledger, funds: dict[str, int]) -> None:
    """Open agent accounts and mint their scrip (op ids derived from the names)."""
    for account, amount in funds.items():
        led.apply(ops.OpenAccount(id=f"open-{account}", account=account))
        if amount:
            led.apply(ops.Mint(id=f"fund-{account}", account=account, asset="scrip", amount=amount, reason="test"))


def xfer(op_id: str, src: str, dst: str, amount: Any, asset: Any = "scrip") -> ops.Transfer:
    """A transfer, built directly in Python (no validation by msgspec at construction)."""
    return ops.Transfer(id=op_id, src=src, dst=dst, asset=asset, amount=amount)


# ------------------------------------------------------------------------------------------- basics


def test_a_new_ledger_has_only_the_system_accounts(ledger: Ledger) -> None:
    assert ledger.accounts() == {"mint": "system", "treasury": "system"}
    assert ledger.balances() == {}
    assert all(v == (0, 0) for v in ledger.supply().values())
    assert check(ledger).ok


def test_open_mint_transfer_burn(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 100, "bob": 0})
    assert ledger.accounts() == {"mint": "system", "treasury": "system", "alice": "agent", "bob": "agent"}
    ledger.apply(xfer("t1", "alice", "bob", 30))
    ledger.apply(ops.Burn(id="b1", account="bob", asset="scrip", amount=10, reason="fee"))
    assert ledger.balances() == {"alice": {"scrip": 70}, "bob": {"scrip": 20}}
    assert ledger.balance("alice", "scrip") == 70
    assert ledger.balance("bob", "cpu_rate") == 0
    assert ledger.supply()["scrip"] == (100, 10)
    # Moving everything out leaves a zero balance, which balances() omits.
    ledger.apply(xfer("t2", "bob", "alice", 20))
    assert ledger.balances() == {"alice": {"scrip": 90}}
    assert ledger.balance("bob", "scrip") == 0
    with pytest.raises(LedgerError) as err:
        ledger.balance("ghost", "scrip")
    assert err.value.code == "unknown_account" and "ghost" in str(err.value)
    report = check(ledger)
    assert report.ok, report.problems
    assert report.accounts == 4 and report.journal_entries == journal_len(ledger) == 2 + 3 + 3


def test_the_reads_for_the_event_loop_agree_with_the_synchronous_ones(ledger: Ledger) -> None:
    ledger.apply(ops.OpenAccount(id="o1", account="alice", grants={"scrip": 100, "disk_quota": 1000}))
    ledger.apply(ops.OpenAccount(id="o2", account="bob"))
    ledger.apply(ops.Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=30))

    async def body() -> None:
        for fresh in (False, True):
            assert await ledger.holdings_async("alice", fresh=fresh) == {"scrip": 70, "disk_quota": 1000}
            assert await ledger.holdings_async("bob", fresh=fresh) == ledger.balances()["bob"]
            assert await ledger.balance_async("bob", "scrip", fresh=fresh) == ledger.balance("bob", "scrip")
            assert await ledger.balance_async("bob", "cpu_rate", fresh=fresh) == 0
            with pytest.raises(LedgerError) as err:
                await ledger.holdings_async("ghost", fresh=fresh)
            assert err.value.code == "unknown_account"
        assert await ledger.accounts_async() == ledger.accounts()
        # An operation of this ledger is seen by the next read, cached or not.
        await asyncio.wrap_future(ledger.submit(ops.Transfer(id="t2", src="bob", dst="alice", asset="scrip", amount=5)))
        assert await ledger.balance_async("alice", "scrip") == 75
        assert await ledger.balance_async("bob", "scrip") == 25

    asyncio.run(body())


def test_opening_an_existing_account_again_is_refused(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 5})
    before = snapshot(ledger)
    for op in (
        ops.OpenAccount(id="again", account="alice"),
        ops.OpenAccount(id="as-system", account="alice", kind="system"),
        ops.OpenAccount(id="mint-as-agent", account="mint"),
        ops.OpenAccount(id="regrant", account="alice", grants={"scrip": 10}),
    ):
        with pytest.raises(LedgerError) as err:
            ledger.apply(op)
        assert err.value.code == "conflict" and f"`{op.account}`" in str(err.value)
    assert snapshot(ledger) == before


def test_an_account_is_opened_with_its_grants_in_one_operation(ledger: Ledger) -> None:
    base = journal_len(ledger)
    ledger.apply(ops.OpenAccount(id="o-a", account="alice", grants={"scrip": 100, "cpu_rate": 5, "llm_rate": 0}))
    assert ledger.balances() == {"alice": {"scrip": 100, "cpu_rate": 5}}
    assert ledger.supply()["scrip"] == (100, 0) and ledger.supply()["cpu_rate"] == (5, 0)
    assert journal_len(ledger) == base + 1
    assert check(ledger).ok


def test_set_quota_up_and_down_mints_and_burns_the_difference(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 0, "bob": 0})
    ledger.apply(ops.SetQuota(id="q1", account="alice", asset="disk_quota", amount=1000))
    assert ledger.balance("alice", "disk_quota") == 1000
    assert ledger.supply()["disk_quota"] == (1000, 0)
    ledger.apply(ops.SetQuota(id="q2", account="alice", asset="disk_quota", amount=400))
    assert ledger.balance("alice", "disk_quota") == 400
    assert ledger.supply()["disk_quota"] == (1000, 600)
    ledger.apply(ops.SetQuota(id="q3", account="bob", asset="disk_quota", amount=250))
    ledger.apply(ops.SetQuota(id="q4", account="alice", asset="disk_quota", amount=1500))
    assert ledger.supply()["disk_quota"] == (1000 + 250 + 1100, 600)
    ledger.apply(ops.SetQuota(id="q5", account="alice", asset="disk_quota", amount=0))
    assert ledger.balance("alice", "disk_quota") == 0
    assert ledger.supply()["disk_quota"] == (2350, 2100)
    # Quotas are per asset: memory is untouched by disk, and vice versa.
    ledger.apply(ops.SetQuota(id="q6", account="bob", asset="memory_quota", amount=1 << 30))
    assert ledger.balances() == {"bob": {"disk_quota": 250, "memory_quota": 1 << 30}}
    assert ledger.supply()["memory_quota"] == (1 << 30, 0)
    assert check(ledger).ok


def test_usage_records_and_bucket_levels_are_persisted(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 0, "bob": 0})
    levels = {"cpu": BucketState(level=-0.25, updated=12.5), "llm_tokens": BucketState(400.0, 12.5)}
    rec = ops.RecordUsage(
        id="u1",
        task_id="task-1",
        agent="alice",
        kind="think",
        ok=True,
        cpu_seconds=1.25,
        memory_bytes=1 << 20,
        llm_tokens=300,
        wall_seconds=2.0,
        buckets=levels,
    )
    ledger.apply(rec)
    ledger.apply(ops.RecordUsage(id="u2", task_id="task-2", agent="bob", kind="exec", ok=False, cpu_seconds=0.0))
    assert ledger.usage("task-1") == rec
    assert ledger.usage("task-3") is None
    assert sorted(r.task_id for r in ledger.usage_records()) == ["task-1", "task-2"]
    assert ledger.buckets("alice") == levels
    assert ledger.buckets("bob") == {}  # a record without levels does not invent any
    # ops.SetBuckets replaces the levels it names and keeps the others.
    ledger.apply(ops.SetBuckets(id="s1", agent="alice", buckets={"cpu": BucketState(3.0, 20.0)}))
    assert ledger.buckets("alice") == {"cpu": BucketState(3.0, 20.0), "llm_tokens": BucketState(400.0, 12.5)}
    assert ledger.balances() == {}  # usage is recorded, not charged to balances, by the ledger itself
    report = check(ledger)
    assert report.ok, report.problems
    assert report.usage_records == 2


def test_the_journal_keeps_every_applied_op_in_order(ledger: Ledger) -> None:
    base = journal_len(ledger)
    batch: list[Op] = [
        ops.OpenAccount(id="o-a", account="alice"),
        ops.OpenAccount(id="o-b", account="bob"),
        ops.Mint(id="m", account="alice", asset="scrip", amount=50, reason="grant"),
        ops.Transfer(id="t", src="alice", dst="bob", asset="scrip", amount=20, memo="rent"),
        ops.Burn(id="b", account="bob", asset="scrip", amount=5, reason="tax"),
        ops.SetQuota(id="q", account="bob", asset="memory_quota", amount=64),
        ops.RecordUsage(id="u", task_id="task-9", agent="bob", kind="think", ok=True, cpu_seconds=0.5),
        ops.SetBuckets(id="s", agent="bob", buckets={"cpu": BucketState(1.0, 2.0)}),
    ]
    receipts = [ledger.apply(op) for op in batch]
    entries = list(ledger.journal())
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [e.op for e in entries[base:]] == batch
    assert [(r.op_id, r.seq, r.at) for r in receipts] == [(e.op.id, e.seq, e.at) for e in entries[base:]]
    assert all(r.fresh for r in receipts)
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    assert list(ledger.journal(since=base + 3)) == entries[base + 3 :]
    assert list(ledger.journal(since=len(entries))) == []


def test_replaying_an_op_id_returns_the_first_receipt_and_changes_nothing(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 100, "bob": 0})
    batch: list[Op] = [
        xfer("t1", "alice", "bob", 10),
        ops.Mint(id="m1", account="bob", asset="cpu_rate", amount=3, reason="grant"),
        ops.Burn(id="b1", account="alice", asset="scrip", amount=1, reason="fee"),
        ops.SetQuota(id="q1", account="alice", asset="disk_quota", amount=10),
        ops.RecordUsage(id="u1", task_id="task-1", agent="bob", kind="think", ok=True, cpu_seconds=0.5),
        ops.SetBuckets(id="s1", agent="bob", buckets={"cpu": BucketState(1.0, 2.0)}),
        ops.OpenAccount(id="o1", account="carol"),
    ]
    for op in batch:
        first = ledger.apply(op)
        assert first.fresh and first.op_id == op.id
        later = [ledger.apply(op) for _ in range(3)]  # first after other ops too, below
        assert all(r == Receipt(op.id, first.seq, first.at, fresh=False) for r in later)
    before = snapshot(ledger)
    for op in batch:
        again = ledger.apply(op)
        assert not again.fresh
    # Replays from many threads at once, in one group, are still replays.
    futures = [ledger.submit(op) for op in batch * 20]
    assert not any(f.result().fresh for f in futures)
    assert snapshot(ledger) == before


def test_receipt_sequence_numbers_increase(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 1000, "bob": 0})
    seqs = [ledger.apply(xfer(f"t{i}", "alice", "bob", 1)).seq for i in range(20)]
    assert seqs == sorted(set(seqs))
    futures = [ledger.submit(xfer(f"g{i}", "alice", "bob", 1)) for i in range(200)]
    group = sorted(f.result().seq for f in futures)
    assert group == list(range(seqs[-1] + 1, seqs[-1] + 201))  # unique and without gaps


def test_the_same_op_id_with_other_content_is_a_conflict(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 100, "bob": 0})
    ledger.apply(xfer("t1", "alice", "bob", 10))
    before = snapshot(ledger)
    for other in (
        xfer("t1", "alice", "bob", 11),
        xfer("t1", "bob", "alice", 10),
        ops.Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=10, memo="changed"),
        ops.Mint(id="t1", account="alice", asset="scrip", amount=10, reason="same id, other op"),
    ):
        with pytest.raises(LedgerError) as err:
            ledger.apply(other)
        assert err.value.code == "conflict"
        assert "t1" in str(err.value)
    assert snapshot(ledger) == before


def test_a_refused_op_leaves_its_id_free(ledger: Ledger) -> None:
    """Nothing of a refused op is written, its id included: once funded, the same transfer applies."""
    open_and_fund(ledger, {"alice": 5, "bob": 0})
    with pytest.raises(LedgerError):
        ledger.apply(xfer("t1", "alice", "bob", 10))
    ledger.apply(ops.Mint(id="m", account="alice", asset="scrip", amount=5, reason="top up"))
    assert ledger.apply(xfer("t1", "alice", "bob", 10)).fresh
    assert ledger.balances() == {"bob": {"scrip": 10}}


def test_a_closed_ledger_refuses_writes(make_ledger: Make) -> None:
    led = make_ledger("closing")
    led.apply(ops.OpenAccount(id="o", account="alice"))
    led.close()
    with pytest.raises(LedgerError) as err:
        led.submit(ops.OpenAccount(id="o2", account="bob")).result(timeout=5)
    assert err.value.code == "closed"


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("amount", [0, -5, 1.5, "10", 1 << 63])
@pytest.mark.parametrize("target", [ops.Transfer, Op])
def test_decoding_refuses_a_bad_amount(amount: object, target: Any) -> None:
    raw = {"op": "transfer", "id": "t1", "src": "alice", "dst": "bob", "asset": "scrip", "amount": amount}
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert(raw, target)
    assert "amount" in str(err.value)
    good = dict(raw, amount=10)
    assert msgspec.convert(good, target) == xfer("t1", "alice", "bob", 10)


@pytest.mark.parametrize(
    ("field", "value"),
    [("asset", "gold"), ("src", "Alice"), ("id", "has space"), ("id", ""), ("memo", "x" * 201)],
)
def test_decoding_refuses_bad_fields(field: str, value: object) -> None:
    raw = {"op": "transfer", "id": "t1", "src": "alice", "dst": "bob", "asset": "scrip", "amount": 1}
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert(dict(raw, **{field: value}), Op)
    assert f"$.{field}" in str(err.value)


def test_decoding_refuses_an_unknown_op_and_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert({"op": "steal", "id": "x"}, Op)
    assert "steal" in str(err.value)
    raw = {"op": "transfer", "id": "t1", "src": "alice", "dst": "bob", "asset": "scrip", "amount": 1}
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert(dict(raw, fee=5), Op)
    assert "fee" in str(err.value)


# (op, expected error code, substrings the message must contain). Every op is built directly in Python,
# the path by which runtime code submits; the ledger must validate it all the same.
BAD_OPS: list[Any] = [
    pytest.param(xfer("t-zero", "alice", "bob", 0), "invalid", ["amount"], id="transfer-zero"),
    pytest.param(xfer("t-neg", "alice", "bob", -5), "invalid", ["amount"], id="transfer-negative"),
    pytest.param(xfer("t-float", "alice", "bob", 1.5), "invalid", ["amount"], id="transfer-float"),
    pytest.param(xfer("t-str", "alice", "bob", "10"), "invalid", ["amount"], id="transfer-string"),
    pytest.param(xfer("t-huge", "alice", "bob", 1 << 63), "invalid", ["amount"], id="transfer-huge"),
    pytest.param(xfer("t-bool", "alice", "bob", True), "invalid", ["amount"], id="transfer-bool"),
    pytest.param(
        ops.Mint(id="m-zero", account="alice", asset="scrip", amount=0, reason="x"),
        "invalid",
        ["amount"],
        id="mint-zero",
    ),
    pytest.param(
        ops.Burn(id="b-neg", account="alice", asset="scrip", amount=-1, reason="x"),
        "invalid",
        ["amount"],
        id="burn-negative",
    ),
    pytest.param(
        ops.Mint(id="m-noreason", account="alice", asset="scrip", amount=1, reason=""),
        "invalid",
        ["reason"],
        id="mint-without-reason",
    ),
    pytest.param(xfer("t-src", "ghost", "bob", 1), "unknown_account", ["ghost"], id="unknown-src"),
    pytest.param(xfer("t-dst", "alice", "ghost", 1), "unknown_account", ["ghost"], id="unknown-dst"),
    pytest.param(
        ops.Mint(id="m-ghost", account="ghost", asset="scrip", amount=1, reason="x"),
        "unknown_account",
        ["ghost"],
        id="mint-unknown-account",
    ),
    pytest.param(xfer("t-gold", "alice", "bob", 1, asset="gold"), "invalid", ["asset", "gold"], id="asset"),
    pytest.param(xfer("t-over", "alice", "bob", 101), "overdraft", ["alice", "100", "101"], id="overdraft"),
    pytest.param(
        xfer("t-cpu", "alice", "bob", 1, asset="cpu_rate"),
        "overdraft",
        ["alice", "cpu_rate"],
        id="overdraft-0",
    ),
    pytest.param(xfer("t-self", "alice", "alice", 1), "invalid", ["alice", "itself"], id="transfer-to-self"),
    pytest.param(
        ops.Burn(id="b-over", account="alice", asset="scrip", amount=101, reason="x"),
        "overdraft",
        ["alice", "burn", "101"],
        id="burn-more-than-held",
    ),
    pytest.param(
        ops.RecordUsage(id="u-sys", task_id="task-sys", agent="mint", kind="x", ok=True, cpu_seconds=1.0),
        "invalid",
        ["mint", "not an agent"],
        id="usage-for-system-account",
    ),
    pytest.param(
        ops.RecordUsage(id="u-ghost", task_id="task-g", agent="ghost", kind="x", ok=True, cpu_seconds=1.0),
        "unknown_account",
        ["ghost"],
        id="usage-for-unknown-agent",
    ),
    pytest.param(
        ops.RecordUsage(id="u-again", task_id="task-1", agent="alice", kind="x", ok=True, cpu_seconds=1.0),
        "duplicate_usage",
        ["task-1"],
        id="duplicate-usage",
    ),
    pytest.param(
        ops.RecordUsage(id="u-neg", task_id="task-n", agent="alice", kind="x", ok=True, cpu_seconds=-1.0),
        "invalid",
        ["cpu_seconds"],
        id="usage-negative-cpu",
    ),
    pytest.param(
        ops.RecordUsage(id="u-nan", task_id="task-n", agent="alice", kind="x", ok=True, cpu_seconds=math.nan),
        "invalid",
        ["cpu_seconds"],
        id="usage-nan-cpu",
    ),
    pytest.param(
        ops.RecordUsage(id="u-inf", task_id="task-i", agent="alice", kind="x", ok=True, cpu_seconds=math.inf),
        "invalid",
        ["cpu_seconds"],
        id="usage-infinite-cpu",
    ),
    pytest.param(
        ops.SetBuckets(id="s-nan", agent="alice", buckets={"cpu": BucketState(math.nan, 1.0)}),
        "invalid",
        ["level"],
        id="buckets-nan-level",
    ),
    pytest.param(
        ops.SetBuckets(id="s-sys", agent="treasury", buckets={"cpu": BucketState(1.0, 1.0)}),
        "invalid",
        ["treasury", "not an agent"],
        id="buckets-for-system-account",
    ),
    pytest.param(
        ops.SetQuota(id="q-sys", account="treasury", asset="disk_quota", amount=5),
        "invalid",
        ["treasury", "not an agent"],
        id="quota-for-system-account",
    ),
    pytest.param(
        ops.SetQuota(id="q-neg", account="alice", asset="disk_quota", amount=-5),
        "invalid",
        ["amount"],
        id="quota-negative",
    ),
    pytest.param(
        ops.SetQuota(id="q-scrip", account="alice", asset="scrip", amount=5),  # type: ignore[arg-type]
        "invalid",
        ["asset"],
        id="quota-of-scrip",
    ),
    pytest.param(xfer("has space", "alice", "bob", 1), "invalid", ["id"], id="bad-op-id"),
    pytest.param(ops.OpenAccount(id="o-bad", account="Alice B"), "invalid", ["account"], id="bad-account-name"),
    pytest.param(
        ops.OpenAccount(id="o-sys", account="bank", kind="system"),
        "invalid",
        ["bank", "system"],
        id="unknown-system-principal",
    ),
    pytest.param(
        ops.OpenAccount(id="o-conf", account="bob", kind="system"), "conflict", ["bob"], id="reopen-other-kind"
    ),
    pytest.param(
        ops.OpenAccount(id="o-neg", account="carol", grants={"scrip": -1}),
        "invalid",
        ["grants"],
        id="grant-negative",
    ),
    pytest.param(
        ops.OpenAccount(id="o-gold", account="carol", grants={"gold": 1}),  # type: ignore[dict-item]
        "invalid",
        ["grants"],
        id="grant-unknown-asset",
    ),
    pytest.param(
        ops.Transfer(id="t-memo", src="alice", dst="bob", asset="scrip", amount=1, memo="m" * 201),
        "invalid",
        ["memo"],
        id="memo-too-long",
    ),
]


@pytest.mark.parametrize(("op", "code", "words"), BAD_OPS)
def test_the_ledger_refuses_bad_ops_and_writes_nothing(ledger: Ledger, op: Op, code: str, words: list[str]) -> None:
    open_and_fund(ledger, {"alice": 100, "bob": 0})
    ledger.apply(ops.RecordUsage(id="u-first", task_id="task-1", agent="alice", kind="x", ok=True, cpu_seconds=1))
    before = snapshot(ledger)
    for attempt in (ledger.apply, lambda o: ledger.submit(o).result(timeout=10)):
        with pytest.raises(LedgerError) as err:
            attempt(op)
        assert err.value.code == code, str(err.value)
        for word in words:
            assert word in str(err.value), f"{word!r} not in {str(err.value)!r}"
        assert snapshot(ledger) == before
    assert check(ledger).ok


def test_a_refused_op_does_not_disturb_the_others_in_its_group(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 100, "bob": 0})
    batch = [xfer(f"ok{i}", "alice", "bob", 1) for i in range(50)]
    batch[10:10] = [xfer("bad-amount", "alice", "bob", 0), xfer("bad-over", "alice", "bob", 1000)]
    batch[30:30] = [xfer("bad-self", "bob", "bob", 1), xfer("bad-ghost", "ghost", "bob", 1)]
    futures = {op.id: ledger.submit(op) for op in batch}
    for op_id, fut in futures.items():
        if op_id.startswith("bad"):
            assert isinstance(fut.exception(timeout=10), LedgerError)
        else:
            assert fut.result(timeout=10).fresh
    assert ledger.balances() == {"alice": {"scrip": 50}, "bob": {"scrip": 50}}
    assert check(ledger).ok


def test_a_mint_past_the_largest_balance_is_refused_cleanly(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 0, "bob": 0})
    ledger.apply(ops.Mint(id="m1", account="alice", asset="scrip", amount=1 << 62, reason="a lot"))
    before = snapshot(ledger)
    with pytest.raises(LedgerError) as err:
        ledger.apply(ops.Mint(id="m2", account="alice", asset="scrip", amount=1 << 62, reason="too much"))
    assert "scrip" in str(err.value)
    assert snapshot(ledger) == before
    # An innocent op queued right behind the refused one (likely the same group) must still commit.
    bad = ledger.submit(ops.Mint(id="m3", account="alice", asset="scrip", amount=1 << 62, reason="too much"))
    good = ledger.submit(ops.Mint(id="m4", account="bob", asset="cpu_rate", amount=5, reason="fine"))
    assert isinstance(bad.exception(timeout=10), LedgerError)
    assert good.result(timeout=10).fresh


def test_a_cancelled_future_does_not_stop_the_writer(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 0})
    # A caller may give up on a pending op, as an asyncio caller's wait_for timeout on
    # asyncio.wrap_future(submit(op)) does: whatever becomes of that op, the others must go on.
    before = [ledger.submit(ops.OpenAccount(id=f"b{i}", account=f"b{i}")) for i in range(100)]
    queued = ledger.submit(ops.OpenAccount(id="queued", account="queued"))
    # A queued op cannot be withdrawn: cancelling only stops the waiting, the op is still applied.
    assert not queued.cancel()
    after = [ledger.submit(ops.OpenAccount(id=f"a{i}", account=f"a{i}")) for i in range(100)]
    for fut in [*before, queued, *after]:
        assert fut.result(timeout=3).fresh
    assert "queued" in ledger.accounts()

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(ledger.submit(ops.OpenAccount(id="w", account="w"))), 0)

    asyncio.run(give_up())
    assert ledger.apply(ops.OpenAccount(id="last", account="last")).fresh
    assert "w" in ledger.accounts()
    assert check(ledger).ok


def test_a_batch_reaches_an_event_loop_in_one_call_and_a_thread_at_once(ledger: Ledger) -> None:
    hold = ledger.hold()  # type: ignore[attr-defined]  # every backend is a GroupCommitter

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = ledger.submit_async(ops.OpenAccount(id="first", account="first"))
        assert hold.waiting.wait(10)  # the writer holds a batch of one; what follows queues behind it
        waits = [ledger.submit_async(ops.OpenAccount(id=f"l{i}", account=f"l{i}")) for i in range(50)]
        threaded = ledger.submit(ops.OpenAccount(id="thread", account="thread"))
        given_up = ledger.submit_async(ops.OpenAccount(id="gone", account="gone"))
        given_up.cancel()  # only the waiting stops: the op is applied with the rest
        refused = ledger.submit_async(ops.OpenAccount(id="l0", account="other"))
        with counting(loop) as calls:
            hold.release()
            receipts = await asyncio.gather(first, *waits)
            with pytest.raises(LedgerError) as err:
                await refused
        assert err.value.code == "conflict"
        assert threaded.result(timeout=10).fresh and all(r.fresh for r in receipts)
        assert hold.sizes == [1, 53]
        assert calls.count == 2  # one call on the loop per batch, not one per operation

    asyncio.run(main())
    assert {"first", "l49", "thread", "gone"} <= ledger.accounts().keys()
    assert check(ledger).ok


# ----------------------------------------------------------------------------------- bank workload


@pytest.mark.slow
def test_bank_workload_conserves_money_under_concurrency(ledger: Ledger) -> None:
    """Jepsen's bank test: concurrent transfers and replays; every snapshot read sums to the total."""
    accounts = [f"acct{i}" for i in range(10)]
    total = 1000 * len(accounts)
    open_and_fund(ledger, dict.fromkeys(accounts, 1000))
    base = journal_len(ledger)
    stop = threading.Event()
    errors: list[str] = []
    lock = threading.Lock()
    stats = {"fresh": 0, "refused": 0, "replayed": 0, "reads": 0}

    def count(what: str) -> None:
        with lock:
            stats[what] += 1

    def enough() -> bool:
        return stats["fresh"] > 500 and stats["refused"] > 0 and stats["replayed"] > 50 and stats["reads"] > 100

    def client(k: int) -> None:
        rng = random.Random(1000 + k)
        applied: list[tuple[ops.Transfer, Receipt]] = []
        i = 0
        try:
            while not stop.is_set():
                if applied and rng.random() < 0.1:
                    op, first = rng.choice(applied)
                    again = ledger.apply(op)
                    if again != Receipt(op.id, first.seq, first.at, fresh=False):
                        errors.append(f"replay of {op.id} gave {again}, first was {first}")
                    count("replayed")
                    continue
                src, dst = rng.sample(accounts, 2)
                op = xfer(f"bank-{k}-{i}", src, dst, rng.randint(1, 150))
                i += 1
                try:
                    receipt = ledger.apply(op)
                except LedgerError as exc:
                    if exc.code != "overdraft":
                        errors.append(f"{op.id}: unexpected {exc}")
                    count("refused")
                    continue
                if not receipt.fresh:
                    errors.append(f"new op {op.id} was not fresh: {receipt}")
                count("fresh")
                applied.append((op, receipt))
        except Exception as exc:
            errors.append(f"client {k}: {type(exc).__name__}: {exc}")

    def reader() -> None:
        try:
            while not stop.is_set():
                held = ledger.balances()
                scrip = [v.get("scrip", 0) for v in held.values()]
                if sum(scrip) != total or min(scrip, default=0) < 0:
                    errors.append(f"inconsistent snapshot: {held}")
                count("reads")
        except Exception as exc:
            errors.append(f"reader: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    # At least 3 s, and on until the workload did what it claims to (a loaded host does less a second).
    started = time.monotonic()
    while not stop.wait(0.1):
        if (time.monotonic() - started >= 3.0 and enough()) or time.monotonic() - started > 120:
            stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert enough(), stats
    report = check(ledger)
    assert report.ok, report.problems
    entries = list(ledger.journal(since=base))
    assert all(isinstance(e.op, ops.Transfer) for e in entries)
    assert len(entries) == stats["fresh"]
    assert replay(ledger).nonzero() == ledger.balances()
    assert sum(v["scrip"] for v in ledger.balances().values()) == total
    assert ledger.supply()["scrip"] == (total, 0)


# ------------------------------------------------------------------------------------------- offers


def _offer(op_id: str, offer: str, seller: str, amount: int = 100, price: int = 30) -> ops.PostOffer:
    return ops.PostOffer(id=op_id, offer=offer, seller=seller, asset="cpu_rate", amount=amount, price=price)


def _accept(op_id: str, post: ops.PostOffer, buyer: str) -> ops.AcceptOffer:
    return ops.AcceptOffer(
        id=op_id, offer=post.offer, buyer=buyer, asset=post.asset, amount=post.amount, price=post.price
    )


def _trading_floor(ledger: Ledger) -> None:
    ledger.apply(ops.OpenAccount(id="o-alice", account="alice", grants={"scrip": 10, "cpu_rate": 500}))
    ledger.apply(ops.OpenAccount(id="o-bob", account="bob", grants={"scrip": 100}))
    ledger.apply(ops.OpenAccount(id="o-carol", account="carol", grants={"scrip": 100}))


def test_an_accepted_offer_moves_both_sides_in_one_operation(ledger: Ledger) -> None:
    _trading_floor(ledger)
    post = _offer("p1", "sale-1", "alice")
    ledger.apply(post)
    assert ledger.offers() == [post]
    assert asyncio.run(ledger.offers_async()) == [post]
    assert asyncio.run(ledger.offer_async("sale-1")) == post and asyncio.run(ledger.offer_async("x")) is None
    assert asyncio.run(ledger.offers_async(limit=0)) == [] and asyncio.run(ledger.offers_async(limit=1)) == [post]
    # Posting holds nothing back: the seller still has all of it until someone accepts.
    assert ledger.balance("alice", "cpu_rate") == 500
    before = journal_len(ledger)
    receipt = ledger.apply(_accept("a1", post, "bob"))
    assert journal_len(ledger) == before + 1 and receipt.fresh  # one operation, one journal entry
    assert ledger.balances()["alice"] == {"scrip": 40, "cpu_rate": 400}
    assert ledger.balances()["bob"] == {"scrip": 70, "cpu_rate": 100}
    assert ledger.offers() == []
    # The second buyer finds no offer and pays nothing; a replay of the first changes nothing.
    state = snapshot(ledger)
    with pytest.raises(LedgerError) as err:
        ledger.apply(_accept("a2", post, "carol"))
    assert err.value.code == "not_found" and "sale-1" in str(err.value)
    assert not ledger.apply(_accept("a1", post, "bob")).fresh
    assert snapshot(ledger) == state
    report = check(ledger)
    assert report.ok, report.problems


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("buyer_broke", "overdraft"),
        ("seller_sold_out", "overdraft"),
        ("other_terms", "conflict"),
        ("own_offer", "invalid"),
    ],
)
def test_a_refused_acceptance_moves_nothing_and_leaves_the_offer_open(ledger: Ledger, case: str, code: str) -> None:
    _trading_floor(ledger)
    post = _offer("p1", "sale-1", "alice", price=30 if case != "buyer_broke" else 101)
    ledger.apply(post)
    if case == "seller_sold_out":
        ledger.apply(xfer("t1", "alice", "carol", 450, "cpu_rate"))
    accept = _accept("a1", post, "alice" if case == "own_offer" else "bob")
    if case == "other_terms":
        accept = ops.AcceptOffer(id="a1", offer="sale-1", buyer="bob", asset="cpu_rate", amount=100, price=1)
    state = snapshot(ledger)
    with pytest.raises(LedgerError) as err:
        ledger.apply(accept)
    assert err.value.code == code
    assert snapshot(ledger) == state and ledger.offers() == [post]  # no partial fill, nothing held


def test_offers_are_posted_only_by_holders_and_cancelled_only_by_their_seller(ledger: Ledger) -> None:
    _trading_floor(ledger)
    for op, code in [
        (_offer("p0", "x", "bob"), "overdraft"),  # bob holds no cpu_rate
        (ops.PostOffer(id="p0", offer="x", seller="alice", asset="scrip", amount=5, price=5), "invalid"),
    ]:
        with pytest.raises(LedgerError) as err:
            ledger.apply(op)
        assert err.value.code == code
    post = _offer("p1", "sale-1", "alice")
    ledger.apply(post)
    with pytest.raises(LedgerError) as err:
        ledger.apply(_offer("p2", "sale-1", "alice"))
    assert err.value.code == "conflict"
    with pytest.raises(LedgerError) as err:
        ledger.apply(ops.CancelOffer(id="c1", offer="sale-1", seller="bob"))
    assert err.value.code == "forbidden" and ledger.offers() == [post]
    ledger.apply(ops.CancelOffer(id="c2", offer="sale-1", seller="alice"))
    assert ledger.offers() == [] and ledger.balance("alice", "cpu_rate") == 500
    report = check(ledger)
    assert report.ok, report.problems


def test_concurrent_acceptances_fill_an_offer_exactly_once(ledger: Ledger) -> None:
    _trading_floor(ledger)
    buyers = [f"b{i}" for i in range(8)]
    for b in buyers:
        ledger.apply(ops.OpenAccount(id=f"o-{b}", account=b, grants={"scrip": 50}))
    post = _offer("p1", "sale-1", "alice")
    ledger.apply(post)
    # Submitted together: the group commit puts them in one batch, where only the first may win.
    futures = [ledger.submit(_accept(f"a-{b}", post, b)) for b in buyers]
    won = []
    for b, f in zip(buyers, futures, strict=True):
        try:
            f.result()
            won.append(b)
        except LedgerError as exc:
            assert exc.code == "not_found"
    assert len(won) == 1
    assert ledger.balance(won[0], "cpu_rate") == 100 and ledger.balance(won[0], "scrip") == 20
    assert sum(ledger.balance(b, "scrip") for b in buyers) == 50 * len(buyers) - 30
    report = check(ledger)
    assert report.ok, report.problems


def test_a_task_mints_its_reward_for_at_most_max_awards_agents_each_once(ledger: Ledger) -> None:
    open_and_fund(ledger, {"alice": 10, "bob": 10, "carol": 10})
    ledger.apply(ops.PostTask(id="task:t1", task="t1", reward=50, max_awards=2))

    def award(op_id: str, agent: str, cap: int | None = None) -> ops.AwardTask:
        return ops.AwardTask(id=op_id, task="t1", agent=agent, artifact="code", blob="ab" * 20, supply_cap=cap)

    ledger.apply(award("a1", "alice"))
    for op, code in [
        (award("a2", "alice"), "conflict"),  # paid once per agent
        (ops.AwardTask(id="a3", task="nope", agent="bob", artifact="code", blob="ab" * 20), "not_found"),
        (award("a4", "bob", cap=30 + 50 + 49), "capacity"),  # the supply cap binds
    ]:
        with pytest.raises(LedgerError) as err:
            ledger.apply(op)
        assert err.value.code == code
    ledger.apply(award("a5", "bob", cap=30 + 100))
    with pytest.raises(LedgerError) as err:
        ledger.apply(award("a6", "carol"))
    assert err.value.code == "conflict" and "all its 2" in str(err.value)
    assert ledger.balance("alice", "scrip") == ledger.balance("bob", "scrip") == 60
    assert ledger.supply()["scrip"] == (130, 0)
    # Re-posting changes the terms and keeps who was paid.
    ledger.apply(ops.PostTask(id="task:t1:again", task="t1", reward=5, max_awards=3))
    [state] = ledger.tasks()
    assert state.awarded == ["alice", "bob"] and state.post.reward == 5
    report = check(ledger)
    assert report.ok, report.problems


# ------------------------------------------------------------------------------------ crash safety


@pytest.mark.slow
def test_acknowledged_transfers_survive_sigkill(backend: str, tmp_path: Path) -> None:
    rng = random.Random(20261129)
    data = tmp_path / "ledger"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = [sys.executable, "-m", "tests.integration.ledger_crash_writer"]
    acked_all: set[str] = set()
    for rnd in range(20):
        cmd = [*writer, str(data), "--start", str(rnd), "--backend", backend]
        delay = rng.uniform(0.05, 0.6)
        acked = set(kill_mid_write(cmd, env=env, errlog=tmp_path / f"writer-{rnd}.err", delay_s=delay))
        assert acked and all(a.startswith(f"c{rnd}-") for a in acked)
        acked_all |= acked

        led = open_ledger(backend, data)
        try:
            report = check(led)
            assert report.ok, f"round {rnd}: {report.problems}"
            ids = {e.op.id for e in led.journal()}
            missing = acked_all - ids
            assert not missing, f"round {rnd}: {len(missing)} acknowledged ops lost, e.g. {sorted(missing)[:5]}"
            total = FUNDS * len(ACCOUNTS)
            assert led.supply()["scrip"] == (total, 0)
            assert sum(v.get("scrip", 0) for v in led.balances().values()) == total
        finally:
            led.close()
    assert live_children("ledger_crash_writer") == []
    assert len(acked_all) > 20 * 100  # every round really streamed, not just trickled


@pytest.mark.slow
def test_acknowledged_acceptances_survive_sigkill_whole(backend: str, tmp_path: Path) -> None:
    rng = random.Random(20261206)
    data = tmp_path / "ledger"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    acked_all: set[str] = set()
    for rnd in range(8):
        cmd = [sys.executable, "-m", "tests.integration.ledger_crash_writer", str(data), "--start", str(rnd)]
        cmd += ["--backend", backend, "--offers"]
        acked = set(kill_mid_write(cmd, env=env, errlog=tmp_path / f"offers-{rnd}.err", delay_s=rng.uniform(0.05, 0.5)))
        assert acked and all(a.startswith(f"c{rnd}-") for a in acked)
        acked_all |= acked
        led = open_ledger(backend, data)
        try:
            report = check(led)  # balances, supply, and open offers all equal the journal's replay
            assert report.ok, f"round {rnd}: {report.problems}"
            accepted = {e.op.id: e.op for e in led.journal() if isinstance(e.op, ops.AcceptOffer)}
            assert not acked_all - accepted.keys(), "an acknowledged acceptance was lost"
            still_open = {o.offer for o in led.offers()}
            assert not still_open & {op.offer for op in accepted.values()}, "an accepted offer is still open"
            for asset, each in (("scrip", FUNDS), ("cpu_rate", RIGHTS)):
                total = each * len(ACCOUNTS)
                assert led.supply()[asset] == (total, 0)
                assert sum(v.get(asset, 0) for v in led.balances().values()) == total
        finally:
            led.close()
    assert live_children("ledger_crash_writer") == []
    assert len(acked_all) > 8 * 20  # every round really traded


# -------------------------------------------------------------------------------------- group commit


def test_group_commit_is_at_least_3x_faster_than_a_transaction_per_transfer(make_ledger: Make) -> None:
    """What grouping buys grows with what a sync costs: 38× on this host's disk when quiet (``python -m
    benchmarks ledger``, where the 5× target is judged), 3.7× seen here when the syncs were cheap and the
    host busy. The test asserts the margin that holds either way."""
    grouped = make_ledger("grouped", durable=True, group=True)
    single = make_ledger("single", durable=True, group=False)
    for led in (grouped, single):
        fund_bank(led)
        led.apply(xfer("warm-up", "acct0", "acct1", 1))

    def ring(prefix: str, n: int) -> list[ops.Transfer]:
        # Amount 1 around a ring: never an overdraft, so every op costs a real write.
        return [xfer(f"{prefix}{i}", ACCOUNTS[i % 10], ACCOUNTS[(i + 1) % 10], 1) for i in range(n)]

    # Interleaved, five rounds of each: a burst of load on the host falls on both ways alike, where
    # one phase after the other could give it all to one of them.
    receipts: list[Receipt] = []
    grouped_s = single_s = 0.0
    for rnd in range(5):
        batch = ring(f"g{rnd}-", 1000)
        t0 = time.perf_counter()
        futures = [grouped.submit(op) for op in batch]
        receipts += [f.result(timeout=60) for f in futures]
        grouped_s += time.perf_counter() - t0

        batch = ring(f"s{rnd}-", 100)
        t0 = time.perf_counter()
        for op in batch:
            single.apply(op)
        single_s += time.perf_counter() - t0

    assert all(r.fresh for r in receipts) and len({r.seq for r in receipts}) == 5000
    grouped_rate, single_rate = 5000 / grouped_s, 500 / single_s
    assert grouped_rate >= 3 * single_rate, (
        f"group commit {grouped_rate:,.0f}/s vs one transaction per transfer {single_rate:,.0f}/s"
    )
    for led in (grouped, single):
        assert check(led).ok
