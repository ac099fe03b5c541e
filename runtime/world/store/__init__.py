"""The artifact store: what agents read, write and invoke, kept as a versioned history.

An artifact is an id, bytes, a kind (``data`` or ``code``), its creator and owner, a price in scrip per
invocation, who may read it, and timestamps. Agents reach only HEAD: ``write``, ``delete``, ``read``,
``list``, ``owned_bytes``. History is the operator's: ``history``, ``show`` and ``rollback`` are on the
same class but are never exposed to agents (``runtime.world.world`` does not call them).

Rules every backend keeps (and ``verify`` checks):

- the first writer of an id owns it; only the owner rewrites or deletes it;
- ``readable="owner"`` artifacts do not exist for anyone else: reading them is ``not_found``, and
  ``list`` leaves them out; every other access policy (``public``, ``allow:``, ``price:``, ``contract:``)
  is visible to all here, and enforced above the store (``runtime.world.access``);
- an agent's disk usage is the sum of the content sizes it owns at HEAD; a write that would take it
  above its quota (the ``disk_quota`` the caller read from the ledger) is refused and writes nothing;
- a refused operation writes nothing: HEAD, the index and usage are unchanged.

Backends: ``runtime.world.store.git.GitStore`` (a bare Git repository written with dulwich; the embedded
default) and ``runtime.world.store.postgres.PostgresStore`` (PostgreSQL, when several nodes share the store).
Both validate requests with ``write_op``/``delete_op`` and apply the rules with ``check_write``/
``check_delete`` below, so that they refuse the same things with the same words.
"""

from __future__ import annotations

import abc
import builtins
import re
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Required, TypedDict, Unpack

from msgspec import Meta, Struct

from runtime.errors import AecoError, ErrorCode
from runtime.groupcommit import GroupCommitter

#: Artifact ids: an ASCII letter or digit, then up to 127 letters, digits, ``_`` or ``-``. No dots and
#: no slashes, so an id is always one safe path component (and ``<id>.meta.json`` never collides).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
MAX_ID_LENGTH = 128
#: Agent (and operator) names, as in ``runtime.config.AgentId`` and the ledger's account ids.
AGENT_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"

ArtifactId = Annotated[str, Meta(pattern=ID_PATTERN)]
AgentName = Annotated[str, Meta(pattern=AGENT_PATTERN)]
Kind = Literal["data", "code"]
#: An artifact's access policy (``runtime.world.access`` says what each means): ``public``, ``owner``,
#: ``allow:<agent>+<agent>…`` (up to 16), ``price:<scrip>``, or ``contract:<artifact id>``.
READABLE_PATTERN = (
    r"^(public|owner|allow:[a-z][a-z0-9_-]{0,31}(\+[a-z][a-z0-9_-]{0,31}){0,15}|price:[0-9]{1,15}"
    r"|contract:[A-Za-z0-9][A-Za-z0-9_-]{0,127})$"
)
Readable = Annotated[str, Meta(pattern=READABLE_PATTERN)]
KINDS: tuple[Kind, ...] = ("data", "code")
#: Scrip per invocation; bounded like the ledger's amounts so that it always fits an int64.
Price = Annotated[int, Meta(ge=0, le=1 << 62)]
Size = Annotated[int, Meta(ge=0)]

_AGENT_RE = re.compile(AGENT_PATTERN)
_READABLE_RE = re.compile(READABLE_PATTERN)
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ID_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


class StoreError(AecoError, ValueError):
    """An operation the store refused; nothing of it was written. ``code`` says why (``invalid_id``,
    ``not_found``, ``forbidden``, ``quota_exceeded``, ``invalid``, ``closed``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)


class WriteOptions(TypedDict, total=False):
    """The keywords of a write: what the artifact is, its price and who may read it (defaults: ``data``,
    0, ``public``), and the writer's disk quota in bytes (required)."""

    kind: Kind
    price: int
    readable: Readable
    quota: Required[int]


class ArtifactInfo(Struct, frozen=True, forbid_unknown_fields=True):
    """An artifact's metadata at HEAD (what ``list`` returns)."""

    id: ArtifactId
    kind: Kind
    creator: AgentName
    owner: AgentName
    #: Scrip the owner is paid per successful invocation.
    price: Price
    readable: Readable
    #: Unix times: ``created`` is kept across rewrites, ``updated`` is the last write.
    created: float
    updated: float
    #: Content bytes (what the owner's disk quota is charged).
    size: Size


class Artifact(ArtifactInfo, frozen=True, forbid_unknown_fields=True):
    """An artifact with its content."""

    content: bytes

    def info(self) -> ArtifactInfo:
        """The metadata alone."""
        return ArtifactInfo(**{f: getattr(self, f) for f in ArtifactInfo.__struct_fields__})


