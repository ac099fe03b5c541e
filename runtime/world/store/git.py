"""The artifact store as a bare Git repository written with dulwich, with group commit and an LMDB index.

Layout of HEAD's tree: each artifact is two blobs side by side, ``<id>`` (the content) and
``<id>.meta.json`` (kind, creator, owner, price, readable, created, updated, size), so that history and
rollback carry the metadata with the bytes. The tree fans out by the first two hex digits of
``sha1(id)``, one digit per level (``3/f/<id>``): a commit rewrites three small trees (16 entries at
the two upper levels, about N/128 at the leaf) instead of one tree holding every artifact. A flat
256-way first level would cost ~7 KB of root tree per commit; two levels of 16 cost under 1 KB.

Every write, delete or reset is one commit on ``refs/heads/main`` (HEAD is a symbolic ref to it),
authored by the agent (``<agent> <agent@agents.invalid>``) or operator, committed by
``agent-ecology <runtime@agents.invalid>``, whose parent is the previous commit. The first commit of a
store is an empty tree ("create artifact store").

Group commit: one writer thread takes every queued operation (up to ``max_batch``), checks and applies
them in order against one LMDB write transaction (so ownership and quota checks see the earlier
operations of the batch), builds one chained commit per operation in memory, writes all the batch's
new objects as ONE pack, moves ``refs/heads/main`` once, commits the index, and only then resolves the
callers' futures.

Durability: the pack and its index are written to temporary files, fsync'd, renamed into
``objects/pack`` and the directory fsync'd; then the ref is replaced with dulwich's lock-file protocol
(fsync'd, renamed) and ``refs/heads`` fsync'd; then the LMDB index commits with ``fdatasync``
(``metasync`` off: the index is derived data, checked against the repository on open). A crash before
the ref moves leaves only unreferenced objects; a crash after it but before the index commit leaves an
index whose recorded head differs from the repository's, which is rebuilt from HEAD's tree on open.

The HEAD index lives outside Git, in the LMDB environment ``<path>.index``: id -> metadata and blob
ids, agent -> bytes owned, and the head it describes. Agent reads go to the index and then fetch one
blob by id: they never walk history. Operator calls (``history``, ``show``, ``rollback``) do.

Each batch adds a pack; when there are more than ``max_packs``, the smaller packs are rolled up into
one (git's ``repack --geometric=2`` rule), copying their compressed objects without recompressing.
The new pack is installed before the old ones are removed, so every object is always in some pack.
A roll-up runs before its batch is acknowledged, so an idle store is never removing packs; a
``git fsck`` that runs *during* one may, as during git's own ``repack -d``, see a pack vanish.

One process at a time: the store holds an exclusive ``flock`` on ``<path>/agent-ecology.lock``, which
is also what makes it safe to remove a ref lock file or temporary pack left behind by a killed writer.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgspec
from dulwich.object_store import DiskObjectStore
from dulwich.objects import Blob, Commit, ObjectID, ShaFile, Tree
from dulwich.pack import (
    full_unpacked_object,
)
from dulwich.refs import DiskRefsContainer, Ref
from dulwich.repo import Repo

from runtime.errors import RESTORE, Damaged, repair_command, storage_failure
from runtime.host.lmdbfile import check_length
from runtime.host.pace import pace, paced
from runtime.host.volume import fsync_dir
from runtime.world.store import (
    AgentName,
    Artifact,
    ArtifactInfo,
    CommitInfo,
    DeleteOp,
    HistoryEntry,
    Kind,
    Price,
    Readable,
    Size,
    Store,
    StoreError,
    WriteOp,
    WriteReceipt,
    check_agent,
    check_delete,
    check_id,
    check_write,
    git_packs,
    visible_to,
)

BRANCH = Ref(b"refs/heads/main")
COMMITTER = b"agent-ecology <runtime@agents.invalid>"
META_SUFFIX = ".meta.json"
#: Levels of fan-out, one hex digit of sha1(id) each. Fixed for a repository: changing it needs a migration.
FANOUT_LEVELS = 2
LOCK_NAME = "agent-ecology.lock"
#: What ``HEAD`` holds: a symbolic ref to the one branch (Git would read anything else as detached).
HEAD_REF = b"ref: refs/heads/main\n"
_DIR_MODE = 0o040000
_FILE_MODE = 0o100644
_BLOB = Blob.type_num
#: Small blobs read at HEAD are kept (least recently read go first, past ``BLOB_CACHE_BYTES`` in all): a
#: blob is named by its content, so a kept one is never stale, and the artifacts read over and over — a
#: bulletin, an access policy's contract, asked on every read of what it guards — cost no pack lookup.
BLOB_CACHE_BYTES = 16 << 20
BLOB_CACHE_MAX = 64 << 10
_HEX_RE = re.compile(r"^[0-9a-f]{4,40}$")
_U64 = struct.Struct(">Q")
log = logging.getLogger("runtime.world.store")


class _Meta(msgspec.Struct, frozen=True):
    """The ``<id>.meta.json`` blob. Unknown fields are tolerated so that a later version can add some."""

    kind: Kind
    creator: AgentName
    owner: AgentName
    price: Price
    readable: Readable
    created: float
    updated: float
    size: Size


class _Entry(msgspec.Struct, frozen=True, array_like=True):
    """An index record: the metadata and the two blob ids of one artifact at HEAD."""

    meta: _Meta
    blob: bytes
    meta_blob: bytes

    def info(self, aid: str) -> ArtifactInfo:
        m = self.meta
        return ArtifactInfo(aid, m.kind, m.creator, m.owner, m.price, m.readable, m.created, m.updated, m.size)


_meta_json_dec = msgspec.json.Decoder(_Meta)
_entry_dec = msgspec.msgpack.Decoder(_Entry)
_enc = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class _Reset:
    target: ObjectID
    operator: str


@dataclass(frozen=True, slots=True)
class _Freeze:
    """Start a compaction: the writer stops rolling packs up and names what the squash may read."""


@dataclass(frozen=True, slots=True)
class _Frozen:
    """What the writer held when a compaction started: the head and the packs holding all its history
    (and their bytes), and the written bytes per author it had counted (``_swap`` adds what came after)."""

    head: ObjectID
    packs: frozenset[str]
    pack_bytes: int
    history: dict[str, int]


@dataclass(frozen=True, slots=True)
class _Squashed:
    """A squash built off the writer: the new chain's tip for the frozen head (``None``: nothing to do,
    or it failed), its pack, and the written bytes per author of the new history."""

    frozen: _Frozen
    head: ObjectID | None
    pack: str | None
    objects: int
    written: dict[str, int]
    #: Commits squashed, commits after the base kept, and artifacts the squash recreated.
    squashed: int = 0
    kept: int = 0
    artifacts: int = 0


class HistoryCompaction(msgspec.Struct, frozen=True):
    """What ``GitStore.compact`` did: commits squashed and kept, artifacts the squash recreated, and the
    pack bytes before and after (equal, and ``squashed`` 0, when there was nothing older to squash)."""

    squashed: int
    kept: int
    artifacts: int
    pack_bytes_before: int
    pack_bytes_after: int
    head: str


_Op = WriteOp | DeleteOp | _Reset
_Control = _Freeze | _Squashed
_Item = tuple[_Op | _Control, "Future[Any]"]


@dataclass(slots=True)
class _Batch:
    """What a batch has built so far: its new objects (deduplicated) and the tip of its commit chain."""

    head: ObjectID
    tree: ObjectID
    objects: dict[ObjectID, ShaFile]
    #: Artifacts a squash recreated (``_squash``).
    artifacts: int = 0
    #: Content bytes each author's commits of the batch carry (added to ``history_usage`` once durable).
    written: dict[str, int] = field(default_factory=dict)

    def count_into(self, history: dict[str, int]) -> None:
        """Add the batch's written bytes to ``history`` (its commits are durable)."""
        for agent, n in self.written.items():
            history[agent] = history.get(agent, 0) + n

    def add(self, obj: ShaFile) -> ObjectID:
        sha = obj.id
        self.objects.setdefault(sha, obj)
        return sha


