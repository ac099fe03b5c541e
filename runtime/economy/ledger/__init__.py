"""The ledger: accounts, integer balances of assets, usage records and bucket levels.

Every change is an operation (``Op``) with an id. Operations are applied by one rule book,
``runtime.economy.ledger.rules.apply``, against a ``View`` of the store, so every backend (``lmdb``,
``postgres``) and the journal replay in ``runtime.economy.ledger.check`` share one definition of what an
operation does. Replaying an operation id changes nothing and returns the first receipt.

Invariants (checked by ``python -m runtime.admin check``):

- no balance is negative;
- for each asset, the sum of balances equals what was minted minus what was burned;
- each task has exactly one usage record, and each usage record was written by exactly one journal entry;
- replaying the journal from empty gives the balances, the open offers, the tasks' awards and the
  standing orders (triggers and sponsorships).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

from msgspec import Meta, Struct

from runtime.economy.buckets import BucketState
from runtime.errors import AecoError, ErrorCode

if TYPE_CHECKING:
    from runtime.economy.ledger.checkpoint import Checkpoint, LedgerCompaction

#: ``llm_budget`` is in micro-dollars: what an agent may still spend on a paid (remote) model.
Asset = Literal["scrip", "cpu_rate", "llm_rate", "disk_quota", "memory_quota", "llm_budget"]
ASSETS: tuple[Asset, ...] = ("scrip", "cpu_rate", "llm_rate", "disk_quota", "memory_quota", "llm_budget")
QUOTA_ASSETS: tuple[Asset, ...] = ("disk_quota", "memory_quota")
AccountKind = Literal["agent", "system"]
#: Principals every ledger has: ``mint`` issues and retires assets, ``treasury`` holds the unallocated.
SYSTEM_ACCOUNTS: tuple[str, ...] = ("mint", "treasury")

OpId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:@/+-]{1,128}$")]
AccountId = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
Amount = Annotated[int, Meta(gt=0, le=1 << 62)]
Reason = Annotated[str, Meta(min_length=1, max_length=200)]
NonNegInt = Annotated[int, Meta(ge=0, le=1 << 62)]
#: Finite and bounded: an infinite or NaN cost would poison sums (and NaN != NaN breaks replays).
NonNegFloat = Annotated[float, Meta(ge=0, le=1e15)]


class _Op(Struct, tag_field="op", forbid_unknown_fields=True, frozen=True, kw_only=True):
    id: OpId


class OpenAccount(_Op, tag="open", frozen=True):
    """Create an account, minting its initial ``grants`` in the same transaction (an agent comes into
    being with its rights or not at all). Opening an existing account is refused."""

    account: AccountId
    kind: AccountKind = "agent"
    grants: dict[Asset, NonNegInt] = {}


class Transfer(_Op, tag="transfer", frozen=True):
    """Move ``amount`` of ``asset`` from ``src`` to ``dst``: both sides or neither."""

    src: AccountId
    dst: AccountId
    asset: Asset
    amount: Amount
    memo: Annotated[str, Meta(max_length=200)] = ""


class Mint(_Op, tag="mint", frozen=True):
    """Issue new units of ``asset`` to ``account`` (privileged; the reason is journalled)."""

    account: AccountId
    asset: Asset
    amount: Amount
    reason: Reason


class Burn(_Op, tag="burn", frozen=True):
    """Destroy units of ``asset`` held by ``account`` (privileged; the reason is journalled)."""

    account: AccountId
    asset: Asset
    amount: Amount
    reason: Reason


class SetQuota(_Op, tag="set_quota", frozen=True):
    """Set an account's ``disk_quota`` or ``memory_quota`` (minting or burning the difference)."""

    account: AccountId
    asset: Literal["disk_quota", "memory_quota"]
    amount: NonNegInt


class RecordUsage(_Op, tag="usage", frozen=True):
    """What one finished task cost, and the agent's bucket levels after charging it: one transaction."""

    task_id: OpId
    agent: AccountId
    kind: Annotated[str, Meta(max_length=32)]
    ok: bool
    cpu_seconds: NonNegFloat
    #: What holding its worker cost on top of ``cpu_seconds`` (``runtime.pool.accounting.occupancy``):
    #: the CPU bucket was charged both; only ``cpu_seconds`` is a kernel measurement.
    occupancy_seconds: NonNegFloat = 0.0
    #: Why a failed task failed (``worker_crashed``, ``supervisor_crashed`` …); empty when it succeeded.
    error: Annotated[str, Meta(max_length=32)] = ""
    memory_bytes: NonNegInt = 0
    llm_tokens: NonNegInt = 0
    #: What a paid model charged for the task (micro-dollars), burnt from the agent's ``llm_budget``;
    #: a cost over what is left burns the rest (the agent cannot think on a paid model after that).
    llm_cost_microusd: NonNegInt = 0
    wall_seconds: NonNegFloat = 0.0
    buckets: dict[str, BucketState] = {}
    #: The supervisor's CPU spent for the agent since its last charge (``runtime.economy.metering``),
    #: charged to its ``cpu`` bucket with the task's; a ``supervisor`` record carries only this.
    supervisor_cpu_seconds: NonNegFloat = 0.0
    #: The ``think_batch`` this task was one sequence of (``runtime.economy.split``): its CPU, occupancy
    #: and memory are this agent's share of the batch's; empty for a task run on its own.
    batch: Annotated[str, Meta(max_length=128)] = ""


