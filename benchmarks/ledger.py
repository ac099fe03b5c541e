"""Ledger write throughput: durable transfers per second, LMDB and PostgreSQL group commit against baselines.

Every system runs the same transfer (check both accounts, refuse an overdraft, move the amount, append
the operation to a journal and index its id for idempotency), the embedded ones on files in one
temporary directory on the same disk as the data directory, PostgreSQL in a fresh database on the test
server (``tests.services.ADMIN_URL``; its WAL is on the server's disk). Systems, each measured for a
fixed time:

- ``lmdb-group-threads``: ``LmdbLedger(group=True)``, 64 threads each applying one transfer at a time;
- ``lmdb-group-batches``: the same ledger, one thread keeping two batches of 1,024 futures in flight;
- ``lmdb-group``: the better of the two (what group commit delivers);
- ``lmdb-per-op``: ``LmdbLedger(group=False)``, one durable transaction per transfer, sequential;
- ``postgres-group-threads`` / ``postgres-group-batches`` / ``postgres-group`` / ``postgres-per-op``: the
  same with ``PostgresLedger`` (``synchronous_commit`` on); skipped when no server answers;
- ``postgres-locked-threads``: ``postgres-group-threads`` with ``optimistic=False``, each batch holding
  the ledger lock from its first read (the path before optimistic batches);
- ``sqlite-wal-full`` / ``sqlite-wal-normal``: SQLite in WAL mode with ``synchronous=FULL`` (durable) or
  ``NORMAL`` (a commit can be lost on power failure: listed for reference, marked not durable), one
  transaction per transfer, sequential.

After each run the numbers are checked against the store itself: the journal must hold exactly the
transfers counted, and (for the ledgers) ``runtime.economy.ledger.check`` must pass.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from benchmarks import common
from benchmarks.common import Budget, Options, Skipped, System, closed_loop_threads, measure_each, publish
from runtime.economy.ledger import Ledger, LedgerError, Mint, OpenAccount, Receipt, Transfer
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.economy.ledger.postgres import PostgresLedger
from runtime.host.postgres import DatabaseUnavailable, connect, redact

FULL_S, QUICK_S = 3.0, 1.0
ACCOUNTS = tuple(f"acct{i}" for i in range(100))
#: Enough that no transfer is ever refused: every measured operation is a real write.
FUNDS = 10**12
THREADS = 64
BATCH = 1024
TARGET_VS_SQLITE = 5.0
TARGET_RATE = 20_000
TARGET_POSTGRES_RATE = 2_000
#: A summary row -> the group-commit modes it reports the better of.
GROUP_MODES = {
    "lmdb-group": ("lmdb-group-threads", "lmdb-group-batches"),
    "postgres-group": ("postgres-group-threads", "postgres-group-batches"),
}


class Entry(msgspec.Struct, omit_defaults=True):
    """One system's result."""

    name: str
    transfers_per_s: float
    transfers: int
    seconds: float
    #: Every counted transfer was on disk (fsync'd) before it was counted.
    durable: bool
    describe: str
    #: For a summary row (``lmdb-group``, ``postgres-group``): which of the group-commit modes it reports.
    best_of: str | None = None
    #: CPU of the benchmark's process (its clients and the ledger's writer) per transfer, in µs: steadier
    #: than transfers/s on a shared host, where the load moves the rate more than the code does.
    #: (PostgreSQL's own CPU is not in it.) None for the SQLite rows.
    cpu_us_per_transfer: float | None = None


class Report(common.ReportHead):
    """The JSON file."""

    results: list[Entry]
    skipped: list[Skipped]


@dataclass(frozen=True, slots=True)
class Measured:
    """Transfers counted over the measured interval."""

    transfers: int
    seconds: float
    #: CPU this process used while the load ran (``time.process_time``: every thread), when measured.
    cpu_seconds: float | None = None