@dataclass(slots=True)
class _Tip:
    """A tip tree being edited: its entries by directory path ("" is the root), loaded from the
    repository (``get``) on first use. The writer keeps one for HEAD; a squash builds its own."""

    tree: ObjectID
    get: Callable[[ObjectID], ShaFile]
    dirs: dict[str, dict[bytes, tuple[int, ObjectID]]] = field(default_factory=dict)

    def reset(self, tree: ObjectID) -> None:
        """Forget the loaded entries: the tip is ``tree`` now."""
        self.dirs.clear()
        self.tree = tree

    def dir(self, path: str) -> dict[bytes, tuple[int, ObjectID]]:
        """The tip's entries of directory ``path``."""
        d = self.dirs.get(path)
        if d is None:
            if path == "":
                sha: ObjectID | None = self.tree
            else:
                parent, _, name = path.rpartition("/")
                entry = self.dir(parent).get(name.encode())
                sha = entry[1] if entry is not None else None
            d = {}
            if sha is not None:
                tree = self.get(sha)
                assert isinstance(tree, Tree), f"invariant: {path!r} is a {tree.type_name!r}, not a tree"
                d = {e.path: (e.mode, e.sha) for e in tree.iteritems()}
            self.dirs[path] = d
        return d

    def set(self, b: _Batch, aid: str, blobs: tuple[ObjectID, ObjectID] | None) -> None:
        """Put (or, with None, remove) ``aid``'s two blobs in the tip tree; rewrite the trees on its path."""
        levels = fanout(aid)
        paths = ["/".join(levels[:i]) for i in range(len(levels) + 1)]  # "", "3", "3/f"
        leaf = self.dir(paths[-1])
        name, meta_name = aid.encode(), (aid + META_SUFFIX).encode()
        if blobs is None:
            leaf.pop(name, None)
            leaf.pop(meta_name, None)
        else:
            leaf[name] = (_FILE_MODE, blobs[0])
            leaf[meta_name] = (_FILE_MODE, blobs[1])
        # Bottom up; an emptied directory disappears from its parent (Git has no empty directories).
        child: ObjectID | None = b.add(_tree_of(leaf)) if leaf else None
        for depth in range(len(levels) - 1, -1, -1):
            parent = self.dir(paths[depth])
            key = levels[depth].encode()
            if child is None:
                parent.pop(key, None)
            else:
                parent[key] = (_DIR_MODE, child)
            child = b.add(_tree_of(parent)) if parent or depth == 0 else None
        assert child is not None
        b.tree = self.tree = child


def _chain(b: _Batch, author: bytes, message: str, now: float | None) -> ObjectID:
    """Append a commit of the batch's tree to its chain."""
    c = Commit()
    c.tree = b.tree
    c.parents = [b.head]
    c.author = author
    c.committer = COMMITTER
    c.author_time = c.commit_time = int(time.time() if now is None else now)
    c.author_timezone = c.commit_timezone = 0
    c.message = message.encode() + b"\n"
    b.head = b.add(c)
    return b.head


# ------------------------------------------------------------------------------------------ helpers


def fanout(aid: str) -> tuple[str, ...]:
    """The directory path of ``aid``'s blobs, one element per level (``("3", "f")``)."""
    digest = hashlib.sha1(aid.encode(), usedforsecurity=False).hexdigest()
    return tuple(digest[:FANOUT_LEVELS])


def _ident(name: str, domain: str) -> bytes:
    return f"{name} <{name}@{domain}>".encode()


def _tree_of(entries: dict[bytes, tuple[int, ObjectID]]) -> Tree:
    tree = Tree()
    for name, (mode, sha) in entries.items():
        tree.add(name, mode, sha)
    return tree


