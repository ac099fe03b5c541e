"""Operator commands: ``python -m runtime.admin [--config FILE | --data-dir DIR] COMMAND``.

- ``balances``: every account's holdings, and each asset's supply (minted − burned);
- ``journal [--since SEQ] [--limit N]``: the append-only journal, one operation per line (JSON);
- ``check``: the ledger's invariants; exit status 1 when one is violated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from runtime import config as config_mod
from runtime.ledger import ASSETS
from runtime.ledger.check import check
from runtime.ledger.lmdb import LmdbLedger


def _balances(ledger: LmdbLedger) -> int:
    balances = ledger.balances()
    kinds = ledger.accounts()
    print(f"{'account':<14} {'kind':<7}" + "".join(f"{a:>16}" for a in ASSETS))
    for account in sorted(kinds, key=lambda a: (kinds[a] != "system", a)):
        held = balances.get(account, {})
        print(f"{account:<14} {kinds[account]:<7}" + "".join(f"{held.get(a, 0):>16}" for a in ASSETS))
    supply = ledger.supply()
    print(f"{'supply':<22}" + "".join(f"{supply.get(a, (0, 0))[0] - supply.get(a, (0, 0))[1]:>16}" for a in ASSETS))
    return 0


def _journal(ledger: LmdbLedger, since: int, limit: int | None) -> int:
    out = sys.stdout.buffer
    for n, entry in enumerate(ledger.journal(since)):
        if limit is not None and n >= limit:
            break
        out.write(msgspec.json.encode(entry) + b"\n")
    out.flush()
    return 0


def _check(ledger: LmdbLedger) -> int:
    report = check(ledger)
    print(f"{report.accounts} accounts, {report.journal_entries} journal entries, {report.usage_records} usage records")
    for problem in report.problems:
        print(f"VIOLATION: {problem}")
    print("all invariants hold" if report.ok else f"{len(report.problems)} violation(s)")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m runtime.admin", description=(__doc__ or "").splitlines()[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--config", default="config/default.yaml", help="read the data directory from this")
    where.add_argument("--data-dir", help="the data directory (overrides --config)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("balances", help="holdings of every account and the supply of each asset")
    j = sub.add_parser("journal", help="the journal, one JSON operation per line")
    j.add_argument("--since", type=int, default=0, metavar="SEQ", help="entries after this sequence number")
    j.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    sub.add_parser("check", help="check every invariant (exit 1 on a violation)")
    args = ap.parse_args(argv)
    if args.data_dir is not None:
        data = Path(args.data_dir)
    else:
        try:
            data = Path(config_mod.load(args.config).data_dir)
        except config_mod.ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    path = data / "ledger"
    if not (path / "data.mdb").exists():
        print(f"error: no ledger at {path} (has the supervisor run with this data directory?)", file=sys.stderr)
        return 2
    with LmdbLedger(path) as ledger:
        if args.command == "balances":
            return _balances(ledger)
        if args.command == "journal":
            return _journal(ledger, args.since, args.limit)
        return _check(ledger)


if __name__ == "__main__":
    sys.exit(main())