OfferId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]


class PostOffer(_Op, tag="post_offer", frozen=True):
    """``seller`` offers ``amount`` of ``asset`` for ``price`` scrip to whoever accepts first.

    Nothing is held in escrow: the offer is a standing promise, checked again when it is accepted (a
    seller who no longer holds the asset makes the acceptance fail whole). So no asset is ever parked
    in a third account, and an offer that is never accepted costs nothing. This op is also the offer's
    stored record, while it is open.
    """

    offer: OfferId
    seller: AccountId
    asset: Asset
    amount: Amount
    price: NonNegInt


class AcceptOffer(_Op, tag="accept_offer", frozen=True):
    """``buyer`` takes the whole of an open offer on the terms it saw: the asset to the buyer and the
    scrip to the seller in one transaction, and the offer closes. Terms that differ from the open
    offer's (it was cancelled and posted again) refuse the acceptance: there are no partial fills."""

    offer: OfferId
    buyer: AccountId
    asset: Asset
    amount: Amount
    price: NonNegInt


class CancelOffer(_Op, tag="cancel_offer", frozen=True):
    """The seller withdraws an open offer."""

    offer: OfferId
    seller: AccountId


TaskId = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
ArtifactRef = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")]


class PostTask(_Op, tag="post_task", frozen=True):
    """The operator posts (or re-states) a task: solving it earns ``reward`` scrip, minted, for at most
    ``max_awards`` different agents. Posting again changes the terms and keeps who was paid.

    ``description`` (what agents are told) and the hidden ``tests`` travel with the post, so a task the
    operator posts while the supervisor runs, or into a stopped data directory, is known after a
    restart; the journal is the operator's, never an agent's. (Posts from before they did have both
    empty; the configuration supplies them.)"""

    task: TaskId
    reward: Amount
    max_awards: Annotated[int, Meta(ge=1, le=1_000_000)] = 1
    description: Annotated[str, Meta(max_length=200)] = ""
    tests: Annotated[str, Meta(max_length=1 << 16)] = ""


class AwardTask(_Op, tag="award_task", frozen=True):
    """Mint a task's reward to ``agent``, whose code artifact ``artifact`` (content blob ``blob``, the Git
    object id of the version tested) passed the task's hidden tests. Refused once the task has paid
    ``max_awards`` agents, when this agent was paid for it already, or when the reward would take the
    scrip supply above ``supply_cap`` (the monetary policy in force when it was submitted)."""

    task: TaskId
    agent: AccountId
    artifact: ArtifactRef
    blob: Annotated[str, Meta(pattern=r"^[0-9a-f]{40}$")]
    supply_cap: Amount | None = None


class TaskState(Struct, frozen=True):
    """A posted task as the ledger keeps it: its terms and who was paid for it, in order."""

    post: PostTask
    awarded: list[str] = []


TriggerId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


class Subscribe(_Op, tag="subscribe", frozen=True):
    """``subscriber`` starts trigger ``trigger``: its code artifact ``artifact`` runs on every event of
    ``kind`` (about ``actor`` and ``about`` when given; ``runtime.world.triggers``). This op is also the
    trigger's stored record while it stands, so a restarted supervisor starts it again."""

    trigger: TriggerId
    subscriber: AccountId
    artifact: ArtifactRef
    kind: Annotated[str, Meta(min_length=1, max_length=64)]
    actor: Annotated[str, Meta(max_length=64)] | None = None
    about: Annotated[str, Meta(max_length=128)] | None = None


class EndTrigger(_Op, tag="end_trigger", frozen=True):
    """A trigger stops for good: its subscriber cancelled it, or it was suspended (``reason`` says why,
    such as a subscriber that could not pay)."""

    trigger: TriggerId
    subscriber: AccountId
    state: Literal["cancelled", "suspended"]
    reason: Annotated[str, Meta(max_length=200)] = ""


class Sponsor(_Op, tag="sponsor", frozen=True):
    """``owner`` pays up to ``cpu_seconds`` of CPU, in all, for others' invocations of its artifact that ask
    to be charged to the owner (replacing what was left; 0 stops). Its stored record holds what is left."""

    owner: AccountId
    artifact: ArtifactRef
    cpu_seconds: NonNegFloat


class SponsorUsed(_Op, tag="sponsor_used", frozen=True):
    """A sponsored invocation used ``cpu_seconds`` of what ``owner`` sponsors for ``artifact`` (none
    left is the end of the sponsorship; a sponsorship that ended meanwhile is left alone)."""

    owner: AccountId
    artifact: ArtifactRef
    cpu_seconds: NonNegFloat


