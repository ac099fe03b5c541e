"""The memory backend: qdrant-client, in local mode under a directory or against a Qdrant server.

One collection per agent, ``mem_<agent>``, created by the agent's first ``remember``: cosine distance,
``dim`` dimensions, one point per item (id = the item's UUID, payload = its agent, text, time and size).

Local mode (the embedded default) keeps each collection in SQLite under ``path`` and searches by brute
force (~16 ms per query over 10k × 384 vectors on these hosts); every upsert and delete is committed
before it returns. Only one client may open a path: a second ``QdrantMemory`` on the same path, in this
process or another, gets a ``busy`` error naming the holder's pid, instead of qdrant-client's generic
RuntimeError (or, for a client opened behind qdrant's back, a corrupted store).

Usage per agent (bytes, items) is counted from the collection the first time the agent is touched, then
kept up to date by this object, so ``used_bytes`` and the quota check cost nothing per call. That is
exact because each agent's collection has exactly one writer: this object in local mode (the lock), and
the agent's own node with a shared server (agents are partitioned across nodes).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from runtime.world.memory import (
    MemoryItem,
    MemoryQuotaExceeded,
    MemoryStoreError,
    Recall,
    check_agent,
    check_item_id,
    check_k,
    check_vector,
    item_size,
    text_bytes,
)

#: Our lock file inside a local store (qdrant-client keeps its own ``.lock`` beside it).
LOCK_NAME = "aeco-memory.lock"
_PREFIX = "mem_"
_SCROLL_PAGE = 1024


def collection_name(agent: str) -> str:
    """The collection that holds ``agent``'s memory."""
    return _PREFIX + agent


