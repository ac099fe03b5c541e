"""Writer process for the ledger crash test, and the one place where ledger backends are built for tests.

``python -m tests.integration.ledger_crash_writer DIR --start N [--backend B]`` opens the ledger of
backend ``B`` at ``DIR`` (for PostgreSQL: the test database named after ``DIR``, on the server of
``tests.services.ADMIN_URL``), makes sure the bank accounts exist and are funded (with fixed op ids, so
every round after the first only replays them), then streams transfers with op ids ``c{N}-{i}`` from
several threads, each keeping a window of operations in flight so that the group commit batches them.
Every operation whose future resolved with a receipt is printed (op id, newline, flushed) *after* it
resolved: a printed id is a promise that the operation is durable, which the test checks after killing
this process with SIGKILL.

With ``--offers`` it streams offers instead: each step posts an offer of ``cpu_rate`` (``p{N}-{i}``, offer
``o{N}-{i}``) and, in the same window, another account accepts it (``c{N}-{i}``): the printed ids are
acknowledged acceptances, each of which moved both sides in one operation.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from runtime.economy.ledger import (
    AcceptOffer,
    Ledger,
    LedgerError,
    Mint,
    Op,
    OpenAccount,
    PostOffer,
    Transfer,
)
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.economy.ledger.postgres import PostgresLedger
from tests import services
from tests.harness import InFlight, crash_writer_parser, die_with_parent, stream_from_threads

#: The bank: this many accounts, each funded once with ``FUNDS`` scrip and ``RIGHTS`` of ``cpu_rate``.
ACCOUNTS = tuple(f"acct{i}" for i in range(10))
FUNDS = 1_000
RIGHTS = 100

LedgerFactory = Callable[..., Ledger]


def _lmdb(path: Path, *, durable: bool = True, group: bool = True) -> Ledger:
    return LmdbLedger(path, durable=durable, group=group)


#: URLs of the PostgreSQL databases this process opened ledgers in (``drop_postgres_databases`` drops them).
PG_DATABASES: set[str] = set()


def postgres_database(path: Path) -> str:
    """The name of the test database that stands for ``path``: the same path always names the same
    database, so a ledger reopened (or opened by a writer subprocess) at a path finds its state."""
    return "aeco_t_l" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]


def _postgres(path: Path, *, durable: bool = True, group: bool = True) -> Ledger:
    url = services.create_database(postgres_database(path), exist_ok=True)
    PG_DATABASES.add(url)
    # durable=False is synchronous_commit=off: a commit returns before its WAL is flushed.
    return PostgresLedger(url, durable=durable, group=group)


def drop_postgres_databases() -> None:
    """Drop every database ``_postgres`` opened in this process (its ledgers should be closed)."""
    while PG_DATABASES:
        services.drop_database(PG_DATABASES.pop())


#: Backend name -> ``factory(path, durable=..., group=...)``; every ledger test runs against each.
BACKENDS: dict[str, LedgerFactory] = {"lmdb": _lmdb, "postgres": _postgres}


def open_ledger(backend: str, path: Path, *, durable: bool = True, group: bool = True) -> Ledger:
    """Open (or create) a ledger of the named backend whose storage lives at ``path``."""
    return BACKENDS[backend](path, durable=durable, group=group)


def fund_bank(ledger: Ledger) -> None:
    """Open and fund the bank accounts; idempotent (fixed op ids), so it is safe on every start."""
    for account in ACCOUNTS:
        ledger.apply(OpenAccount(id=f"setup-open-{account}", account=account))
        ledger.apply(
            Mint(
                id=f"setup-mint-{account}",
                account=account,
                asset="scrip",
                amount=FUNDS,
                reason="bank test funds",
            )
        )
        ledger.apply(
            Mint(id=f"setup-rights-{account}", account=account, asset="cpu_rate", amount=RIGHTS, reason="bank rights")
        )


def transfers(start: int, i: int, rng: random.Random) -> list[Op]:
    """One step of the transfer stream: a transfer ``c{start}-{i}``."""
    src, dst = rng.sample(ACCOUNTS, 2)
    return [Transfer(id=f"c{start}-{i}", src=src, dst=dst, asset="scrip", amount=rng.randint(1, 30))]


def offers(start: int, i: int, rng: random.Random) -> list[Op]:
    """One step of the offer stream: an offer of cpu_rate, then its acceptance ``c{start}-{i}``."""
    seller, buyer = rng.sample(ACCOUNTS, 2)
    amount, price = rng.randint(1, 20), rng.randint(0, 40)
    offer = f"o{start}-{i}"
    return [
        PostOffer(id=f"p{start}-{i}", offer=offer, seller=seller, asset="cpu_rate", amount=amount, price=price),
        AcceptOffer(id=f"c{start}-{i}", offer=offer, buyer=buyer, asset="cpu_rate", amount=amount, price=price),
    ]


#: What a stream step may be refused with: a side that cannot pay (or, for an acceptance, an offer that
#: was refused itself). Anything else is a failure.
_EXPECTED = frozenset({"overdraft", "not_found"})


def stream(
    ledger: Ledger,
    start: int,
    threads: int,
    window: int,
    max_seconds: float,
    step: Callable[[int, int, random.Random], list[Op]] = transfers,
) -> None:
    """Submit ``step``'s operations from ``threads`` threads, ``window`` in flight each; print every
    acknowledged id whose op id starts with ``c``."""
    counter = itertools.count()
    counter_lock = threading.Lock()

    def submitter(k: int) -> Callable[[InFlight], None]:
        rng = random.Random(start * 1000 + k)

        def add(inflight: InFlight) -> None:
            with counter_lock:
                i = next(counter)
            # One thread's submissions keep their order in the writer's queue: a post before its acceptance.
            inflight.extend((op.id, ledger.submit(op)) for op in step(start, i, rng))

        return add

    def settle(op_id: str, fut: Future[Any], _: InFlight) -> str | None:
        try:
            fut.result()
        except LedgerError as exc:
            if exc.code not in _EXPECTED:  # refused transfers are expected; anything else is not
                raise
            return None
        return op_id if op_id.startswith("c") else None

    stream_from_threads(threads, window, max_seconds, submitter, settle)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, fund the bank and stream transfers until killed (or ``--max-seconds``)."""
    ap = crash_writer_parser("tests.integration.ledger_crash_writer", "ledger's storage directory", threads=4, window=8)
    ap.add_argument("--start", type=int, required=True, help="round number: op ids are c{N}-{i}")
    ap.add_argument("--backend", default="lmdb", choices=sorted(BACKENDS))
    ap.add_argument("--offers", action="store_true", help="stream offers and acceptances, not transfers")
    args = ap.parse_args(argv)
    die_with_parent()
    ledger = open_ledger(args.backend, args.dir)
    try:
        fund_bank(ledger)
        stream(ledger, args.start, args.threads, args.window, args.max_seconds, offers if args.offers else transfers)
    finally:
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
