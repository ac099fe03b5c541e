"""The artifact-store backends the integration tests run against, each with an independent view of its storage.

``BACKENDS`` maps a backend name to a class whose instances open stores for one test and check what a
store claims against the storage itself, without the store's code: the git CLI on the bare repository
for ``git``, plain SQL on the operator's connection for ``postgres``. Tests whose semantics are
backend-independent take the ``store_backend`` fixture (tests/integration/test_store.py) and run on both.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from runtime.world.store import Store
from runtime.world.store.git import GitStore
from runtime.world.store.postgres import PostgresStore
from tests.services import create_database, drop_database


def git(repo: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real git CLI on a bare repository, without the user's or the system's configuration."""
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null", LC_ALL="C")
    env |= {
        f"GIT_{who}_{what}": "test" if what == "NAME" else "test@example.invalid"
        for who in ("AUTHOR", "COMMITTER")
        for what in ("NAME", "EMAIL")
    }
    return subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, env=env, timeout=120)


def assert_fsck(repo: Path) -> None:
    """``git fsck --strict`` exits 0 and reports no error or warning (dangling objects are fine)."""
    res = git(repo, "fsck", "--strict")
    text = (res.stdout + res.stderr).decode(errors="replace")
    bad = [line for line in text.splitlines() if "error" in line.lower() or "warning" in line.lower()]
    assert res.returncode == 0 and not bad, f"git fsck --strict (exit {res.returncode}):\n{text[:3000]}"


def git_head(repo: Path) -> str:
    """HEAD of a bare repository, by the git CLI."""
    return git(repo, "rev-parse", "HEAD").stdout.decode().strip()


def usage_by_git(repo: Path) -> dict[str, int]:
    """Bytes owned per agent at HEAD, computed with the git CLI alone: ``ls-tree -r -l`` for content
    sizes, ``cat-file --batch`` for the owners in the metadata blobs."""
    listing = git(repo, "ls-tree", "-r", "-l", "HEAD").stdout.decode().splitlines()
    sizes: dict[str, int] = {}
    metas: dict[str, str] = {}
    for line in listing:
        info, path = line.split("\t", 1)
        _, kind, sha, size = info.split()
        assert kind == "blob"
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".meta.json"):
            metas[name[: -len(".meta.json")]] = sha
        else:
            sizes[name] = int(size)
    assert sizes.keys() == metas.keys(), "every artifact has content and metadata"
    ids = sorted(metas)
    out = git(repo, "cat-file", "--batch", stdin="".join(f"{metas[i]}\n" for i in ids).encode()).stdout
    owned: dict[str, int] = {}
    pos = 0
    for aid in ids:
        header_end = out.index(b"\n", pos)
        n = int(out[pos:header_end].split()[2])
        meta = json.loads(out[header_end + 1 : header_end + 1 + n])
        assert meta["size"] == sizes[aid], f"{aid}: metadata says {meta['size']} bytes, the blob is {sizes[aid]}"
        owned[meta["owner"]] = owned.get(meta["owner"], 0) + sizes[aid]
        pos = header_end + 1 + n + 1
    return owned


class GitBackend:
    """Bare repositories under the test's ``tmp_path``, checked with the git CLI."""

    name = "git"

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.opened: list[Store] = []

    def open(self, name: str = "store", **options: Any) -> Any:
        """Open (or create) the store called ``name`` (reopening a name reopens the same store)."""
        s = GitStore(self.tmp_path / f"{name}.git", **options)
        self.opened.append(s)
        return s

    def head(self, store: Any) -> str:
        """HEAD by the git CLI."""
        return git_head(store.path)

    def log(self, store: Any) -> list[tuple[str, str, str]]:
        """Every commit of HEAD's history as (commit, author, subject), oldest first, by ``git log``."""
        lines = git(store.path, "log", "--reverse", "--format=%H|%an|%s").stdout.decode().splitlines()
        return [(c, a, s) for c, a, s in (line.split("|", 2) for line in lines)]

    def usage(self, store: Any) -> dict[str, int]:
        """Bytes owned per agent at HEAD, by the git CLI."""
        return usage_by_git(store.path)

    def check(self, store: Any) -> None:
        """``git fsck --strict`` is clean."""
        assert_fsck(store.path)

    def close(self) -> None:
        """Close every store this backend opened."""
        for s in self.opened:
            s.close()


class PostgresBackend:
    """A fresh database per store name, checked with SQL on the operator's connection."""

    name = "postgres"

    def __init__(self, tmp_path: Path) -> None:
        self.urls: dict[str, str] = {}
        self.opened: list[Store] = []

    def url(self, name: str = "store") -> str:
        """The database of the store called ``name``, created on first use (dropped by ``close``)."""
        if name not in self.urls:
            self.urls[name] = create_database()
        return self.urls[name]

    def open(self, name: str = "store", **options: Any) -> Any:
        """Open (or create) the store called ``name`` (reopening a name reopens the same database)."""
        s = PostgresStore(self.url(name), **options)
        self.opened.append(s)
        return s

    def _rows(self, store: Any, query: str) -> list[tuple[Any, ...]]:
        dbname = store.url.rpartition("/")[2]
        url = next(u for u in self.urls.values() if u.rpartition("/")[2] == dbname)
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(query).fetchall()

    def head(self, store: Any) -> str:
        """The highest commit id in ``store_commits``."""
        return str(self._rows(store, "SELECT max(id) FROM store_commits")[0][0])

    def log(self, store: Any) -> list[tuple[str, str, str]]:
        """Every commit as (commit, author, subject), oldest first, from ``store_commits``."""
        rows = self._rows(store, "SELECT id, author, subject FROM store_commits ORDER BY id")
        return [(str(c), a, s) for c, a, s in rows]

    def usage(self, store: Any) -> dict[str, int]:
        """Bytes owned per agent, replayed from the history alone (the last version of each artifact)."""
        rows = self._rows(
            store,
            "SELECT owner, sum(octet_length(content)) FROM (SELECT DISTINCT ON (artifact) owner, content"
            " FROM store_history ORDER BY artifact, commit_id DESC) h WHERE content IS NOT NULL"
            " GROUP BY owner HAVING sum(octet_length(content)) > 0",
        )
        return {owner: int(n) for owner, n in rows}

    def check(self, store: Any) -> None:
        """Every current artifact is its last history row, written by that row's commit, and every
        artifact the history says exists is current."""
        bad = self._rows(
            store,
            "SELECT coalesce(a.id, h.artifact) FROM store_artifacts a FULL JOIN"
            " (SELECT DISTINCT ON (artifact) * FROM store_history ORDER BY artifact, commit_id DESC) h"
            " ON h.artifact = a.id"
            " WHERE (a.id IS NULL) <> (h.content IS NULL) OR (a.id IS NOT NULL AND ("
            " (a.content, a.kind, a.creator, a.owner, a.price, a.readable, a.created, a.updated, a.size)"
            " IS DISTINCT FROM"
            " (h.content, h.kind, h.creator, h.owner, h.price, h.readable, h.created, h.updated, h.size)"
            " OR a.commit_id <> h.commit_id))",
        )
        assert bad == [], f"current artifacts that disagree with the history: {bad[:10]}"

    def close(self) -> None:
        """Close every store this backend opened and drop its databases."""
        for s in self.opened:
            s.close()
        for url in self.urls.values():
            drop_database(url)


Backend = GitBackend | PostgresBackend
BACKENDS: dict[str, type[GitBackend] | type[PostgresBackend]] = {"git": GitBackend, "postgres": PostgresBackend}