class Mismatch(Exception):
    """The store does not hold what the benchmark counted."""


# --------------------------------------------------------------------------- the ledger backends

Opener = Callable[[Path, bool], AbstractContextManager[Ledger]]


def _op(rng: random.Random, op_id: str) -> Transfer:
    src, dst = rng.sample(ACCOUNTS, 2)
    return Transfer(id=op_id, src=src, dst=dst, asset="scrip", amount=rng.randint(1, 100))


def _fund(led: Ledger) -> None:
    futures = [led.submit(OpenAccount(id=f"open-{a}", account=a)) for a in ACCOUNTS]
    futures += [
        led.submit(Mint(id=f"fund-{a}", account=a, asset="scrip", amount=FUNDS, reason="benchmark")) for a in ACCOUNTS
    ]
    for f in futures:
        f.result()


@contextmanager
def _funded(led: Ledger) -> Iterator[Ledger]:
    """``led`` with the benchmark's accounts opened and funded, closed afterwards."""
    try:
        _fund(led)
        yield led
    finally:
        led.close()


@contextmanager
def _lmdb(path: Path, group: bool) -> Iterator[Ledger]:
    """A funded durable LMDB ledger in ``path``."""
    with _funded(LmdbLedger(path, durable=True, group=group)) as led:
        yield led


def _postgres_opener(optimistic: bool) -> Opener:
    """Funded durable PostgreSQL ledgers, each in a database of its own dropped afterwards, whose batches
    are optimistic or hold the ledger lock from their first read (``PostgresLedger(optimistic=...)``)."""

    @contextmanager
    def opened(_path: Path, group: bool) -> Iterator[Ledger]:
        # The test helpers own the server's administrative URL (AECO_TEST_POSTGRES) and the naming.
        from tests.services import create_database, drop_database

        url = create_database()
        try:
            with _funded(PostgresLedger(url, durable=True, group=group, optimistic=optimistic)) as led:
                yield led
        finally:
            drop_database(url)

    return opened


_postgres = _postgres_opener(True)


def cpu_us_per_transfer(m: Measured) -> float | None:
    """This process's CPU per transfer of a run, in µs (None when not measured)."""
    return None if m.cpu_seconds is None or not m.transfers else round(m.cpu_seconds / m.transfers * 1e6, 1)


def _verify(led: Ledger, counted: int) -> None:
    transfers = sum(1 for e in led.journal() if isinstance(e.op, Transfer))
    if transfers != counted:
        raise Mismatch(f"journal holds {transfers} transfers, the benchmark counted {counted}")
    report = check(led)
    if not report.ok:
        raise Mismatch(f"ledger check failed: {report.problems[:3]}")


def _measuring(
    opener: Opener, group: bool, load: Callable[[Ledger, float], tuple[int, float]]
) -> Callable[[Path, float], Measured]:
    """A runner: open a fresh ledger (group-committing or not), put ``load`` on it for the duration (it
    returns the transfers made and the seconds they took), then check the books against that count."""

    def run(path: Path, duration: float) -> Measured:
        with opener(path, group) as led:
            cpu = time.process_time()
            transfers, seconds = load(led, duration)
            measured = Measured(transfers, seconds, time.process_time() - cpu)
            _verify(led, measured.transfers)
            return measured

    return run


def _threads(opener: Opener) -> Callable[[Path, float], Measured]:
    """64 closed-loop clients: each applies one transfer and waits for it to be durable, then the next."""

    def load(led: Ledger, duration: float) -> tuple[int, float]:
        def client(k: int) -> Callable[[], object]:
            rng, ids = random.Random(k), itertools.count()
            return lambda: led.apply(_op(rng, f"t{k}-{next(ids)}"))

        sample = closed_loop_threads([client(k) for k in range(THREADS)], Budget(0, duration, sys.maxsize))
        return sample.round_trips, sample.seconds

    return _measuring(opener, True, load)


