"""One node of the multi-process bank test: its own ``PostgresLedger`` on a shared database.

``python -m tests.integration.ledger_bank_client URL --client K --seconds S`` opens the ledger, prints
``ready``, waits for a line on stdin (so that every node starts at once), then runs ``--threads``
closed-loop clients for ``S`` seconds (and on until it did enough: see ``run``): random transfers among
the bank's accounts, with amounts large enough that some are refused as overdrafts, and now and then a
replay of an earlier one (which must return its first receipt). It prints one JSON ``Summary`` line at
the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Sequence

import msgspec

from runtime.economy.ledger import LedgerError, Receipt, Transfer
from runtime.economy.ledger.postgres import PostgresLedger
from tests.integration.ledger_crash_writer import ACCOUNTS

#: Up to 40% of an account's initial funds in one transfer: enough for some overdrafts.
MAX_AMOUNT = 400
#: Fresh transfers a node makes at least (the test asserts more than this many).
ENOUGH_FRESH = 100


class Summary(msgspec.Struct):
    """What one node did: the seq of each transfer it applied fresh, and what else happened."""

    client: int
    fresh: dict[str, int]
    refused: int
    replayed: int
    errors: list[str]


def run(ledger: PostgresLedger, client: int, threads: int, seconds: float) -> Summary:
    """Run ``threads`` closed-loop clients for ``seconds``, and on until the workload did what the test
    claims of it (over 100 fresh transfers, a refusal and a replay: a loaded host does less a second;
    two minutes at most), and summarise."""
    summary = Summary(client, {}, 0, 0, [])
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    cap = deadline + 120

    def going() -> bool:
        now = time.monotonic()
        enough = len(summary.fresh) > ENOUGH_FRESH and summary.refused > 0 and summary.replayed > 0
        return now < deadline or (now < cap and not enough)

    def body(k: int) -> None:
        rng = random.Random(client * 1000 + k)
        applied: list[tuple[Transfer, Receipt]] = []
        i = 0
        try:
            while going():
                if applied and rng.random() < 0.05:
                    op, first = rng.choice(applied)
                    again = ledger.apply(op)
                    with lock:
                        summary.replayed += 1
                        if again != Receipt(op.id, first.seq, first.at, fresh=False):
                            summary.errors.append(f"replay of {op.id} gave {again}, first was {first}")
                    continue
                src, dst = rng.sample(ACCOUNTS, 2)
                amount = rng.randint(1, MAX_AMOUNT)
                op = Transfer(id=f"n{client}-{k}-{i}", src=src, dst=dst, asset="scrip", amount=amount)
                i += 1
                try:
                    receipt = ledger.apply(op)
                except LedgerError as exc:
                    with lock:
                        summary.refused += 1
                        if exc.code != "overdraft":
                            summary.errors.append(f"{op.id}: unexpected {exc}")
                    continue
                applied.append((op, receipt))
                with lock:
                    summary.fresh[op.id] = receipt.seq
                    if not receipt.fresh:
                        summary.errors.append(f"new op {op.id} was not fresh: {receipt}")
        except Exception as exc:
            with lock:
                summary.errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=body, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Open the ledger, report ready, wait for the go line, run, print the summary."""
    ap = argparse.ArgumentParser(prog="python -m tests.integration.ledger_bank_client")
    ap.add_argument("url", help="the shared ledger database")
    ap.add_argument("--client", type=int, required=True, help="this node's number (op ids n{K}-...)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    with PostgresLedger(args.url) as ledger:
        print("ready", flush=True)
        sys.stdin.readline()
        summary = run(ledger, args.client, args.threads, args.seconds)
    sys.stdout.buffer.write(msgspec.json.encode(summary) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