class WriteReceipt(Struct, frozen=True):
    """A durable write: the commit that holds it, whether it created the id, and the owner's usage after it."""

    id: str
    #: Hex SHA-1 of the commit.
    commit: str
    created: bool
    size: int
    owned_bytes: int


class HistoryEntry(Struct, frozen=True):
    """One commit that changed an artifact (operator only)."""

    commit: str
    #: The author's name: the agent that wrote or deleted, or the operator that reset.
    author: str
    #: Commit time (Unix seconds; Git keeps whole seconds).
    time: float
    action: Literal["write", "delete", "reset"]
    #: Content size after the commit; 0 when the artifact does not exist after it.
    size: int


class CommitInfo(Struct, frozen=True):
    """One commit of the store's history, as the operator sees it."""

    commit: str
    author: str
    time: float
    #: ``create`` is the store's first commit; ``reset`` an operator's rollback.
    action: Literal["create", "write", "delete", "reset"]
    #: The artifact written or deleted (None for create and reset).
    id: str | None
    #: The commit message's first line (``write <id> (<n> bytes)``, ``system reset to <sha>``, ...).
    subject: str


def check_id(raw: object) -> str:
    """Return ``raw`` as a valid artifact id, or raise ``StoreError("invalid_id")`` saying what is wrong."""
    if isinstance(raw, bytes | bytearray):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = bytes(raw)[exc.start : exc.start + 1]
            raise StoreError(
                "invalid_id", f"artifact id is not UTF-8 (byte 0x{bad.hex()} at position {exc.start})"
            ) from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise StoreError("invalid_id", f"artifact id must be a string, not {type(raw).__name__}")
    if not text:
        raise StoreError("invalid_id", "artifact id is empty")
    if len(text) > MAX_ID_LENGTH:
        raise StoreError("invalid_id", f"artifact id is too long ({len(text)} > {MAX_ID_LENGTH} characters)")
    shown = text if len(text) <= 40 else text[:37] + "..."
    if "/" in text or "\\" in text or text in (".", ".."):
        raise StoreError(
            "invalid_id",
            f"artifact id {shown!r} is a path (path traversal): an id is one name, without '/', '\\', '.' or '..'",
        )
    if text[0] not in _ID_FIRST:
        raise StoreError(
            "invalid_id", f"bad character {text[0]!r} at position 0 of {shown!r}: an id starts with a letter or digit"
        )
    for i, ch in enumerate(text):
        if ch not in _ID_CHARS:
            raise StoreError(
                "invalid_id", f"bad character {ch!r} at position {i} of {shown!r} (allowed: A-Z a-z 0-9 _ -)"
            )
    return text


@dataclass(frozen=True, slots=True)
class WriteOp:
    """A validated write request (what ``write_op`` returns)."""

    agent: str
    id: str
    content: bytes
    kind: Kind
    price: int
    readable: Readable
    quota: int


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """A validated delete request (what ``delete_op`` returns)."""

    agent: str
    id: str


def check_agent(agent: object, what: str = "agent") -> str:
    """Return ``agent`` as a valid agent (or operator) name, or raise ``StoreError("invalid")``."""
    if not isinstance(agent, str) or not _AGENT_RE.match(agent):
        raise StoreError("invalid", f"{what} {agent!r} is not a valid name ({AGENT_PATTERN})")
    return agent