class _PathLock:
    """An exclusive ``flock`` on ``<dir>/aeco-memory.lock`` holding the owner's pid.

    flock is per open file, so it also refuses a second store opened in the same process, and the
    kernel drops it when the holder dies: a crashed supervisor never leaves the store locked.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        # Opened without O_TRUNC: the holder's pid must survive a refused attempt, for the message.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            here = " (this process)" if holder == str(os.getpid()) else ""
            raise MemoryStoreError(
                "busy",
                f"memory store {directory} is already open by pid {holder}{here}; qdrant local mode allows one "
                "client per path: close the other QdrantMemory first, or share a Qdrant server (url=...)",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the open file drops the flock


class QdrantMemory:
    """Agent memory in qdrant-client: local mode under ``path``, or a Qdrant server at ``url``.

    Thread-safe: one lock serialises every call, because local mode's collections are plain Python
    objects over SQLite, and because a quota check and the insert it admits must not interleave.
    """

    def __init__(self, path: Path | str | None = None, url: str | None = None, dim: int = 384) -> None:
        if (path is None) == (url is None):
            raise ValueError("give exactly one of path (local mode, a directory) or url (a Qdrant server)")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, not {dim!r}")
        self.dim = dim
        self.path = Path(path) if path is not None else None
        self.url = url
        self._lock = threading.RLock()
        #: agent -> (bytes used, items) for every agent touched since opening.
        self._usage: dict[str, tuple[int, int]] = {}
        #: Agents whose collection is known to exist (with the right dimension).
        self._collections: set[str] = set()
        self._closed = False
        self._path_lock: _PathLock | None = None
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._path_lock = _PathLock(self.path)
            try:
                # Every call is serialised by self._lock, so SQLite connections may be used from whichever
                # thread (asyncio.to_thread) the caller is on.
                self.client = QdrantClient(path=str(self.path), force_disable_check_same_thread=True)
            except BaseException:
                self._path_lock.release()
                raise
        else:
            # check_compatibility asks the server for its version and only warns if it can't: probe
            # ourselves instead, so an unreachable server fails here, with its address, not on first use.
            self.client = QdrantClient(url=url, check_compatibility=False, timeout=10)
            try:
                self.client.get_collections()
            except Exception as exc:
                self.client.close()
                raise MemoryStoreError("unavailable", f"cannot reach Qdrant at {url}: {exc}") from None

    # -------------------------------------------------------------------------------- operations

    def remember(self, agent: str, text: str, vector: Sequence[float], *, quota_bytes: int) -> MemoryItem:
        """Store ``text`` and its ``vector`` in ``agent``'s memory; durable when it returns.

        ``quota_bytes`` is the agent's memory quota: if the item's size would take its usage above it, the
        call raises ``MemoryQuotaExceeded`` and stores nothing.
        """
        agent = check_agent(agent)
        size = item_size(text_bytes(text), self.dim)
        vec = check_vector(vector, self.dim)
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 0:
            raise MemoryStoreError("invalid", f"quota_bytes must be a non-negative integer, not {quota_bytes!r}")
        with self._lock:
            self._check_open()
            used, n = self._state(agent)
            if used + size > quota_bytes:
                raise MemoryQuotaExceeded(agent, size, used, quota_bytes)
            self._ensure_collection(agent)
            item = MemoryItem(id=str(uuid.uuid4()), agent=agent, text=text, at=time.time(), size_bytes=size)
            payload = {"agent": agent, "text": text, "at": item.at, "size_bytes": size}
            point = qm.PointStruct(id=item.id, vector=vec, payload=payload)
            try:
                self.client.upsert(collection_name(agent), points=[point], wait=True)
            except BaseException:
                # Whether the point got in is unknown (local mode updates memory before SQLite): recount
                # the agent from the collection next time rather than trust either guess.
                self._usage.pop(agent, None)
                raise
            self._usage[agent] = (used + size, n + 1)
            return item

    def recall(self, agent: str, vector: Sequence[float], k: int = 5) -> list[Recall]:
        """Up to ``k`` of ``agent``'s items nearest ``vector`` by cosine similarity, most similar first."""
        agent = check_agent(agent)
        vec = check_vector(vector, self.dim)
        k = check_k(k)
        with self._lock:
            self._check_open()
            if self._state(agent)[1] == 0:
                return []
            res = self.client.query_points(collection_name(agent), query=vec, limit=k, with_payload=True)
            out = []
            for p in res.points:
                item = self._item(agent, p.id, p.payload)
                out.append(Recall(item=item, score=float(p.score)))
            return out

    def forget(self, agent: str, item_id: str) -> MemoryItem:
        """Delete ``item_id`` from ``agent``'s memory and return it; ``not_found`` if the agent has no such item."""
        agent = check_agent(agent)
        item_id = check_item_id(item_id)
        with self._lock:
            self._check_open()
            used, n = self._state(agent)
            if n == 0:
                raise MemoryStoreError("not_found", f"agent {agent!r} has no memory {item_id}")
            name = collection_name(agent)
            found = self.client.retrieve(name, ids=[item_id], with_payload=True, with_vectors=False)
            if not found:
                raise MemoryStoreError("not_found", f"agent {agent!r} has no memory {item_id}")
            item = self._item(agent, found[0].id, found[0].payload)
            try:
                self.client.delete(name, points_selector=qm.PointIdsList(points=[item_id]), wait=True)
            except BaseException:
                self._usage.pop(agent, None)  # as in remember: recount rather than guess
                raise
            self._usage[agent] = (used - item.size_bytes, n - 1)
            return item

    def used_bytes(self, agent: str) -> int:
        """The sum of ``size_bytes`` over ``agent``'s items (0 for an agent that never remembered)."""
        agent = check_agent(agent)
        with self._lock:
            self._check_open()
            return self._state(agent)[0]

    def count(self, agent: str) -> int:
        """How many items ``agent`` has."""
        agent = check_agent(agent)
        with self._lock:
            self._check_open()
            return self._state(agent)[1]

    def close(self) -> None:
        """Close the client and release the path (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.client.close()
            finally:
                if self._path_lock is not None:
                    self._path_lock.release()

    def __enter__(self) -> QdrantMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryStoreError("closed", "the memory store is closed")

    def _state(self, agent: str) -> tuple[int, int]:
        """(bytes used, items) of ``agent``, counted from its collection on first use."""
        state = self._usage.get(agent)
        if state is not None:
            return state
        name = collection_name(agent)
        used = n = 0
        if self.client.collection_exists(name):
            self._check_dim(name)
            self._collections.add(agent)
            offset: Any = None
            while True:
                points, offset = self.client.scroll(
                    name, limit=_SCROLL_PAGE, offset=offset, with_payload=["size_bytes"], with_vectors=False
                )
                for p in points:
                    used += int((p.payload or {})["size_bytes"])
                n += len(points)
                if offset is None:
                    break
        self._usage[agent] = (used, n)
        return used, n

    def _ensure_collection(self, agent: str) -> None:
        if agent in self._collections:
            return
        name = collection_name(agent)
        if not self.client.collection_exists(name):
            self.client.create_collection(
                name, vectors_config=qm.VectorParams(size=self.dim, distance=qm.Distance.COSINE)
            )
        else:
            self._check_dim(name)
        self._collections.add(agent)

    def _check_dim(self, name: str) -> None:
        # A store reopened with another dim (or a server collection made by someone else) would fail on
        # every insert with qdrant's own message; say what is wrong once, by name.
        vectors = self.client.get_collection(name).config.params.vectors
        if not isinstance(vectors, qm.VectorParams) or vectors.size != self.dim:
            raise MemoryStoreError(
                "invalid", f"collection {name} holds vectors {vectors!r}, but this store takes {self.dim} dimensions"
            )

    @staticmethod
    def _item(agent: str, point_id: Any, payload: dict[str, Any] | None) -> MemoryItem:
        item = msgspec.convert({**(payload or {}), "id": str(point_id)}, MemoryItem)
        # Collections are per agent, so this holds by construction; checked because a breach would leak
        # one agent's memories to another.
        if item.agent != agent:
            raise MemoryStoreError("invalid", f"memory {item.id} in {collection_name(agent)} belongs to {item.agent!r}")
        return item