def _batches(opener: Opener) -> Callable[[Path, float], Measured]:
    """One thread submitting batches of futures, two batches in flight so the writer never waits."""

    def load(led: Ledger, duration: float) -> tuple[int, float]:
        rng, ids = random.Random(0), itertools.count()
        return common.pipelined_batches(lambda: [led.submit(_op(rng, f"b{next(ids)}")) for _ in range(BATCH)], duration)

    return _measuring(opener, True, load)


def _per_op(opener: Opener) -> Callable[[Path, float], Measured]:
    """One durable transaction per transfer, applied one after another."""

    def load(led: Ledger, duration: float) -> tuple[int, float]:
        rng, n = random.Random(0), 0
        start = now = time.perf_counter()
        deadline = start + duration
        while now < deadline:
            led.apply(_op(rng, f"s{n}"))
            n += 1
            now = time.perf_counter()
        return n, now - start

    return _measuring(opener, False, load)


# ----------------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE accounts (account TEXT PRIMARY KEY, kind TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE balances (
    account TEXT NOT NULL, asset TEXT NOT NULL, amount INTEGER NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (account, asset)
) WITHOUT ROWID;
CREATE TABLE journal (seq INTEGER PRIMARY KEY, at REAL NOT NULL, op BLOB NOT NULL);
CREATE TABLE ops (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, at REAL NOT NULL) WITHOUT ROWID;
"""

_enc = msgspec.msgpack.Encoder()


class SqliteLedger:
    """The same transfer as the LMDB ledger's rule book, in SQL: one transaction per transfer."""

    def __init__(self, path: Path, synchronous: str) -> None:
        # isolation_level=None: the module starts no transactions of its own; we BEGIN and COMMIT.
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={synchronous}")
        self.con.executescript(_SCHEMA)
        with self.con:
            self.con.execute("BEGIN")
            self.con.executemany("INSERT INTO accounts VALUES (?, 'agent')", [(a,) for a in ACCOUNTS])
            self.con.executemany("INSERT INTO balances VALUES (?, 'scrip', ?)", [(a, FUNDS) for a in ACCOUNTS])

    def transfer(self, op: Transfer) -> Receipt:
        """Apply ``op`` durably (as durable as ``synchronous`` makes a commit), or raise ``LedgerError``."""
        cur = self.con.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            prev = cur.execute("SELECT seq, at FROM ops WHERE id = ?", (op.id,)).fetchone()
            if prev is not None:
                (blob,) = cur.execute("SELECT op FROM journal WHERE seq = ?", (prev[0],)).fetchone()
                cur.execute("COMMIT")
                if blob != _enc.encode(op):
                    raise LedgerError("conflict", f"op id `{op.id}` was already used for another operation")
                return Receipt(op.id, prev[0], prev[1], fresh=False)
            if op.src == op.dst:
                raise LedgerError("invalid", f"transfer from `{op.src}` to itself")
            for account in (op.src, op.dst):
                if cur.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone() is None:
                    raise LedgerError("unknown_account", f"no account `{account}`")
            row = cur.execute(
                "SELECT amount FROM balances WHERE account = ? AND asset = ?", (op.src, op.asset)
            ).fetchone()
            have = row[0] if row else 0
            if have < op.amount:
                raise LedgerError("overdraft", f"`{op.src}` has {have} {op.asset}, cannot transfer {op.amount}")
            cur.execute(
                "UPDATE balances SET amount = amount - ? WHERE account = ? AND asset = ?",
                (op.amount, op.src, op.asset),
            )
            cur.execute(
                "INSERT INTO balances VALUES (?, ?, ?) "
                "ON CONFLICT (account, asset) DO UPDATE SET amount = amount + excluded.amount",
                (op.dst, op.asset, op.amount),
            )
            now = time.time()
            cur.execute("INSERT INTO journal (at, op) VALUES (?, ?)", (now, _enc.encode(op)))
            seq = cur.lastrowid
            assert seq is not None
            cur.execute("INSERT INTO ops VALUES (?, ?, ?)", (op.id, seq, now))
            cur.execute("COMMIT")
            return Receipt(op.id, seq, now)
        except BaseException:
            if self.con.in_transaction:
                cur.execute("ROLLBACK")
            raise

    def verify(self, counted: int) -> None:
        """The journal holds every counted transfer, and no scrip was created or lost."""
        (journal,) = self.con.execute("SELECT count(*) FROM journal").fetchone()
        (total,) = self.con.execute("SELECT sum(amount) FROM balances WHERE asset = 'scrip'").fetchone()
        if journal != counted:
            raise Mismatch(f"journal holds {journal} transfers, the benchmark counted {counted}")
        if total != FUNDS * len(ACCOUNTS):
            raise Mismatch(f"scrip sums to {total}, not {FUNDS * len(ACCOUNTS)}")

    def close(self) -> None:
        """Close the connection."""
        self.con.close()


