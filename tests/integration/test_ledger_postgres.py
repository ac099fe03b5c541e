"""What only the PostgreSQL ledger has: several nodes (processes) writing one ledger, opening it at
once, losing their connection, bad URLs, and the operator commands against a database.

The semantics every backend shares (refusals, replays, the bank, SIGKILL) are in test_ledger.py, which
runs against PostgreSQL too.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import msgspec
import psycopg
import pytest

from runtime.economy.buckets import BucketState
from runtime.economy.ledger import LedgerError, Mint, Op, OpenAccount, Receipt, RecordUsage, Transfer
from runtime.economy.ledger.check import check
from runtime.economy.ledger.open import NoLedger, open_ledger
from runtime.economy.ledger.postgres import _APPEND, _LOCK, WRITER_NAME, PostgresLedger, _BatchView
from runtime.economy.ledger.rules import MemoryView
from runtime.economy.ledger.rules import apply as apply_rule
from runtime.host.postgres import DatabaseUnavailable
from tests.harness import ROOT, reap, together
from tests.integration.ledger_bank_client import ENOUGH_FRESH, Summary
from tests.integration.ledger_crash_writer import ACCOUNTS, FUNDS, fund_bank
from tests.services import create_database, drop_database


@pytest.mark.slow
def test_bank_workload_in_two_processes_on_one_database(pg_url: str) -> None:
    """Two OS processes, each its own PostgresLedger (as two nodes), transfer concurrently among the
    same accounts; a third reads snapshots meanwhile. Nothing is lost or made up, and the one journal
    both wrote replays exactly to the balances."""
    total = FUNDS * len(ACCOUNTS)
    with PostgresLedger(pg_url) as led:
        fund_bank(led)
        base = sum(1 for _ in led.journal())
    cmd = [sys.executable, "-m", "tests.integration.ledger_bank_client", pg_url, "--seconds", "4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [*cmd, "--client", str(k)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        with PostgresLedger(pg_url) as reader_led:
            stop = threading.Event()
            bad: list[object] = []
            reads = 0

            def reader() -> None:
                nonlocal reads
                while not stop.is_set():
                    held = reader_led.balances()
                    if sum(v.get("scrip", 0) for v in held.values()) != total:
                        bad.append(held)
                    reads += 1

            watcher = threading.Thread(target=reader)
            watcher.start()
            try:
                for p in procs:  # both go at once
                    assert p.stdin is not None
                    p.stdin.write(b"go\n")
                    p.stdin.flush()
                outs = [p.communicate(timeout=180) for p in procs]
            finally:
                stop.set()
                watcher.join(30)
    finally:
        reap(procs)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    summaries = [msgspec.json.decode(out.splitlines()[-1], type=Summary) for out, _ in outs]
    assert bad == [] and reads > 10
    for s in summaries:
        assert s.errors == []
        # Each node really worked concurrently, and the workload did what it claims to.
        assert len(s.fresh) > ENOUGH_FRESH and s.refused > 0 and s.replayed > 0, (len(s.fresh), s.refused, s.replayed)

    with PostgresLedger(pg_url) as led:
        report = check(led)
        assert report.ok, report.problems
        entries = list(led.journal(since=base))
        fresh = {op_id: seq for s in summaries for op_id, seq in s.fresh.items()}
        # Exactly the acknowledged transfers are journalled, at the seqs their receipts gave.
        assert {e.op.id: e.seq for e in entries} == fresh
        assert all(isinstance(e.op, Transfer) for e in entries)
        assert [e.seq for e in entries] == list(range(base + 1, base + 1 + len(entries)))
        # The two nodes' batches interleave in the one order (they did not merely take turns once).
        nodes = [e.op.id.split("-")[0] for e in entries]
        assert Counter(nodes) == {"n0": len(summaries[0].fresh), "n1": len(summaries[1].fresh)}
        assert sum(a != b for a, b in itertools.pairwise(nodes)) >= 10
        view = MemoryView()
        for e in led.journal():
            apply_rule(view, e.op)
        assert view.nonzero() == led.balances()
        assert sum(v.get("scrip", 0) for v in led.balances().values()) == total
        assert led.supply()["scrip"] == (total, 0)


def test_nodes_opening_one_database_at_once_share_one_schema_and_system_accounts(pg_url: str) -> None:
    opened: list[PostgresLedger] = []
    barrier = threading.Barrier(4)

    def node() -> None:
        barrier.wait()
        opened.append(PostgresLedger(pg_url, pool_size=1))

    errors = together(node, 4)
    try:
        assert errors == [] and len(opened) == 4
        first = opened[0]
        assert first.accounts() == {"mint": "system", "treasury": "system"}
        assert [e.op.id for e in first.journal()] in (["open:mint", "open:treasury"], ["open:treasury", "open:mint"])
        # Every node writes into the same ledger and sees the others' writes.
        for k, led in enumerate(opened):
            led.apply(OpenAccount(id=f"o{k}", account=f"agent{k}", grants={"scrip": 10}))
        assert all(led.balances() == {f"agent{k}": {"scrip": 10} for k in range(4)} for led in opened)
        assert check(first).ok
    finally:
        for led in opened:
            led.close()


def test_a_lost_writer_connection_is_replaced_and_the_batch_applied_once(pg_url: str) -> None:
    with PostgresLedger(pg_url) as led:
        led.apply(OpenAccount(id="o", account="alice", grants={"scrip": 100}))
        led.apply(OpenAccount(id="o2", account="bob"))
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (WRITER_NAME,),
            ).fetchall()
            assert killed == [(True,)]
            # The writer finds out when it next uses the connection, and retries on a new one.
            receipt = led.apply(Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=30))
            assert receipt.fresh
            count = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
                (WRITER_NAME,),
            ).fetchone()
            assert count == (1,)
        assert led.apply(Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=30)).fresh is False
        assert led.balances() == {"alice": {"scrip": 70}, "bob": {"scrip": 30}}
        assert check(led).ok


def test_the_batch_view_reads_on_demand_what_the_preload_missed(pg_url: str) -> None:
    """The per-batch preload is an optimisation: a view given nothing still reads every row it needs."""
    levels = {"cpu": BucketState(1.0, 2.0)}
    with PostgresLedger(pg_url) as led:
        led.apply(OpenAccount(id="o", account="alice", grants={"scrip": 5}))
        led.apply(RecordUsage(id="u", task_id="t1", agent="alice", kind="x", ok=True, cpu_seconds=1, buckets=levels))
    with psycopg.connect(pg_url, autocommit=True) as conn, conn.transaction():
        view = _BatchView(conn)
        assert view.account_kind("alice") == "agent" and view.account_kind("ghost") is None
        assert view.balance("alice", "scrip") == 5 and view.balance("alice", "cpu_rate") == 0
        assert view.supply("scrip") == (5, 0)
        assert view.has_usage("t1") and not view.has_usage("t2")
        view.put_buckets("alice", {"llm_tokens": BucketState(3.0, 4.0)})
        view.flush()
    with PostgresLedger(pg_url) as led:
        assert led.buckets("alice") == {**levels, "llm_tokens": BucketState(3.0, 4.0)}


# ------------------------------------------------------------------------------- optimistic batches


def _as_another_node(conn: psycopg.Connection[tuple[object, ...]], op: Op, at: float | None = None) -> int:
    """Apply ``op`` on ``conn``, in its transaction (which holds the ledger lock), as another node's batch
    writes it; return its journal seq."""
    view = _BatchView(conn)
    apply_rule(view, op)
    view.flush()
    rows = conn.execute(_APPEND, (at or time.time(), [op.id], [msgspec.msgpack.encode(op)])).fetchall()
    seq = rows[0][0]
    assert isinstance(seq, int)
    return seq


def _between_read_and_lock(
    pg_url: str, led: PostgresLedger, op: Op, other: Callable[[psycopg.Connection[tuple[object, ...]]], object]
) -> Future[Receipt]:
    """Submit ``op`` while holding the ledger lock; once the writer has read its batch and waits for the
    lock, run ``other`` in the lock's transaction and commit it: another node's batch committed between
    this batch's reads and its writes."""
    with psycopg.connect(pg_url) as holder, psycopg.connect(pg_url, autocommit=True) as watcher:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        fut = led.submit(op)
        deadline = time.monotonic() + 30
        while watcher.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            (WRITER_NAME,),
        ).fetchone() != (1,):
            assert time.monotonic() < deadline and not fut.done(), "the writer never waited for the lock"
            time.sleep(0.01)
        other(holder)
        holder.commit()
    return fut


