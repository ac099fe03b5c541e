"""A node's copy of HEAD's artifact metadata, for listings on the event loop of a shared store.

Every agent's turn lists the artifacts it can see; on a shared store that would be a query per turn,
which returns rows that almost never changed since the last one. This cache holds the metadata
(``ArtifactInfo``, no content) of every artifact at HEAD, each with the commit that last wrote it.

Where its entries come from, and why they stay true:

- the node's own store writer puts what it committed (``wrote``, ``deleted``), right after the commit;
- an artifact event of another node (``artifact_written``, ``artifact_deleted``; the node's event
  stream, ``runtime.backends.follow_shared_caches``) marks the id ``dirty``; the next listing reads the
  dirty ids again, in one statement, before it answers. ``system_reset`` (an operator's rollback)
  drops everything;
- a full read when the cache is empty or older than ``max_age_s``: the bound on how long a change
  that announces itself to nobody (a rollback while the node runs, a message lost with Redis down)
  stays unseen.

Merging what a read found with what was put meanwhile (reads are awaited; the writer runs on its own
thread): for an id the read found, the later commit wins (an artifact's commit ids increase in the
order its writes committed); an id the read did not find is dropped unless it was written or marked
after the read began (``token``), since the read's snapshot may predate that write.

Invariant (asserted): ``_ids`` is the sorted list of the ids in ``_infos``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Collection, Iterable

from runtime.world.store import ArtifactInfo, visible_to

#: (commit that last wrote the artifact, its metadata).
Versioned = tuple[int, ArtifactInfo]


class HeadCache:
    """HEAD's metadata (see the module docstring). Thread-safe: the store's writer puts, the event
    stream's threads mark, the event loop reads and merges."""

    def __init__(self, max_age_s: float = 5.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._infos: dict[str, Versioned] = {}
        self._ids: list[str] = []
        #: id -> commit of its deletion (a read's older row of it is not put back).
        self._gone: dict[str, int] = {}
        #: id -> the counter when it was last written or marked.
        self._touched: dict[str, int] = {}
        self._counter = 0
        self._loaded_at: float | None = None
        self._dirty: set[str] = set()
        #: Listings answered without a read, and reads made (full, and of dirty ids).
        self.hits = 0
        self.full_reads = 0
        self.dirty_reads = 0

    # ---------------------------------------------------------------- what the cache is told

    def _touch(self, aid: str) -> None:
        self._counter += 1
        self._touched[aid] = self._counter

    def _set(self, aid: str, versioned: Versioned | None) -> None:
        had = aid in self._infos
        if versioned is None:
            if had:
                del self._infos[aid]
                self._ids.pop(bisect.bisect_left(self._ids, aid))
        else:
            self._infos[aid] = versioned
            if not had:
                bisect.insort(self._ids, aid)
        assert len(self._ids) == len(self._infos), "invariant: the sorted ids are the cached ids"

    def wrote(self, commit: int, info: ArtifactInfo) -> None:
        """This node committed a write of ``info.id`` as ``commit``."""
        with self._lock:
            self._touch(info.id)
            old = self._infos.get(info.id)
            if old is None or old[0] <= commit:
                self._set(info.id, (commit, info))
                self._gone.pop(info.id, None)

    def deleted(self, commit: int, aid: str) -> None:
        """This node committed the deletion of ``aid`` as ``commit``."""
        with self._lock:
            self._touch(aid)
            old = self._infos.get(aid)
            if old is None or old[0] <= commit:
                self._set(aid, None)
                self._gone[aid] = commit

    def dirty(self, ids: Iterable[str]) -> None:
        """Another node changed these artifacts: read them again before the next listing."""
        with self._lock:
            for aid in ids:
                self._touch(aid)
                self._dirty.add(aid)

    def drop(self) -> None:
        """Forget everything (a rollback): the next listing reads HEAD whole."""
        with self._lock:
            self._loaded_at = None
            self._dirty.clear()

    # ------------------------------------------------------------------------- reading

    def token(self) -> int:
        """Taken before a read; ``merge`` needs it."""
        with self._lock:
            return self._counter

    def needs(self) -> tuple[bool, set[str]]:
        """What a listing must read first: HEAD whole (True), or these dirty ids (taken off the list)."""
        with self._lock:
            loaded = self._loaded_at
            if loaded is None or self._clock() - loaded > self.max_age_s:
                self._dirty.clear()
                return True, set()
            taken, self._dirty = self._dirty, set()
            return False, taken

    def merge(self, found: Collection[Versioned], scope: Collection[str] | None, token: int) -> None:
        """Merge a read made since ``token``: ``found`` are the rows it returned; ``scope`` the ids it
        asked for (None: HEAD whole, which also restarts the age)."""
        with self._lock:
            seen = set()
            for commit, info in found:
                seen.add(info.id)
                old = self._infos.get(info.id)
                if (old is None or old[0] <= commit) and self._gone.get(info.id, -1) < commit:
                    self._set(info.id, (commit, info))
            for aid in list(self._infos) if scope is None else scope:
                if aid not in seen and self._touched.get(aid, 0) <= token:
                    self._set(aid, None)
            if scope is None:
                self._loaded_at = self._clock()
                self.full_reads += 1
            else:
                self.dirty_reads += 1

    def visible(self, agent: str, limit: int | None) -> list[ArtifactInfo]:
        """What ``agent`` can see (public artifacts and its own), by id, the first ``limit`` of them."""
        out: list[ArtifactInfo] = []
        with self._lock:
            self.hits += 1
            if limit is not None and limit <= 0:
                return out  # as the Git store's listing: a limit of 0 asks for none
            for aid in self._ids:
                info = self._infos[aid][1]
                if visible_to(info.readable, info.owner, agent):
                    out.append(info)
                    if limit is not None and len(out) >= limit:
                        break
        return out