def _sqlite(synchronous: str) -> Callable[[Path, float], Measured]:
    def run(path: Path, duration: float) -> Measured:
        led = SqliteLedger(path / "ledger.sqlite3", synchronous)
        try:
            rng = random.Random(0)
            n = 0
            start = time.perf_counter()
            deadline = start + duration
            now = start
            while now < deadline:
                led.transfer(_op(rng, f"s{n}"))
                n += 1
                now = time.perf_counter()
            measured = Measured(n, now - start)
            led.verify(measured.transfers)
            return measured
        finally:
            led.close()

    return run


# ------------------------------------------------------------------------------------------- main


SYSTEMS = [
    System(
        "lmdb-group-threads",
        f"LmdbLedger(group=True), {THREADS} threads each applying one transfer at a time",
        True,
        _threads(_lmdb),
    ),
    System(
        "lmdb-group-batches",
        f"LmdbLedger(group=True), one thread, two batches of {BATCH:,} futures in flight",
        True,
        _batches(_lmdb),
    ),
    System("lmdb-per-op", "LmdbLedger(group=False), one durable transaction per transfer", True, _per_op(_lmdb)),
    System(
        "postgres-group-threads",
        f"PostgresLedger(group=True), fresh database, {THREADS} threads each applying one transfer at a time",
        True,
        _threads(_postgres),
    ),
    System(
        "postgres-locked-threads",
        f"PostgresLedger(group=True, optimistic=False: the lock held from each batch's first read), fresh "
        f"database, {THREADS} threads each applying one transfer at a time",
        True,
        _threads(_postgres_opener(False)),
    ),
    System(
        "postgres-group-batches",
        f"PostgresLedger(group=True), fresh database, one thread, two batches of {BATCH:,} futures in flight",
        True,
        _batches(_postgres),
    ),
    System(
        "postgres-per-op",
        "PostgresLedger(group=False), fresh database, one durable transaction per transfer",
        True,
        _per_op(_postgres),
    ),
    System("sqlite-wal-full", "SQLite WAL, synchronous=FULL, one transaction per transfer", True, _sqlite("FULL")),
    System(
        "sqlite-wal-normal",
        "SQLite WAL, synchronous=NORMAL (not durable on power loss), one transaction per transfer",
        False,
        _sqlite("NORMAL"),
    ),
]
#: The systems that need a PostgreSQL server (skipped, not failed, when there is none).
POSTGRES_SYSTEMS = {s.name for s in SYSTEMS if s.name.startswith("postgres")}


def _postgres_unavailable() -> str | None:
    """Why the PostgreSQL systems cannot run here, or None when the server answers."""
    from tests.services import ADMIN_URL

    try:
        with connect(ADMIN_URL, what="AECO_TEST_POSTGRES", deadline_s=3.0, log=False) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except DatabaseUnavailable as exc:
        return f"no PostgreSQL server: {exc}"
    print(f"PostgreSQL {row[0] if row else '?'} at {redact(ADMIN_URL)}", flush=True)
    return None