def _replays_to_its_balances(led: PostgresLedger) -> None:
    assert check(led).ok
    entries = list(led.journal())
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    view = MemoryView()
    for e in entries:
        apply_rule(view, e.op)
    assert view.nonzero() == led.balances()


def test_a_batch_whose_reads_changed_before_the_lock_runs_again_holding_it(pg_url: str) -> None:
    """Another node spends alice's scrip between this node's read and its lock: the check under the
    lock fails, nothing is written, and the batch runs again under the lock, which refuses the
    overdraft (without the check it would have written alice's balance from the stale read)."""
    with PostgresLedger(pg_url) as led:
        for name, scrip in (("alice", 100), ("bob", 0), ("carol", 0)):
            led.apply(OpenAccount(id=f"o-{name}", account=name, grants={"scrip": scrip} if scrip else {}))
        spend = Transfer(id="elsewhere", src="alice", dst="carol", asset="scrip", amount=50)
        fut = _between_read_and_lock(
            pg_url, led, Transfer(id="here", src="alice", dst="bob", asset="scrip", amount=80),
            lambda conn: _as_another_node(conn, spend),
        )  # fmt: skip
        with pytest.raises(LedgerError, match="has 50 scrip, cannot transfer 80") as refused:
            fut.result(timeout=30)
        assert refused.value.code == "overdraft"
        assert led.retried == 1
        assert led.balances() == {"alice": {"scrip": 50}, "carol": {"scrip": 50}}
        _replays_to_its_balances(led)
        # The holdings the batch read under the lock are what the node's cache keeps.
        assert led.holdings_cache.get("alice") == {"scrip": 50}