#: What stands between operations: a trigger or a sponsorship, kept under ``standing_key``.
Standing = Subscribe | Sponsor


def standing_key(kind: Literal["trigger", "sponsor"], *parts: str) -> str:
    """The key a standing order is kept under: ``trigger:<id>`` or ``sponsor:<owner>/<artifact>``."""
    return f"{kind}:{'/'.join(parts)}"


class SetBuckets(_Op, tag="buckets", frozen=True):
    """Persist an agent's bucket levels (for example after a trade changed its rates)."""

    agent: AccountId
    buckets: dict[str, BucketState]


Op = (
    OpenAccount
    | Transfer
    | Mint
    | Burn
    | SetQuota
    | RecordUsage
    | SetBuckets
    | PostOffer
    | AcceptOffer
    | CancelOffer
    | PostTask
    | AwardTask
    | Subscribe
    | EndTrigger
    | Sponsor
    | SponsorUsed
)


class Receipt(Struct, frozen=True):
    """Proof that an operation is durable: its place in the journal and when it was applied."""

    op_id: str
    seq: int
    at: float
    #: False when this op id had already been applied (the first receipt is returned).
    fresh: bool = True


class JournalEntry(Struct, frozen=True):
    """One applied operation, as kept in the append-only journal."""

    seq: int
    at: float
    op: Op


class LedgerError(AecoError, ValueError):
    """An operation that was refused; nothing of it was written (``invalid``, ``unknown_account``,
    ``overdraft``, ``conflict``, ``duplicate_usage``, ``not_found``, ``forbidden``, ``closed``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)


class Ledger(Protocol):
    """What every ledger backend offers. Writes go through ``submit`` (group-committed: the future
    resolves only once the operation is durable); reads see the last committed state and never wait
    for the writer."""

    def submit(self, op: Op) -> Future[Receipt]:
        """Queue one operation; the future gets its ``Receipt`` once durable, or a ``LedgerError``."""
        ...

    def submit_async(self, op: Op) -> asyncio.Future[Receipt]:
        """``submit`` from code on an event loop: a future of that loop (cheaper to resolve)."""
        ...

    def apply(self, op: Op) -> Receipt:
        """``submit(op).result()``."""
        ...

    def balance(self, account: str, asset: Asset) -> int:
        """One balance (0 for an asset the account never held); ``LedgerError`` for an unknown account."""
        ...

    def balances(self) -> dict[str, dict[str, int]]:
        """Every account's non-zero balances, from one consistent snapshot."""
        ...

    async def holdings_async(self, account: str, *, fresh: bool = False) -> dict[str, int]:
        """Every non-zero balance of ``account`` (``LedgerError`` for an unknown account), for code on
        the event loop: it never blocks the loop on a server. A shared backend may answer from a
        per-node cache that is exact as of this node's own operations (see its docstring); ``fresh``
        asks the store itself."""
        ...

    async def balance_async(self, account: str, asset: Asset, *, fresh: bool = False) -> int:
        """One balance, as ``holdings_async`` reads it."""
        ...

    async def accounts_async(self) -> dict[str, AccountKind]:
        """Every account and its kind, for code on the event loop."""
        ...

    def accounts(self) -> dict[str, AccountKind]:
        """Every account and its kind."""
        ...

    def supply(self) -> dict[str, tuple[int, int]]:
        """Per asset: (minted, burned) so far."""
        ...

    def usage(self, task_id: str) -> RecordUsage | None:
        """The usage record of a task, if any."""
        ...

    def usage_records(self) -> Iterator[RecordUsage]:
        """Every usage record."""
        ...

    def buckets(self, agent: str) -> dict[str, BucketState]:
        """The persisted bucket levels of an agent."""
        ...

    def journal(self, since: int = 0) -> Iterator[JournalEntry]:
        """Journal entries with ``seq > since``, in order."""
        ...

    def offers(self) -> list[PostOffer]:
        """Every open offer, by offer id."""
        ...

    async def offers_async(self, limit: int | None = None) -> list[PostOffer]:
        """Every open offer (the first ``limit`` by id), for code on the event loop."""
        ...

    async def offer_async(self, offer_id: str) -> PostOffer | None:
        """One open offer (None when there is none of that id), for code on the event loop."""
        ...

    def tasks(self) -> list[TaskState]:
        """Every posted task and who was paid for it, by task id."""
        ...

    def standing(self) -> list[Standing]:
        """Every standing trigger and sponsorship, by key."""
        ...

    def checkpoint(self) -> Checkpoint | None:
        """The state the journal's folded entries replay to (``compact``), or None if none were folded."""
        ...

    def compact(self, horizon: float, chunk: int = 2_000) -> LedgerCompaction:
        """Fold the journal's entries applied before ``horizon`` (a UNIX time) into the checkpoint, a
        ``chunk`` at a time, while the ledger is written (``runtime.economy.ledger.checkpoint``)."""
        ...

    def close(self) -> None:
        """Finish queued operations and close the store."""
        ...