def _fdatasync_rate(directory: Path, seconds: float = 0.5) -> float:
    """Raw fdatasync calls per second on a small file in ``directory``: the ceiling of one-sync-per-op."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.pwrite(fd, b"x" * 64, 0)
            os.fdatasync(fd)
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def _ratio(by: dict[str, Entry], num: str, den: str) -> float | None:
    a, b = by.get(num), by.get(den)
    return a.transfers_per_s / b.transfers_per_s if a and b and b.transfers_per_s > 0 else None


def print_table(entries: list[Entry]) -> None:
    """One row per system, with its speed relative to SQLite WAL FULL."""
    by = {e.name: e for e in entries}
    head = f"{'system':<24} {'transfers/s':>12} {'transfers':>10} {'seconds':>8} {'durable':>8} {'× sqlite-full':>14}"
    print()
    print(head)
    print("-" * len(head))
    for e in entries:
        r = _ratio(by, e.name, "sqlite-wal-full")
        note = f"  (= {e.best_of})" if e.best_of else ""
        print(
            f"{e.name:<24} {e.transfers_per_s:>12,.0f} {e.transfers:>10,} {e.seconds:>8.2f} "
            f"{'yes' if e.durable else 'NO':>8} {'n/a' if r is None else f'{r:.1f}×':>14}{note}"
        )


def print_targets(entries: list[Entry]) -> None:
    """The targets: LMDB 5× SQLite WAL FULL and 20,000 durable transfers/s; PostgreSQL 2,000/s."""
    by = {e.name: e for e in entries}
    print()
    r = _ratio(by, "lmdb-group", "sqlite-wal-full")
    if r is None:
        print(f"lmdb-group vs sqlite-wal-full: n/a (target ≥ {TARGET_VS_SQLITE:g}×)")
    else:
        verdict = "met" if r >= TARGET_VS_SQLITE else "NOT met"
        print(f"lmdb-group vs sqlite-wal-full: {r:.1f}× (target ≥ {TARGET_VS_SQLITE:g}×) — {verdict}")
    group = by.get("lmdb-group")
    if group is not None:
        verdict = "met" if group.transfers_per_s >= TARGET_RATE else "NOT met"
        print(f"lmdb-group: {group.transfers_per_s:,.0f} durable transfers/s (target ≥ {TARGET_RATE:,}) — {verdict}")
    r = _ratio(by, "lmdb-group", "lmdb-per-op")
    if r is not None:
        print(f"lmdb-group vs lmdb-per-op (what grouping the syncs buys): {r:.1f}×")
    pg = by.get("postgres-group")
    if pg is not None:
        verdict = "met" if pg.transfers_per_s >= TARGET_POSTGRES_RATE else "NOT met"
        print(
            f"postgres-group: {pg.transfers_per_s:,.0f} durable transfers/s "
            f"(target ≥ {TARGET_POSTGRES_RATE:,}) — {verdict}"
        )
    for num, den, what in (
        ("postgres-group", "postgres-per-op", "what grouping the commits buys"),
        ("postgres-group", "lmdb-group", "shared server vs embedded"),
    ):
        r = _ratio(by, num, den)
        if r is not None:
            print(f"{num} vs {den} ({what}): {r:.2f}×")


def _color(name: str) -> str:
    if name in GROUP_MODES:
        return "tab:green"
    if name.startswith("lmdb"):
        return "tab:blue"
    return "tab:purple" if name.startswith("postgres") else "tab:gray"


def plot(entries: list[Entry], path: Path, title_note: str) -> None:
    """Bars of transfers per second; the non-durable reference hatched, the targets as lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 6))
    names = [f"{e.name}\n(= {e.best_of})" if e.best_of else e.name for e in entries]
    vals = [e.transfers_per_s for e in entries]
    colors = [_color(e.name) for e in entries]
    bars = ax.bar(range(len(entries)), vals, color=colors)
    for bar, e in zip(bars, entries, strict=True):
        if not e.durable:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}" for v in vals], fontsize=9)
    ax.axhline(TARGET_RATE, color="tab:red", linestyle="--", linewidth=1, label=f"LMDB target {TARGET_RATE:,}/s")
    ax.axhline(
        TARGET_POSTGRES_RATE,
        color="tab:purple",
        linestyle=":",
        linewidth=1,
        label=f"PostgreSQL target {TARGET_POSTGRES_RATE:,}/s",
    )
    ax.set_xticks(range(len(entries)), names, rotation=15, ha="right")
    ax.set_ylabel("transfers per second")
    ax.set_title(
        "Ledger: durable transfers per second (higher is better; hatched = not durable on power loss)\n" + title_note
    )
    ax.legend(loc="upper right")
    common.save_figure(fig, path, grid=ax)