def _check_choice(value: object, allowed: tuple[str, ...], what: str) -> Any:
    if value not in allowed or not isinstance(value, str):
        raise StoreError("invalid", f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _check_readable(value: object) -> str:
    if not isinstance(value, str) or not _READABLE_RE.match(value):
        raise StoreError(
            "invalid",
            f"readable must be public, owner, allow:<agent>+<agent>, price:<scrip> or contract:<artifact id>, "
            f"not {value!r}",
        )
    return value


def visible_to(readable: str, owner: str, agent: str) -> bool:
    """Whether the store shows an artifact to ``agent``: an owner-only artifact exists for its owner alone."""
    return readable != "owner" or owner == agent


def _check_int(value: object, what: str, limit: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (limit is not None and value > limit):
        bound = f" and at most {limit}" if limit is not None else ""
        raise StoreError("invalid", f"{what} must be an integer >= 0{bound}, not {value!r}")
    return value


def write_op(
    agent: object, id: object, content: object, kind: object, price: object, readable: object, quota: object
) -> WriteOp:
    """Validate a write request field by field; raise ``StoreError`` naming the first bad field."""
    who, aid = check_agent(agent), check_id(id)
    if not isinstance(content, bytes | bytearray | memoryview):
        raise StoreError("invalid", f"content must be bytes, not {type(content).__name__}")
    return WriteOp(
        who,
        aid,
        bytes(content),
        _check_choice(kind, KINDS, "kind"),
        _check_int(price, "price", 1 << 62),
        _check_readable(readable),
        _check_int(quota, "quota", None),
    )


def delete_op(agent: object, id: object) -> DeleteOp:
    """Validate a delete request; raise ``StoreError`` naming the bad field."""
    return DeleteOp(check_agent(agent), check_id(id))


def check_write(op: WriteOp, old_owner: str | None, old_size: int, before: int) -> int:
    """Apply the write rules given the id's current owner and size (``None``, 0 when it does not exist)
    and the bytes ``op.agent`` owns now; return what it owns after the write, or raise ``StoreError``."""
    if old_owner is not None and old_owner != op.agent:
        raise StoreError("forbidden", f"artifact id `{op.id}` is taken by another agent")
    size = len(op.content)
    after = before - old_size + size
    # A write that does not grow the agent's usage is always allowed, so that an agent whose quota
    # was lowered below what it owns can still shrink.
    if after > before and after > op.quota:
        raise StoreError(
            "quota_exceeded",
            f"`{op.agent}` owns {before} bytes; writing {size} bytes to `{op.id}` would make it {after}, "
            f"over its disk quota of {op.quota}",
        )
    return after


def check_delete(op: DeleteOp, old_owner: str | None, old_readable: Readable | None) -> None:
    """Apply the delete rules given the id's current owner and readability (``None`` when it does not
    exist): an owner-only artifact of someone else does not exist for ``op.agent``."""
    if old_owner is None or (old_owner != op.agent and old_readable == "owner"):
        raise StoreError("not_found", f"no artifact `{op.id}`")
    if old_owner != op.agent:
        raise StoreError("forbidden", f"`{op.id}` belongs to another agent: only its owner may delete it")


def failed(exc: BaseException) -> Future[Any]:
    """A future that has already failed with ``exc`` (for a request refused before it was queued)."""
    fut: Future[Any] = Future()
    fut.set_running_or_notify_cancel()
    fut.set_exception(exc)
    return fut


#: Agents' writes are refused (``disk_full``, charged nothing) when they would leave less free than this on
#: the store's volume: the ledger, the event log and the charges of running tasks must still fit.
DISK_FLOOR = 32 << 20


class Store(GroupCommitter[tuple[Any, "Future[Any]"]]):
    """An artifact store: what the runtime needs of one. Every mutation is durable when it returns.

    The agent-facing writes are implemented here, once: validated requests go, each with a future, to
    the shared group-commit writer (``runtime.groupcommit``), whose ``_commit`` — the backend's — applies
    a batch of ``(operation, future)`` pairs in one durable transaction and resolves every future. A
    backend calls ``_init_writer`` and ``_start_writer`` once it is ready to write, ``_stop_writer`` from
    its ``close``, and implements the reads: the agent-facing ones see HEAD only; history is the
    operator's (an agent-facing PostgreSQL role is refused it).
    """

    def _submit(self, op: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        # Running from the start: a queued operation cannot be withdrawn (cancelling only stops the
        # waiting), and the writer may always resolve it.
        fut.set_running_or_notify_cancel()
        if not self._enqueue((op, fut)):
            fut.set_exception(StoreError("closed", "the store is closed"))
        return fut

    def submit_write(
        self, agent: str, id: str, content: bytes, **options: Unpack[WriteOptions]
    ) -> Future[WriteReceipt]:
        """Queue a write; the future resolves once it is durable (or with the ``StoreError``)."""
        try:
            kind, price, readable = (
                options.get("kind", "data"),
                options.get("price", 0),
                options.get("readable", "public"),
            )
            op = write_op(agent, id, content, kind, price, readable, options["quota"])
            free = self.free_bytes()
            if free is not None and free - len(content) < DISK_FLOOR:
                raise StoreError(
                    "disk_full",
                    f"the artifact store's volume has {free >> 20} MiB free, under the floor of "
                    f"{DISK_FLOOR >> 20} MiB kept for the ledger and the logs: writes wait for space",
                )
        except StoreError as exc:
            return failed(exc)
        return self._submit(op)

    def free_bytes(self) -> int | None:
        """Free bytes on the volume this store writes to, or None where that is not this node's disk (a
        database server's)."""
        return None

    def history_usage(self) -> dict[str, int]:
        """Per agent, the content bytes its commits wrote into the retained history (operator-only; what
        retention squashes away). Empty where the backend does not count them."""
        return {}

    def write(self, agent: str, id: str, content: bytes, **options: Unpack[WriteOptions]) -> WriteReceipt:
        """Create or rewrite ``id`` as ``agent`` within ``quota`` bytes; return once it is durable."""
        return self.submit_write(agent, id, content, **options).result()

    def submit_delete(self, agent: str, id: str) -> Future[str]:
        """Queue a delete; the future resolves with the commit once it is durable."""
        try:
            op = delete_op(agent, id)
        except StoreError as exc:
            return failed(exc)
        return self._submit(op)

    def delete(self, agent: str, id: str) -> str:
        """Delete ``id`` (its owner only); return the commit once it is durable."""
        return self.submit_delete(agent, id).result()

    # ------------------------------------------------------------------------- agent-facing reads

    @abc.abstractmethod
    def read(self, agent: str, id: str) -> Artifact:
        """The artifact at HEAD if ``agent`` may read it, else ``not_found``."""
        ...

    @abc.abstractmethod
    def list(self, agent: str) -> builtins.list[ArtifactInfo]:
        """Every artifact at HEAD that ``agent`` can see, by id."""
        ...

    # The reads for the event loop. Here they are the synchronous ones, right for a store whose HEAD reads
    # are local lookups (the Git store's index); a store across a network overrides them.

    async def read_async(self, agent: str, id: str) -> Artifact:
        """``read``, for code on the event loop."""
        return self.read(agent, id)

    async def list_async(self, agent: str, limit: int | None = None) -> builtins.list[ArtifactInfo]:
        """The first ``limit`` (all if None) artifacts of ``list``, for code on the event loop."""
        found = self.list(agent)
        return found if limit is None else found[:limit]

    @abc.abstractmethod
    def owned_bytes(self, agent: str) -> int:
        """Content bytes ``agent`` owns at HEAD."""
        ...

    @abc.abstractmethod
    def usage(self) -> dict[str, int]:
        """Content bytes owned at HEAD, per agent that owns any."""
        ...

    # ------------------------------------------------------------------------ operator only

    @abc.abstractmethod
    def history(self, id: str) -> builtins.list[HistoryEntry]:
        """Every commit that changed ``id``, newest first."""
        ...

    @abc.abstractmethod
    def show(self, id: str, commit: str) -> Artifact:
        """``id`` as it was at ``commit``."""
        ...

    @abc.abstractmethod
    def rollback(self, to_commit: str, operator: str = "system") -> str:
        """Make HEAD's tree equal ``to_commit``'s in a new commit authored by ``operator``; return it."""
        ...

    @abc.abstractmethod
    def head(self) -> str:
        """The current HEAD commit."""
        ...

    @abc.abstractmethod
    def last_commit(self) -> CommitInfo:
        """What the HEAD commit did (for example, a reset made while the runtime was stopped)."""
        ...

    @abc.abstractmethod
    def walk_head(self) -> dict[str, tuple[ArtifactInfo, str]]:
        """Every artifact in HEAD's tree (read from the repository, not the index), with its content blob."""
        ...

    @abc.abstractmethod
    def indexed(self) -> dict[str, tuple[ArtifactInfo, str]]:
        """Every artifact in the HEAD index, with its content blob."""
        ...

    @abc.abstractmethod
    def close(self) -> None:
        """Finish what is queued and release the store."""
        ...


def verify(store: Store) -> list[str]:
    """Check the store against its own repository; return the problems found (empty when consistent).

    - every agent's usage equals the sum of content sizes it owns in HEAD's tree (walked, not indexed);
    - the index holds exactly the artifacts of HEAD's tree, with the same metadata and content blob.

    Run it on an idle store: a write landing between its reads would show as a mismatch.
    """
    problems: list[str] = []
    try:
        tree = store.walk_head()
    except StoreError as exc:  # a tree that is not a store's (a blob without its metadata, ...)
        return [f"HEAD's tree: {exc.message}"]
    index = store.indexed()
    expected: dict[str, int] = {}
    for info, _ in tree.values():
        expected[info.owner] = expected.get(info.owner, 0) + info.size
    usage = store.usage()
    for agent in sorted(set(expected) | set(usage)):
        if usage.get(agent, 0) != expected.get(agent, 0):
            problems.append(
                f"usage of `{agent}`: index says {usage.get(agent, 0)} bytes, HEAD's tree {expected.get(agent, 0)}"
            )
    for aid in sorted(set(tree) - set(index)):
        problems.append(f"`{aid}` is in HEAD's tree but not in the index")
    for aid in sorted(set(index) - set(tree)):
        problems.append(f"`{aid}` is in the index but not in HEAD's tree")
    for aid in sorted(set(tree) & set(index)):
        if tree[aid] != index[aid]:
            problems.append(f"`{aid}`: index has {index[aid]}, HEAD's tree has {tree[aid]}")
    return problems