class GitStore(Store):
    """The Git artifact store at ``path`` (a bare repository, created if missing).

    ``durable=False`` skips every fsync (for tests of logic, never for real runs). ``max_batch`` bounds
    the operations of one group commit; ``max_packs`` is the pack count above which packs are rolled up.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        max_batch: int = 1024,
        max_packs: int = 16,
        map_size: int = 1 << 34,
    ) -> None:
        self.path = Path(path)
        self.index_path = Path(f"{self.path}.index")
        self._durable = durable
        self._max_packs = max(2, max_packs)
        self._pack_dir = self.path / "objects" / "pack"
        if not self.path.exists():
            self._create()
        self._lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreError("closed", f"the store at {self.path} is open in another process") from None
        try:
            self._clean_leftovers()
            self._check_files()
            #: Packs we may roll up (name -> objects); a pack with a ``.keep`` file is left alone, as git does.
            self._packs = {
                p.stem: git_packs.idx_count(p)
                for p in self._pack_dir.glob("pack-*.idx")
                if not p.with_suffix(".keep").exists()
            }
            self._refs = DiskRefsContainer(self.path)
            self._wobjects = self._open_objects()  # the writer thread's
            self._robjects = self._open_objects()  # everyone else's, under _robjects_lock
            self._robjects_lock = threading.Lock()
            self._blobs: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # under the lock too
            self._blob_bytes = 0
            commit = self._head_commit()
            #: The durable HEAD commit and its tree, replaced as one tuple so that other threads never
            #: see a commit with another commit's tree.
            self._committed: tuple[ObjectID, ObjectID] = (commit.id, commit.tree)
            try:
                indexed_head = self._open_index(map_size, durable)
            except lmdb.Error as exc:
                # The index is derived from Git: a damaged one is set aside (for a post-mortem) and
                # rebuilt from HEAD, never trusted and never a reason to refuse to start.
                aside = self.index_path.with_name(f"{self.index_path.name}.damaged-{int(time.time())}")
                log.warning(
                    "the store's index %s is damaged (%s); set aside as %s, rebuilt from HEAD",
                    self.index_path,
                    exc,
                    aside,
                )
                os.replace(self.index_path, aside)
                indexed_head = self._open_index(map_size, durable)
            #: True when the index did not describe the repository's HEAD and was rebuilt on open.
            self.rebuilt_index = indexed_head is None or bytes(indexed_head) != commit.id
            if self.rebuilt_index:
                with self.env.begin(write=True) as txn:
                    self._reindex(txn, commit.tree)
                    txn.put(b"head", commit.id, db=self._state)
            #: Content bytes written per author in the retained history (``history_usage``), kept by the
            #: writer from here on. Counting it walks the history once: retention keeps that short.
            self._history = _written(self._first_parents_of(self._wobjects, commit.id))
        except BaseException:
            os.close(self._lock_fd)
            raise
        #: The writer's view of HEAD's tree.
        self._tip = _Tip(commit.tree, lambda sha: self._wobjects[sha])
        #: Set while a compaction runs (``compact``): no roll-up removes the packs its squash reads.
        self._frozen: _Frozen | None = None
        #: While frozen, the commits made since the freeze, oldest first (their chain runs from the frozen
        #: head to HEAD): ``_swap`` re-parents them from here rather than reading them back through the
        #: packs the batches wrote meanwhile.
        self._since: builtins.list[Commit] = []
        self._broken: str | None = None
        self._init_writer("store-writer", max_batch)
        self._start_writer()

    # ------------------------------------------------------------------------------- opening

    def _open_index(self, map_size: int, durable: bool) -> bytes | None:
        """Open (or create) the LMDB index beside the repository; the HEAD it describes, if any."""
        self.index_path.mkdir(exist_ok=True)
        self.env = lmdb.open(
            str(self.index_path), map_size=map_size, max_dbs=4, sync=durable, metasync=False, max_readers=512
        )
        try:
            check_length(self.env, self.index_path)
            self._arts = self.env.open_db(b"artifacts")
            self._usage = self.env.open_db(b"usage")
            self._state = self.env.open_db(b"state")
            with self.env.begin() as txn:
                head = txn.get(b"head", db=self._state)
        except lmdb.Error:
            self.env.close()
            raise
        return None if head is None else bytes(head)

    def _create(self) -> None:
        """Create the repository with its first commit in a temporary directory, then rename it into
        place, so that a crash never leaves a half-made store at ``path``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(4)}")
        try:
            Repo.init_bare(tmp, mkdir=True, default_branch=b"main").close()
            empty = Tree()
            now = int(time.time())
            first = Commit()
            first.tree = empty.id
            first.author = first.committer = COMMITTER
            first.author_time = first.commit_time = now
            first.author_timezone = first.commit_timezone = 0
            first.message = b"create artifact store\n"
            git_packs.write_pack(
                tmp / "objects" / "pack", (full_unpacked_object(o) for o in (empty, first)), 2, self._durable
            )
            refs = DiskRefsContainer(tmp)
            if not refs.set_if_equals(BRANCH, None, first.id):
                raise RuntimeError(f"could not set {BRANCH.decode()} in {tmp}")
            if self._durable:
                fsync_dir(tmp / "refs" / "heads")
                fsync_dir(tmp)
            os.rename(tmp, self.path)
            if self._durable:
                fsync_dir(self.path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        """Remove what a killed writer may have left (we hold the flock: no one else is writing)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / "refs" / "heads" / "main.lock").unlink()
        for p in self._pack_dir.iterdir():
            # tmp_*: a pack or index being written; a .pack without its .idx: a pack renamed into place
            # whose index was not (its objects are unreferenced), or one being removed by a roll-up.
            orphan = p.suffix == ".pack" and not p.with_suffix(".idx").exists()
            if p.name.startswith("tmp_") or orphan:
                p.unlink()

    def _damaged(self, name: str, why: str, derived: bool) -> Damaged:
        fix = (
            f"{repair_command(self.path.parent)} rewrites it"
            if derived
            else f"Git objects exist nowhere else: {RESTORE}"
        )
        return Damaged(self.path / name, why, fix)

    def _check_files(self) -> None:
        """Refuse, naming the file, a repository whose HEAD is not the symbolic ref to the branch or
        whose pack files do not match their checksums (``Damaged``)."""
        try:
            head = (self.path / "HEAD").read_bytes()
        except FileNotFoundError:
            raise self._damaged("HEAD", "missing", derived=True) from None
        if head != HEAD_REF:
            raise self._damaged("HEAD", f"is {head[:60]!r}, not {HEAD_REF!r}", derived=True)
        for pack in sorted(self._pack_dir.glob("pack-*.idx")):
            if (why := git_packs.damage(pack.with_suffix(".pack"))) is not None:
                raise self._damaged(f"objects/pack/{pack.stem}.pack", why, derived=False)

    def _head_commit(self) -> Commit:
        """The commit the branch names, with its tree present (``Damaged`` naming the ref otherwise)."""
        ref = BRANCH.decode()
        try:
            head = self._refs.read_ref(BRANCH)
            if head is None:
                raise self._damaged(ref, "missing", derived=True)
            if not re.fullmatch(rb"[0-9a-f]{40}", head):
                raise self._damaged(ref, f"is {bytes(head)[:60]!r}, not a commit id", derived=True)
            commit = self._wobjects[ObjectID(head)]
            if not isinstance(commit, Commit):
                raise self._damaged(ref, f"names a {commit.type_name.decode()}, not a commit", derived=True)
            self._wobjects[commit.tree]
        except (KeyError, ValueError, OSError) as exc:
            raise self._damaged(
                ref, f"names no commit of the store ({type(exc).__name__}: {exc})", derived=True
            ) from exc
        return commit

    def _open_objects(self) -> DiskObjectStore:
        return DiskObjectStore(str(self.path / "objects"), pack_compression_level=git_packs.ZLEVEL)

    # ------------------------------------------------------------------------------ requests

    def rollback(self, to_commit: str, operator: str = "system") -> str:
        """A new commit, authored by ``operator``, whose tree is ``to_commit``'s (a commit of HEAD's
        history, by full id or unique prefix); the index and usage follow. Return the new commit."""
        check_agent(operator, "operator")
        target = self._resolve(to_commit)
        fut: Future[str] = self._submit(_Reset(target, operator))
        return fut.result()

    def compact(self, horizon: float) -> HistoryCompaction:
        """Squash the history older than ``horizon`` (a UNIX time) into one commit per artifact; HEAD's
        tree is unchanged. Agents' writes keep flowing meanwhile: the squash is built in the calling
        thread, and the writer only swaps it in between two batches.

        The history is a chain: the newest commit older than the horizon (the *base*) and everything
        before it become a root (an empty tree, as a new store's) and one commit per artifact of the
        base's tree, authored by its owner at its last update, in that order; the commits after the base
        are re-parented onto that chain with their trees, authors, times and messages.

        Three steps. *Freeze* (the writer, between batches): it notes HEAD and the packs that hold its
        whole history, and rolls no pack up until the swap, so none of them goes away. *Squash* (this
        thread, reading those packs through its own object store): the new chain for the frozen HEAD,
        and every object it reaches written as one durable pack. *Swap* (the writer, between batches):
        the commits made since the freeze are re-parented onto the new chain (a small pack of commits),
        the branch moves, the index records it, and only then are the frozen packs removed; the packs
        written since the freeze stay (they hold those commits' trees and blobs). A crash at any point
        leaves either the old history or the new one (and at worst packs no ref reaches, removed by
        the next compaction). The squash is deterministic: compacting an already compacted history
        changes nothing.
        """
        self._check_open()
        frozen: _Frozen = self._submit(_Freeze()).result()
        try:
            squashed = self._build_squash(frozen, horizon)
        except BaseException as exc:
            self._submit(_Squashed(frozen, None, None, 0, {}))  # thaw: roll-ups resume
            raise storage_failure(exc, "the artifact store's compaction") from exc
        done: HistoryCompaction = self._submit(squashed).result()
        return done

    # -------------------------------------------------------------------------------- writer

    def _commit(self, batch: list[_Item]) -> None:
        # A compaction's step is a batch of its own: the operations queued before it first, those after
        # it next.
        for i, (op, fut) in enumerate(batch):
            if isinstance(op, _Freeze | _Squashed):
                if i:
                    self._commit(batch[:i])
                try:
                    self._check_open()
                    fut.set_result(self._freeze() if isinstance(op, _Freeze) else self._swap(op))
                except BaseException as exc:
                    fut.set_exception(storage_failure(exc, "the artifact store's compaction"))
                if i + 1 < len(batch):
                    self._commit(batch[i + 1 :])
                return
        if self._broken is not None:
            for _, fut in batch:
                fut.set_exception(StoreError("closed", self._broken))
            return
        outcomes: list[tuple[Future[Any], object]] = []
        head, head_tree = self._committed
        b = _Batch(head, self._tip.tree, {})
        moved = False
        txn = self.env.begin(write=True)
        try:
            for op, fut in batch:
                try:
                    outcomes.append((fut, self._apply(txn, b, op)))
                except StoreError as exc:
                    outcomes.append((fut, exc))
            if b.head != head:
                records = (full_unpacked_object(o) for o in b.objects.values())
                base = git_packs.write_pack(self._pack_dir, records, len(b.objects), self._durable)
                self._packs[base] = len(b.objects)
                if not self._refs.set_if_equals(BRANCH, head, b.head):
                    raise RuntimeError(f"{BRANCH.decode()} moved under the store: is another process writing?")
                moved = True
                if self._durable:
                    fsync_dir(self.path / "refs" / "heads")
                txn.put(b"head", b.head, db=self._state)
            txn.commit()
        except BaseException as exc:
            txn.abort()
            if not moved:
                # Nothing is referenced: forget the batch's trees and fail every caller.
                self._tip.reset(head_tree)
                err = storage_failure(exc, "the artifact store")
                for _, fut in batch:
                    fut.set_exception(err)
                return
            # The commits are durable in Git but the index did not follow: rebuild it from HEAD.
            self._advance(b)
            try:
                with self.env.begin(write=True) as txn2:
                    self._reindex(txn2, b.tree)
                    txn2.put(b"head", b.head, db=self._state)
            except BaseException as exc2:
                self._broken = f"the index could not follow HEAD ({exc2!r}); reopen the store to rebuild it"
        else:
            self._advance(b)
            # Before acknowledging: once every caller has its answer no pack is being removed, so that
            # a `git fsck` run after the last write does not race a roll-up. While a compaction runs
            # only the packs written since its freeze may be rolled up (its squash reads the others):
            # without that a long squash left one pack per batch, hundreds, and every object lookup
            # (dulwich tries the packs one by one) slowed with them.
            movable = self._packs if self._frozen is None else self._unfrozen()
            if len(movable) > self._max_packs:
                try:
                    self._roll_up(movable)
                except Exception:  # the batch is durable: keep the packs as they are, retry after the next
                    log.exception("pack roll-up failed")
        for fut, res in outcomes:
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _advance(self, b: _Batch) -> None:
        """The batch's commits are durable in Git: HEAD is its tip, its bytes count, and while a
        compaction runs its commits join those the swap will re-parent."""
        self._committed = (b.head, b.tree)
        b.count_into(self._history)
        if self._frozen is not None:
            self._since.extend(o for o in b.objects.values() if isinstance(o, Commit))

    def _apply(self, txn: lmdb.Transaction, b: _Batch, op: _Op | _Control) -> object:
        assert not isinstance(op, _Freeze | _Squashed), "invariant: a compaction's step is a batch of its own"
        if isinstance(op, WriteOp):
            return self._apply_write(txn, b, op)
        if isinstance(op, DeleteOp):
            return self._apply_delete(txn, b, op)
        return self._apply_reset(txn, b, op)

    def _apply_write(self, txn: lmdb.Transaction, b: _Batch, op: WriteOp) -> WriteReceipt:
        key = op.id.encode()
        raw = txn.get(key, db=self._arts)
        old = _entry_dec.decode(raw) if raw is not None else None
        before = self._owned(txn, op.agent)
        owner, old_size = (old.meta.owner, old.meta.size) if old is not None else (None, 0)
        after = check_write(op, owner, old_size, before)
        size = len(op.content)
        now = time.time()
        meta = _Meta(
            kind=op.kind,
            creator=old.meta.creator if old is not None else op.agent,
            owner=op.agent,
            price=op.price,
            readable=op.readable,
            created=old.meta.created if old is not None else now,
            updated=now,
            size=size,
        )
        blob = b.add(Blob.from_string(op.content))
        meta_blob = b.add(Blob.from_string(msgspec.json.encode(meta) + b"\n"))
        self._tip.set(b, op.id, (blob, meta_blob))
        commit = _chain(b, _ident(op.agent, "agents.invalid"), f"write {op.id} ({size} bytes)", now)
        txn.put(key, _enc.encode(_Entry(meta, blob, meta_blob)), db=self._arts)
        self._set_owned(txn, op.agent, after)
        b.written[op.agent] = b.written.get(op.agent, 0) + size
        return WriteReceipt(op.id, commit.decode(), old is None, size, after)

    def _apply_delete(self, txn: lmdb.Transaction, b: _Batch, op: DeleteOp) -> str:
        key = op.id.encode()
        raw = txn.get(key, db=self._arts)
        old = _entry_dec.decode(raw) if raw is not None else None
        check_delete(op, old.meta.owner if old is not None else None, old.meta.readable if old is not None else None)
        assert old is not None
        self._tip.set(b, op.id, None)
        commit = _chain(b, _ident(op.agent, "agents.invalid"), f"delete {op.id}", time.time())
        txn.delete(key, db=self._arts)
        self._set_owned(txn, op.agent, self._owned(txn, op.agent) - old.meta.size)
        return commit.decode()

    def _apply_reset(self, txn: lmdb.Transaction, b: _Batch, op: _Reset) -> str:
        target = self._wobjects[op.target]
        assert isinstance(target, Commit), f"invariant: resolved {op.target!r} is not a commit"
        self._tip.reset(target.tree)
        b.tree = target.tree
        commit = _chain(b, _ident(op.operator, "operators.invalid"), f"system reset to {op.target.decode()}", None)
        self._reindex(txn, target.tree)
        return commit.decode()

    # ------------------------------------------------------------------------------- index

    def _owned(self, txn: lmdb.Transaction, agent: str) -> int:
        v = txn.get(agent.encode(), db=self._usage)
        return _U64.unpack(v)[0] if v is not None else 0

    def _set_owned(self, txn: lmdb.Transaction, agent: str, value: int) -> None:
        assert value >= 0, f"invariant: `{agent}` would own {value} bytes"
        if value:
            txn.put(agent.encode(), _U64.pack(value), db=self._usage)
        else:
            txn.delete(agent.encode(), db=self._usage)

    def _reindex(self, txn: lmdb.Transaction, tree: ObjectID) -> None:
        """Replace the index's artifacts and usage with those of ``tree`` (read from the repository by
        the writer's object store: called by the writer thread, or before it starts)."""
        txn.drop(self._arts, delete=False)
        txn.drop(self._usage, delete=False)
        owned: dict[str, int] = {}
        objects = self._wobjects
        for aid, (blob, meta_blob) in _scan(objects.__getitem__, tree).items():
            meta = _read_meta(objects.get_raw, meta_blob)
            txn.put(aid.encode(), _enc.encode(_Entry(meta, blob, meta_blob)), db=self._arts)
            owned[meta.owner] = owned.get(meta.owner, 0) + meta.size
        for agent, n in owned.items():
            self._set_owned(txn, agent, n)

    # ------------------------------------------------------------------------------- packs

    def _unfrozen(self) -> dict[str, int]:
        """The packs a running compaction does not read: those written since its freeze."""
        frozen = self._frozen.packs if self._frozen is not None else frozenset()
        return {base: n for base, n in self._packs.items() if base not in frozen}

    def _roll_up(self, packs: dict[str, int]) -> None:
        """Merge the smaller of ``packs`` (some of ``_packs``) into one (``git_packs.to_roll_up``), drop
        the merged ones."""
        bases = git_packs.to_roll_up(packs, self._max_packs)
        base, count = git_packs.merge_packs(self._pack_dir, bases, self._wobjects.get_raw, self._durable)
        for old in bases:
            del self._packs[old]
            if old != base:  # the merge may reproduce a pack byte for byte (the others held only copies)
                git_packs.remove_pack(self._pack_dir, old)
        self._packs[base] = count
        if self._durable:
            fsync_dir(self._pack_dir)
        self._reopen_objects()

    # ---------------------------------------------------------------------------- compaction

    def _freeze(self) -> _Frozen:
        """The writer's first step of ``compact``: note HEAD and its packs; no roll-up until ``_swap``."""
        if self._frozen is not None:
            raise StoreError("busy", "a compaction of the store is already running")
        before = sum(p.stat().st_size for p in self._pack_dir.glob("pack-*.pack"))
        self._frozen = _Frozen(self._committed[0], frozenset(self._packs), before, dict(self._history))
        self._since = []
        return self._frozen

    def _build_squash(self, frozen: _Frozen, horizon: float) -> _Squashed:
        """The squash of ``compact``, off the writer: the new chain for the frozen head and its pack."""
        objects = self._open_objects()  # its own: the writer's and the readers' are theirs
        try:
            newer: builtins.list[Commit] = []
            base: Commit | None = None
            for c in self._first_parents_of(objects, frozen.head):
                if c.commit_time >= horizon:
                    newer.append(c)
                else:
                    base = c
                    break
            if base is None:
                return _Squashed(frozen, None, None, 0, {}, kept=len(newer))
            chain = builtins.list(self._first_parents_of(objects, base.id))
            b = _squash(objects, base, chain[-1])
            for c in reversed(newer):
                pace()
                n = c.copy()
                assert isinstance(n, Commit)
                n.parents = [b.head]
                b.head = b.add(n)
            if b.head == frozen.head:  # already compacted at this horizon
                return _Squashed(frozen, None, None, 0, {}, kept=len(newer))
            reached = _reachable(objects.__getitem__, b.objects, [*(c.tree for c in newer), base.tree])
            records = (full_unpacked_object(o) for o in paced(reached.values()))
            pack = git_packs.write_pack(self._pack_dir, records, len(reached), self._durable)
            commits = (o for o in b.objects.values() if isinstance(o, Commit))
            return _Squashed(frozen, b.head, pack, len(reached), _written(commits), len(chain), len(newer), b.artifacts)
        finally:
            objects.close()

    def _swap(self, sq: _Squashed) -> HistoryCompaction:
        """The writer's last step of ``compact``: put the squashed history under the commits made since
        the freeze, move the branch, drop the frozen packs. Short: those commits are re-parented, no
        tree or blob is read or written (a reset's tree excepted, copied whole into the commits' pack)."""
        frozen, self._frozen = sq.frozen, None
        since, self._since = self._since, []
        head, tree = self._committed
        before = frozen.pack_bytes
        if sq.head is None or sq.pack is None:
            return HistoryCompaction(0, sq.kept, 0, before, before, head.decode())
        assert (since[0].parents[0] if since else frozen.head) == frozen.head and (
            since[-1].id if since else frozen.head
        ) == head, "invariant: the commits since the freeze run from the frozen head to HEAD"
        b = _Batch(sq.head, tree, {})
        resets: builtins.list[ObjectID] = []
        for c in since:
            n = c.copy()
            assert isinstance(n, Commit)
            n.parents = [b.head]
            b.head = b.add(n)
            if n.message.startswith(b"system reset"):
                resets.append(n.tree)  # its tree may be one only the frozen packs hold
        objects = _reachable(self._wobjects.__getitem__, b.objects, resets) if resets else b.objects
        new_packs = {sq.pack: sq.objects}
        if objects:
            records = (full_unpacked_object(o) for o in objects.values())
            new_packs[git_packs.write_pack(self._pack_dir, records, len(objects), self._durable)] = len(objects)
        if not self._refs.set_if_equals(BRANCH, head, b.head):
            raise RuntimeError(f"{BRANCH.decode()} moved under the store: is another process writing?")
        if self._durable:
            fsync_dir(self.path / "refs" / "heads")
        self._committed = (b.head, tree)
        with self.env.begin(write=True) as txn:
            txn.put(b"head", b.head, db=self._state)
        # The new history is durable and complete in the new packs and those written since the freeze.
        for old in frozen.packs:
            if old not in new_packs:
                git_packs.remove_pack(self._pack_dir, old)
                self._packs.pop(old, None)
        self._packs.update(new_packs)
        if self._durable:
            fsync_dir(self._pack_dir)
        self._reopen_objects()
        # Bytes written since the freeze, counted by the writer, on top of the new history's.
        history = dict(sq.written)
        for agent, total in self._history.items():
            if (more := total - frozen.history.get(agent, 0)) > 0:
                history[agent] = history.get(agent, 0) + more
        self._history = history
        after = sum(p.stat().st_size for p in self._pack_dir.glob("pack-*.pack"))
        return HistoryCompaction(sq.squashed, sq.kept + len(since), sq.artifacts, before, after, b.head.decode())

    def _reopen_objects(self) -> None:
        """Drop cached handles on removed packs (they would keep the deleted files' space)."""
        self._wobjects.close()
        self._wobjects = self._open_objects()
        with self._robjects_lock:
            self._robjects.close()
            self._robjects = self._open_objects()

    @staticmethod
    def _first_parents_of(objects: DiskObjectStore, sha: ObjectID) -> Iterator[Commit]:
        at: ObjectID | None = sha
        while at is not None:
            pace()
            c = objects[at]
            assert isinstance(c, Commit), f"invariant: {at!r} in the history is not a commit"
            yield c
            at = c.parents[0] if c.parents else None

    def history_usage(self) -> dict[str, int]:
        """Per author, the content bytes its write commits in the retained history carry."""
        return dict(self._history)

    # --------------------------------------------------------------------------------- reads

    def _check_open(self) -> None:
        if self.stopped:
            raise StoreError("closed", "the store is closed")
        if self._broken is not None:
            raise StoreError("closed", self._broken)

    def _entry(self, aid: str) -> _Entry | None:
        with self.env.begin() as txn:
            raw = txn.get(aid.encode(), db=self._arts)
        return _entry_dec.decode(raw) if raw is not None else None

    def _raw(self, sha: bytes) -> tuple[int, bytes]:
        # One object per lock hold: a long operator walk never keeps agents' reads waiting for long.
        with self._robjects_lock:
            return self._robjects.get_raw(ObjectID(sha))

    def _blob(self, sha: bytes) -> bytes:
        with self._robjects_lock:
            kept = self._blobs.get(sha)
            if kept is not None:
                self._blobs.move_to_end(sha)
                return kept
        type_num, raw = self._raw(sha)
        assert type_num == _BLOB, f"invariant: {sha!r} is not a blob"
        if len(raw) <= BLOB_CACHE_MAX:
            with self._robjects_lock:
                if sha not in self._blobs:
                    self._blobs[sha] = raw
                    self._blob_bytes += len(raw)
                while self._blob_bytes > BLOB_CACHE_BYTES:
                    self._blob_bytes -= len(self._blobs.popitem(last=False)[1])
        return raw

    def _obj(self, sha: bytes) -> ShaFile:
        with self._robjects_lock:
            return self._robjects[ObjectID(sha)]

    def read(self, agent: str, id: str) -> Artifact:
        """The artifact at HEAD, if ``agent`` may read it; ``not_found`` otherwise (even when it exists
        but is readable by its owner only: its existence is not revealed)."""
        self._check_open()
        aid = check_id(id)
        entry = self._entry(aid)
        if entry is None or not visible_to(entry.meta.readable, entry.meta.owner, agent):
            raise StoreError("not_found", f"no artifact `{aid}`")
        m = entry.meta
        content = self._blob(entry.blob)
        assert len(content) == m.size, f"invariant: `{aid}` is {len(content)} bytes, indexed as {m.size}"
        return _artifact(aid, m, content)

    def list(self, agent: str) -> builtins.list[ArtifactInfo]:
        """Every artifact at HEAD that ``agent`` can see (public ones and its own), by id."""
        return self._list(agent, None)

    async def list_async(self, agent: str, limit: int | None = None) -> builtins.list[ArtifactInfo]:
        """The first ``limit`` (all if None) artifacts of ``list``, for code on the event loop: the scan
        stops there. (Each agent's context asks for ten every turn: decoding the whole index instead,
        1,000 entries with 1,000 agents, was most of the event loop's time in the soak.)"""
        return self._list(agent, limit)

    def _list(self, agent: str, limit: int | None) -> builtins.list[ArtifactInfo]:
        self._check_open()
        out: builtins.list[ArtifactInfo] = []
        if limit is not None and limit <= 0:
            return out
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self._arts):
                e = _entry_dec.decode(v)
                if visible_to(e.meta.readable, e.meta.owner, agent):
                    out.append(e.info(bytes(k).decode()))
                    if len(out) == limit:
                        break
        return out

    def owned_bytes(self, agent: str) -> int:
        """Content bytes ``agent`` owns at HEAD."""
        self._check_open()
        with self.env.begin() as txn:
            return self._owned(txn, agent)

    def usage(self) -> dict[str, int]:
        """Content bytes owned at HEAD, per agent that owns any."""
        self._check_open()
        with self.env.begin() as txn:
            return {bytes(k).decode(): _U64.unpack(v)[0] for k, v in txn.cursor(db=self._usage)}

    def head(self) -> str:
        """The current HEAD commit (hex)."""
        return self._committed[0].decode()

    def indexed(self) -> dict[str, tuple[ArtifactInfo, str]]:
        """Every artifact in the HEAD index, with its content blob id."""
        self._check_open()
        with self.env.begin() as txn:
            entries = [(bytes(k).decode(), _entry_dec.decode(v)) for k, v in txn.cursor(db=self._arts)]
        return {aid: (e.info(aid), e.blob.decode()) for aid, e in entries}

    def walk_head(self) -> dict[str, tuple[ArtifactInfo, str]]:
        """Every artifact in HEAD's tree, read from the repository (not the index); sizes are the
        content blobs' real lengths. Operator only (it reads every blob)."""
        self._check_open()
        out: dict[str, tuple[ArtifactInfo, str]] = {}
        for aid, (blob, meta_blob) in _scan(self._obj, self._committed[1]).items():
            m = _read_meta(self._raw, meta_blob)
            size = len(self._blob(blob))
            info = ArtifactInfo(aid, m.kind, m.creator, m.owner, m.price, m.readable, m.created, m.updated, size)
            out[aid] = (info, blob.decode())
        return out

    # ------------------------------------------------------------------------- operator only

    def _first_parents(self) -> Iterator[Commit]:
        sha: ObjectID | None = self._committed[0]
        while sha is not None:
            c = self._obj(sha)
            assert isinstance(c, Commit), f"invariant: {sha!r} in the history is not a commit"
            yield c
            sha = c.parents[0] if c.parents else None

    def _resolve(self, commit: str) -> ObjectID:
        """A commit of HEAD's history, named by its full id or a unique prefix of at least 4 hex digits."""
        self._check_open()
        want = commit.strip().lower() if isinstance(commit, str) else ""
        if not _HEX_RE.match(want):
            raise StoreError("invalid", f"{commit!r} is not a commit id (4 to 40 hex digits)")
        found = [c.id for c in self._first_parents() if c.id.decode().startswith(want)]
        if not found:
            raise StoreError("not_found", f"no commit {want} in the store's history")
        if len(found) > 1:
            raise StoreError("invalid", f"commit prefix {want} is ambiguous ({len(found)} commits)")
        return found[0]

    def _lookup(self, tree: ObjectID, aid: str) -> tuple[ObjectID, ObjectID] | None:
        """``aid``'s (content, meta) blob ids in ``tree``, or None."""
        sha = tree
        for level in fanout(aid):
            t = self._obj(sha)
            assert isinstance(t, Tree)
            try:
                _, sha = t[level.encode()]
            except KeyError:
                return None
        leaf = self._obj(sha)
        assert isinstance(leaf, Tree)
        try:
            return leaf[aid.encode()][1], leaf[(aid + META_SUFFIX).encode()][1]
        except KeyError:
            return None

    def last_commit(self) -> CommitInfo:
        """What the HEAD commit did (for example, a reset made while the runtime was stopped)."""
        self._check_open()
        c = self._obj(self._committed[0])
        assert isinstance(c, Commit)
        subject = c.message.split(b"\n", 1)[0].decode(errors="replace")
        word, _, rest = subject.partition(" ")
        action: Literal["create", "write", "delete", "reset"]
        target: str | None = None
        if word in ("write", "delete"):
            action, target = ("write" if word == "write" else "delete"), rest.split(" ", 1)[0]
        elif word == "system":
            action = "reset"
        else:
            action = "create"
        author = c.author.split(b" <", 1)[0].decode(errors="replace")
        return CommitInfo(c.id.decode(), author, float(c.author_time), action, target, subject)

    def history(self, id: str) -> builtins.list[HistoryEntry]:
        """Every commit of HEAD's history that changed ``id`` (write, delete, or an operator's reset that
        touched it), newest first. Walks the history: operator only."""
        aid = check_id(id)
        self._check_open()
        out: builtins.list[HistoryEntry] = []
        for c in self._first_parents():
            first = c.message.split(b"\n", 1)[0].decode(errors="replace")
            action, _, rest = first.partition(" ")
            kind: Literal["write", "delete", "reset"]
            if action in ("write", "delete"):
                if rest.split(" ", 1)[0] != aid:
                    continue
                kind = "write" if action == "write" else "delete"
                now = self._lookup(c.tree, aid)
            elif action == "system" and c.parents:
                # A reset names no artifact: it changed this one if its blobs differ from the parent's.
                now = self._lookup(c.tree, aid)
                parent = self._obj(c.parents[0])
                assert isinstance(parent, Commit)
                if now == self._lookup(parent.tree, aid):
                    continue
                kind = "reset"
            else:
                continue
            size = _read_meta(self._raw, now[1]).size if now is not None else 0
            author = c.author.split(b" <", 1)[0].decode(errors="replace")
            out.append(HistoryEntry(c.id.decode(), author, float(c.author_time), kind, size))
        return out

    def show(self, id: str, commit: str) -> Artifact:
        """``id`` as it was at ``commit`` (a commit of HEAD's history). Operator only."""
        aid = check_id(id)
        c = self._obj(self._resolve(commit))
        assert isinstance(c, Commit)
        found = self._lookup(c.tree, aid)
        if found is None:
            raise StoreError("not_found", f"no artifact `{aid}` at commit {c.id.decode()}")
        m = _read_meta(self._raw, found[1])
        content = self._blob(found[0])
        return _artifact(aid, m, content)

    def free_bytes(self) -> int | None:
        """Free bytes on the repository's volume (one statvfs: cheap beside a write's fsyncs)."""
        return shutil.disk_usage(self.path).free

    # -------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Apply what is queued, stop the writer, and release the index, the packs and the lock."""
        if not self._stop_writer():
            return
        self.env.close()
        self._wobjects.close()
        with self._robjects_lock:
            self._robjects.close()
        os.close(self._lock_fd)


# ----------------------------------------------------------------------------------------- module


def _artifact(aid: str, m: _Meta, content: bytes) -> Artifact:
    return Artifact(aid, m.kind, m.creator, m.owner, m.price, m.readable, m.created, m.updated, len(content), content)


_WRITE_RE = re.compile(rb"^write \S+ \((\d+) bytes")


def _written(commits: Iterator[Commit]) -> dict[str, int]:
    """Content bytes per author of the write commits among ``commits`` (from their subjects)."""
    out: dict[str, int] = {}
    for c in paced(commits):
        m = _WRITE_RE.match(c.message)
        if m:
            author = c.author.split(b" <", 1)[0].decode(errors="replace")
            out[author] = out.get(author, 0) + int(m.group(1))
    return out


def _squash(objects: DiskObjectStore, base: Commit, root: Commit) -> _Batch:
    """A new chain for ``base``'s tree: a root commit of the empty tree at the old root's time, then one
    commit per artifact, oldest update first, built on a scratch tip of its own."""
    empty = Tree()
    b = _Batch(ObjectID(b""), empty.id, {})
    b.add(empty)
    first = Commit()
    first.tree = empty.id
    first.author = first.committer = COMMITTER
    first.author_time = first.commit_time = root.commit_time
    first.author_timezone = first.commit_timezone = 0
    first.message = b"create artifact store (older history squashed)\n"
    b.head = b.add(first)
    entries = _scan(objects.__getitem__, base.tree)
    metas = {aid: _read_meta(objects.get_raw, blobs[1]) for aid, blobs in paced(entries.items())}
    tip = _Tip(empty.id, objects.__getitem__, {"": {}})
    for aid in paced(sorted(entries, key=lambda a: (metas[a].updated, a))):
        m = metas[aid]
        tip.set(b, aid, entries[aid])
        _chain(b, _ident(m.owner, "agents.invalid"), f"write {aid} ({m.size} bytes, older history squashed)", m.updated)
    assert b.tree == base.tree, f"invariant: the squash rebuilt {b.tree!r}, not the base tree {base.tree!r}"
    b.artifacts = len(entries)
    return b


def _reachable(
    get: Callable[[ObjectID], ShaFile], new: dict[ObjectID, ShaFile], trees: list[ObjectID]
) -> dict[ObjectID, ShaFile]:
    """``new`` and every object the ``trees`` reach, read with ``get`` unless ``new`` holds it (a
    subtree already taken is not walked again)."""
    out = dict(new)
    seen: set[ObjectID] = set()
    stack = list(trees)
    while stack:
        pace()
        sha = stack.pop()
        if sha in seen:
            continue
        seen.add(sha)
        obj = out.get(sha)
        if obj is None:
            obj = out[sha] = get(sha)
        if isinstance(obj, Tree):
            stack.extend(e.sha for e in obj.iteritems() if e.sha not in seen)
    return out


def _read_meta(raw: Callable[[ObjectID], tuple[int, bytes]], sha: ObjectID) -> _Meta:
    type_num, data = raw(sha)
    assert type_num == _BLOB, f"invariant: metadata {sha!r} is not a blob"
    return _meta_json_dec.decode(data)


def _scan(get: Callable[[ObjectID], ShaFile], tree: ObjectID) -> dict[str, tuple[ObjectID, ObjectID]]:
    """Every artifact in ``tree``: id -> (content blob, metadata blob). Raises ``StoreError("invalid")``
    when the tree is not a store's (a blob without its metadata, or the reverse, or a stray entry)."""
    content: dict[str, ObjectID] = {}
    metas: dict[str, ObjectID] = {}
    stack = [(tree, 0)]
    while stack:
        pace()
        sha, depth = stack.pop()
        t = get(sha)
        assert isinstance(t, Tree), f"invariant: {sha!r} is not a tree"
        for e in t.iteritems():
            name = e.path.decode()
            if depth < FANOUT_LEVELS:
                if e.mode != _DIR_MODE:
                    raise StoreError("invalid", f"stray file {name!r} at fan-out depth {depth} of tree {tree!r}")
                stack.append((e.sha, depth + 1))
            elif name.endswith(META_SUFFIX):
                metas[name[: -len(META_SUFFIX)]] = e.sha
            else:
                content[name] = e.sha
    if content.keys() != metas.keys():
        odd = sorted(content.keys() ^ metas.keys())
        raise StoreError("invalid", f"artifacts without content or metadata in tree {tree!r}: {odd[:5]}")
    return {aid: (content[aid], metas[aid]) for aid in content}
