"""Opening the ledger a deployment uses: the PostgreSQL one when a URL is given, else LMDB under the data
directory (the embedded default)."""

from __future__ import annotations

from pathlib import Path

import lmdb

from runtime.economy.ledger import Ledger
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.economy.ledger.postgres import PostgresLedger
from runtime.errors import RESTORE, AecoError, Damaged, ErrorCode, repair_command
from runtime.host.postgres import connect, redact


class NoLedger(AecoError, LookupError):
    """There is no ledger where one was expected (and the caller asked not to create one)."""

    default_code: ErrorCode = "not_found"


def open_ledger(data_dir: str | Path, postgres_url: str | None = None, *, create: bool = True) -> Ledger:
    """The ledger in the PostgreSQL database at ``postgres_url`` if given, else the LMDB ledger in
    ``data_dir/ledger``.

    With ``create=False`` (operator commands, which must not make an empty ledger where they expected
    one) a missing ledger raises ``NoLedger``; an LMDB ledger that does not open raises ``Damaged``. An
    unusable server raises ``runtime.host.postgres.DatabaseUnavailable``.
    """
    if postgres_url:
        if not create:
            with connect(postgres_url, log=False) as conn:
                row = conn.execute("SELECT to_regclass('ledger_journal') IS NOT NULL").fetchone()
            if not (row and row[0]):
                raise NoLedger(f"no ledger in the database {redact(postgres_url)} (has a node run against it?)")
        return PostgresLedger(postgres_url)
    path = Path(data_dir) / "ledger"
    if not create and not (path / "data.mdb").exists():
        raise NoLedger(f"no ledger at {path} (has the supervisor run with this data directory?)")
    try:
        return LmdbLedger(path)
    except lmdb.Error as exc:
        raise Damaged(path / "data.mdb", f"damaged ({type(exc).__name__}: {exc})", ledger_fix(data_dir)) from exc


def ledger_fix(data_dir: str | Path) -> str:
    """What to do about a damaged LMDB ledger in ``data_dir``."""
    return f"{repair_command(data_dir)} rebuilds it from its journal if that is intact; else {RESTORE}"