def run(opts: Options) -> int:
    """Measure every system; print the table and targets; write the JSON and the plot.

    Returns 1 if a system failed or its store disagreed with what was counted, else 0 (a missing
    PostgreSQL server skips the PostgreSQL systems without failing the run).
    """
    duration = QUICK_S if opts.quick else FULL_S
    mode = "quick" if opts.quick else "full"
    tmp, host = common.scratch("ledger", ["lmdb", "msgspec", "psycopg"])
    host["sqlite"] = sqlite3.sqlite_version
    host["fdatasync_per_s"] = round(_fdatasync_rate(tmp), 1)
    what = f"{duration:g} s per system, {len(ACCOUNTS)} accounts, files in {tmp}"
    common.announce("ledger", opts, what, host, f"raw fdatasync {host['fdatasync_per_s']:,.0f}/s")
    entries: list[Entry] = []
    skipped: list[Skipped] = []
    systems = SYSTEMS
    why = _postgres_unavailable()
    if why is not None:
        print(f"PostgreSQL systems skipped: {why}", flush=True)
        skipped += [Skipped(name, why) for name in sorted(POSTGRES_SYSTEMS)]
        systems = [s for s in SYSTEMS if s.name not in POSTGRES_SYSTEMS]
    unavailable = len(skipped)
    try:
        for system, m in measure_each(systems, tmp, duration, skipped):
            tag = f"[{system.name}]"
            e = Entry(
                name=system.name,
                transfers_per_s=round(m.transfers / m.seconds, 1),
                transfers=m.transfers,
                seconds=round(m.seconds, 3),
                durable=system.durable,
                describe=system.describe,
                cpu_us_per_transfer=cpu_us_per_transfer(m),
            )
            entries.append(e)
            cpu = "" if e.cpu_us_per_transfer is None else f", {e.cpu_us_per_transfer:.0f} µs of CPU per transfer here"
            print(
                f"{tag} done: {e.transfers_per_s:,.0f} transfers/s ({e.transfers:,} in {e.seconds:.2f} s{cpu}, "
                "verified against the store)",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for at, (summary, modes) in enumerate(GROUP_MODES.items()):
        groups = [e for e in entries if e.name in modes]
        if groups:
            best = max(groups, key=lambda e: e.transfers_per_s)
            entries.insert(
                at,
                msgspec.structs.replace(
                    best, name=summary, best_of=best.name, describe=f"the better of {', '.join(modes)}"
                ),
            )
    print_table(entries)
    print_targets(entries)
    report = Report("ledger", mode, host, duration, entries, skipped)
    note = f"{host['cpus_usable']} CPUs, raw fdatasync {host['fdatasync_per_s']:,.0f}/s, {mode} run"
    publish(opts.json_path, report, lambda png: plot(entries, png, note) if entries else None)
    return 1 if len(skipped) > unavailable else 0
