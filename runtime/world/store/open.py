"""Opening the artifact store of a deployment: the Git repository in the data directory, or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from runtime.world.store import Store, StoreError
from runtime.world.store.git import GitStore
from runtime.world.store.postgres import PostgresStore


def open_store(data_dir: str | Path, postgres_url: str | None = None, *, create: bool = True) -> Store:
    """The store at ``postgres_url`` when one is given (as its operator), else ``<data_dir>/artifacts.git``.

    ``create=False`` raises ``StoreError("not_found")`` instead of creating a store that does not exist
    (what an operator command wants); ``runtime.host.postgres.DatabaseUnavailable`` says when the server
    cannot be used.
    """
    if postgres_url:
        return PostgresStore(postgres_url, create=create)
    path = Path(data_dir) / "artifacts.git"
    if not create and not (path / "HEAD").exists():
        raise StoreError("not_found", f"no artifact store at {path}")
    return GitStore(path)