def test_a_batch_commits_after_another_nodes_entry_when_what_it_read_still_holds(pg_url: str) -> None:
    """A disjoint batch of another node committed meanwhile: no retry, and this batch's entry is numbered
    after it and stamped no earlier (the other node's clock runs ahead)."""
    with PostgresLedger(pg_url) as led:
        for name in ("alice", "bob", "dave", "erin"):
            led.apply(OpenAccount(id=f"o-{name}", account=name, grants={"scrip": 10}))
        ahead = time.time() + 1000
        seqs: list[int] = []
        fut = _between_read_and_lock(
            pg_url, led, Transfer(id="here", src="alice", dst="bob", asset="scrip", amount=3),
            lambda conn: seqs.append(
                _as_another_node(conn, Transfer(id="there", src="dave", dst="erin", asset="scrip", amount=4), ahead)
            ),
        )  # fmt: skip
        receipt = fut.result(timeout=30)
        assert led.retried == 0
        assert receipt.fresh and receipt.seq == seqs[0] + 1 and receipt.at == ahead
        assert led.balances() == {
            "alice": {"scrip": 7},
            "bob": {"scrip": 13},
            "dave": {"scrip": 6},
            "erin": {"scrip": 14},
        }
        _replays_to_its_balances(led)


def test_an_op_id_another_node_journalled_meanwhile_comes_back_as_its_replay(pg_url: str) -> None:
    """Two nodes submit the same operation (a retry after a crash): the one that loses the race is
    refused by the journal's unique op id, runs again under the lock and gets the first receipt; the
    transfer is made once."""
    with PostgresLedger(pg_url) as led:
        led.apply(OpenAccount(id="o-alice", account="alice", grants={"scrip": 100}))
        led.apply(OpenAccount(id="o-bob", account="bob"))
        op = Transfer(id="task-7", src="alice", dst="bob", asset="scrip", amount=30)
        seqs: list[int] = []
        fut = _between_read_and_lock(pg_url, led, op, lambda conn: seqs.append(_as_another_node(conn, op)))
        receipt = fut.result(timeout=30)
        assert led.retried == 1
        assert not receipt.fresh and receipt.seq == seqs[0]
        assert led.balances() == {"alice": {"scrip": 70}, "bob": {"scrip": 30}}
        _replays_to_its_balances(led)


