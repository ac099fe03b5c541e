"""Agent memory: texts an agent chose to remember, found again by vector similarity.

Each agent has its own memory (one collection per agent in the backend). An agent remembers a text
with the vector a worker computed for it (``native.embed``, charged to the agent like any task: this
module never embeds), recalls the items nearest a query vector, and forgets items by id. An agent only
ever reaches its own memory: every operation is scoped by the agent's name, and an item id of another
agent is simply ``not_found``.

Rules every backend keeps:

- an item's size is its text's UTF-8 bytes plus 4 bytes per vector dimension (the vector as float32,
  which is what a Qdrant server stores); an agent's usage is the sum of its items' sizes;
- a ``remember`` that would take the agent's usage above ``quota_bytes`` is refused with
  ``MemoryQuotaExceeded`` and stores nothing; ``forget`` gives the item's bytes back;
- invalid input (agent name, text, vector, item id, ``k``) is refused with a ``MemoryStoreError`` that
  says what was wrong, before anything is stored;
- what ``remember`` stored is durable when it returns, and is there after a restart.

The backend is ``runtime.world.memory.qdrant.QdrantMemory`` (qdrant-client, local mode or a server).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from typing import Protocol

from msgspec import Struct

from runtime.errors import AecoError, ErrorCode
from runtime.world.store import AGENT_PATTERN

#: A memory's text may be at most this many UTF-8 bytes (a note, not a document: artifacts hold those).
MAX_TEXT_BYTES = 4096
#: ``recall`` returns at most this many items.
MAX_RECALL = 100
#: Bytes charged per vector dimension (float32).
BYTES_PER_DIM = 4

_AGENT_RE = re.compile(AGENT_PATTERN)


class MemoryStoreError(AecoError, ValueError):
    """An operation the memory store refused; nothing of it was stored. ``code`` says why.

    Deliberately not a subclass of the builtin ``MemoryError``: that one means the process ran out of
    RAM, and code that handles it (the worker's ``memory_exceeded``) must never see a quota refusal.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)


class MemoryQuotaExceeded(MemoryStoreError):
    """``remember`` would take the agent above its memory quota; nothing was stored."""

    def __init__(self, agent: str, size: int, used: int, quota: int) -> None:
        super().__init__(
            "quota_exceeded",
            f"agent {agent!r} uses {used} of {quota} memory bytes; an item of {size} bytes does not fit "
            f"(forget something first)",
        )
        self.agent, self.size, self.used, self.quota = agent, size, used, quota


class MemoryItem(Struct, frozen=True, forbid_unknown_fields=True):
    """One remembered text."""

    #: A UUID (string form), assigned by the store.
    id: str
    agent: str
    text: str
    #: When it was remembered (Unix seconds).
    at: float
    #: What it costs the agent's quota: UTF-8 bytes of ``text`` + ``BYTES_PER_DIM`` × the store's dim.
    size_bytes: int


class Recall(Struct, frozen=True):
    """An item found by ``recall`` and its cosine similarity to the query (1 is identical)."""

    item: MemoryItem
    score: float


class MemoryStore(Protocol):
    """What the runtime needs from an agent memory. Every mutation is durable when it returns."""

    #: Length of every vector the store accepts.
    dim: int

    def remember(self, agent: str, text: str, vector: Sequence[float], *, quota_bytes: int) -> MemoryItem:
        """Store ``text`` with its ``vector`` for ``agent``; ``MemoryQuotaExceeded`` if over ``quota_bytes``."""
        ...

    def recall(self, agent: str, vector: Sequence[float], k: int = 5) -> list[Recall]:
        """Up to ``k`` of ``agent``'s own items nearest ``vector``, most similar first."""
        ...

    def forget(self, agent: str, item_id: str) -> MemoryItem:
        """Delete one of ``agent``'s items and return it (its bytes go back to the quota); else ``not_found``."""
        ...

    def used_bytes(self, agent: str) -> int:
        """The sum of ``size_bytes`` of ``agent``'s items."""
        ...

    def count(self, agent: str) -> int:
        """How many items ``agent`` has."""
        ...

    def close(self) -> None:
        """Release the store (idempotent); every later call raises ``closed``."""
        ...


# ----------------------------------------------------------------------------------- validation


def check_agent(agent: object) -> str:
    """``agent`` if it is a valid agent name, else ``invalid_agent``."""
    if not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent):
        raise MemoryStoreError("invalid_agent", f"agent {agent!r} is not a valid name ({AGENT_PATTERN})")
    return agent


def text_bytes(text: object) -> int:
    """The UTF-8 size of a text that may be remembered, else ``invalid_text``."""
    if not isinstance(text, str):
        raise MemoryStoreError("invalid_text", f"text must be a str, not {type(text).__name__}")
    if not text.strip():
        raise MemoryStoreError("invalid_text", "text is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise MemoryStoreError("invalid_text", f"text is not valid Unicode ({exc.reason} at {exc.start})") from None
    if size > MAX_TEXT_BYTES:
        raise MemoryStoreError("invalid_text", f"text is {size} bytes in UTF-8; at most {MAX_TEXT_BYTES} allowed")
    return size


def check_vector(vector: object, dim: int) -> list[float]:
    """``vector`` as a list of ``dim`` finite floats, not all zero; else ``invalid_vector``."""
    if isinstance(vector, (str, bytes)) or not isinstance(vector, Sequence):
        raise MemoryStoreError("invalid_vector", f"vector must be a sequence of floats, not {type(vector).__name__}")
    if len(vector) != dim:
        raise MemoryStoreError("invalid_vector", f"vector has {len(vector)} dimensions; this store takes {dim}")
    out: list[float] = []
    for i, x in enumerate(vector):
        # bool is an int, but a vector of True/False is a caller's mistake, not an embedding.
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise MemoryStoreError("invalid_vector", f"vector[{i}] is {type(x).__name__}, not a float")
        if not math.isfinite(x):
            raise MemoryStoreError("invalid_vector", f"vector[{i}] is {x}: every component must be finite")
        out.append(float(x))
    # Similarity is cosine: a zero vector has none to anything, and a backend would divide by zero.
    if not any(out):
        raise MemoryStoreError("invalid_vector", "vector is all zeros: cosine similarity is undefined for it")
    return out


def check_item_id(item_id: object) -> str:
    """``item_id`` in canonical UUID form, else ``invalid_id``."""
    if isinstance(item_id, str) and len(item_id) <= 64:
        try:
            return str(uuid.UUID(item_id))
        except ValueError:
            pass
    raise MemoryStoreError("invalid_id", f"item id {item_id!r:.80} is not a UUID")


def check_k(k: object) -> int:
    """``k`` if it is an int in 1..``MAX_RECALL``, else ``invalid``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RECALL:
        raise MemoryStoreError("invalid", f"k must be an integer from 1 to {MAX_RECALL}, not {k!r}")
    return k


def item_size(text_size: int, dim: int) -> int:
    """What an item costs the quota: its text's UTF-8 bytes plus ``BYTES_PER_DIM`` × ``dim``."""
    return text_size + BYTES_PER_DIM * dim