def test_nodes_contending_on_the_same_accounts_retry_quietly(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Three optimistic nodes, eight threads each, transferring among the same eight accounts: batches
    conflict and run again under the lock, every transfer is made once, and nothing is logged (a
    conflict aborted the rest of its pipeline, and leaving it logged psycopg's "error ignored
    terminating … pipeline aborted" warning)."""
    accounts = [f"a{i}" for i in range(8)]
    with PostgresLedger(pg_url) as led:
        for a in accounts:
            led.apply(OpenAccount(id=f"o-{a}", account=a, grants={"scrip": 10_000}))
    nodes = [PostgresLedger(pg_url, optimistic=True) for _ in range(3)]
    try:
        with caplog.at_level("WARNING", logger="psycopg"):

            def client(k: int, t: int) -> None:
                pairs = itertools.cycle(itertools.permutations(accounts[t % 4 :], 2))
                for n in range(150):
                    src, dst = next(pairs)
                    nodes[k].apply(Transfer(id=f"{k}-{t}-{n}", src=src, dst=dst, asset="scrip", amount=1))

            threads = [threading.Thread(target=client, args=(k, t)) for k in range(3) for t in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        assert sum(node.retried for node in nodes) > 0, "no conflict happened: the test shows nothing"
        assert [r.getMessage() for r in caplog.records] == []
    finally:
        for node in nodes:
            node.close()
    with PostgresLedger(pg_url) as led:
        assert sum(1 for e in led.journal() if isinstance(e.op, Transfer)) == 3 * 8 * 150
        assert sum(h.get("scrip", 0) for h in led.balances().values()) == 8 * 10_000
        _replays_to_its_balances(led)


def test_a_writer_alone_takes_its_own_rows_and_the_check_catches_what_changed_behind_it(pg_url: str) -> None:
    """A writer that is alone reuses the rows its last batches left instead of reading them; a change no
    batch made (an operator's SQL) makes the check fail, and the batch runs again on what is stored."""
    with PostgresLedger(pg_url) as led:
        led.apply(OpenAccount(id="o-a", account="alice", grants={"scrip": 100}))
        led.apply(OpenAccount(id="o-b", account="bob"))
        led.apply(Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=10))
        assert led.retried == 0
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE ledger_balances SET amount = 40 WHERE account = 'alice'")
        with pytest.raises(LedgerError, match="has 40 scrip, cannot transfer 50"):
            led.apply(Transfer(id="t2", src="alice", dst="bob", asset="scrip", amount=50))
        assert led.retried == 1
        led.apply(Transfer(id="t3", src="alice", dst="bob", asset="scrip", amount=30))
        assert led.balances() == {"alice": {"scrip": 10}, "bob": {"scrip": 40}}


def test_the_locked_path_applies_a_batch_as_the_optimistic_one_does(pg_url: str) -> None:
    """``optimistic=False`` (the benchmarks' baseline) keeps every rule as the optimistic writer does: in
    one batch a repeat of an op id gets the first's receipt, another op under that id and an overdraft
    are refused; a batch of refusals alone is refused too."""
    batch: list[Op] = [
        Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=4),
        Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=4),
        Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=5),
        Transfer(id="t2", src="alice", dst="bob", asset="scrip", amount=7),
    ]
    outcomes = []
    second = create_database()
    try:
        for url, optimistic in ((pg_url, True), (second, False)):
            with PostgresLedger(url, optimistic=optimistic) as led:
                led.apply(OpenAccount(id="o-a", account="alice", grants={"scrip": 10}))
                led.apply(OpenAccount(id="o-b", account="bob"))
                hold = led.hold()
                first = led.submit(OpenAccount(id="o-c", account="carol"))
                assert hold.waiting.wait(10)
                futures = [led.submit(op) for op in batch]  # queued behind the held one: one batch
                hold.release()
                first.result(timeout=30)
                got: list[tuple[int, bool] | str] = []
                for f in futures:
                    try:
                        r = f.result(timeout=30)
                        got.append((r.seq, r.fresh))
                    except LedgerError as exc:
                        got.append(exc.code)
                with pytest.raises(LedgerError, match="cannot transfer 1000"):
                    led.apply(Transfer(id="t3", src="bob", dst="alice", asset="scrip", amount=1000))
                assert hold.sizes == [1, len(batch), 1] and led.retried == 0
                outcomes.append(got)
                assert led.balances() == {"alice": {"scrip": 6}, "bob": {"scrip": 4}}
                _replays_to_its_balances(led)
    finally:
        drop_database(second)
    assert outcomes[0] == outcomes[1] == [(6, True), (6, False), "conflict", "overdraft"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_bad_url_or_an_absent_server_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable, match="is not a PostgreSQL URL"):
        PostgresLedger("sqlite:///ledger.db")
    with pytest.raises(DatabaseUnavailable, match=r"no PostgreSQL server answered within 1 s"):
        PostgresLedger(f"postgresql://agent:pw@127.0.0.1:{_free_port()}/eco", connect_deadline_s=1.0)


# ------------------------------------------------------------------------------------ operator commands


def _admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "POSTGRES_URL"}
    return subprocess.run(
        [sys.executable, "-m", "runtime.admin", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_admin_ledger_commands_read_a_postgres_ledger(pg_url: str, tmp_path: Path) -> None:
    empty = _admin("--data-dir", str(tmp_path), "--postgres", pg_url, "check")
    assert empty.returncode == 2 and "no ledger in the database" in empty.stderr, empty.stderr
    with PostgresLedger(pg_url) as led:
        led.apply(OpenAccount(id="o-a", account="alice", grants={"scrip": 100}))
        led.apply(OpenAccount(id="o-b", account="bob"))
        led.apply(Transfer(id="t", src="alice", dst="bob", asset="scrip", amount=40))
        led.apply(Mint(id="m", account="bob", asset="cpu_rate", amount=7, reason="grant"))
        led.apply(RecordUsage(id="u", task_id="task-1", agent="bob", kind="think", ok=True, cpu_seconds=0.5))

    # The URL from the flag, or from $POSTGRES_URL; the data directory is not looked at.
    for how in (["--postgres", pg_url], []):
        env = None if how else {"POSTGRES_URL": pg_url}
        balances = _admin("--data-dir", str(tmp_path / "nowhere"), *how, "balances", env=env)
        assert balances.returncode == 0, balances.stderr
        rows = {line.split()[0]: line.split() for line in balances.stdout.splitlines()[1:]}
        assert rows["alice"][2] == "60" and rows["bob"][2] == "40" and rows["bob"][3] == "7"
        assert rows["supply"][1:3] == ["100", "7"]
    journal = _admin("--postgres", pg_url, "journal", "--since", "2", "--limit", "3")
    entries = [json.loads(line) for line in journal.stdout.splitlines()]
    assert [(e["seq"], e["op"]["id"]) for e in entries] == [(3, "o-a"), (4, "o-b"), (5, "t")]
    ok = _admin("--postgres", pg_url, "check")
    assert ok.returncode == 0 and "all invariants hold" in ok.stdout, ok.stdout

    # Money made up behind the ledger's back is found.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE ledger_balances SET amount = amount + 5 WHERE account = 'alice'")
    bad = _admin("--postgres", pg_url, "check")
    assert bad.returncode == 1 and "VIOLATION: scrip: balances sum to 105" in bad.stdout, bad.stdout

    unreachable = _admin("--postgres", "mysql://nope", "check")
    assert unreachable.returncode == 2 and "is not a PostgreSQL URL" in unreachable.stderr


def test_open_ledger_picks_the_backend_and_refuses_to_invent_one(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(NoLedger, match=str(tmp_path / "ledger")):
        open_ledger(tmp_path, None, create=False)
    with pytest.raises(NoLedger, match="no ledger in the database"):
        open_ledger(tmp_path, pg_url, create=False)
    for url in (None, pg_url):
        led = open_ledger(tmp_path, url)
        try:
            assert isinstance(led, PostgresLedger) == (url is not None)
            led.apply(OpenAccount(id="o", account="alice", grants={"scrip": 3}))
        finally:
            led.close()
        again = open_ledger(tmp_path, url, create=False)
        try:
            assert again.balance("alice", "scrip") == 3
        finally:
            again.close()
