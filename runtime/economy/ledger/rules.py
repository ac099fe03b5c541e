"""The rule book: what each ledger operation does, written once for every backend.

``apply(view, op)`` checks everything first and only then writes, so a refused operation leaves the
view untouched. A backend supplies the ``View`` (an LMDB write transaction, an SQL transaction, or the
in-memory ``MemoryView`` used to replay the journal).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from runtime.economy.buckets import BucketState
from runtime.economy.ledger import (
    SYSTEM_ACCOUNTS,
    AcceptOffer,
    AccountKind,
    Asset,
    AwardTask,
    Burn,
    CancelOffer,
    EndTrigger,
    LedgerError,
    Mint,
    Op,
    OpenAccount,
    PostOffer,
    PostTask,
    RecordUsage,
    SetBuckets,
    SetQuota,
    Sponsor,
    SponsorUsed,
    Standing,
    Subscribe,
    TaskState,
    Transfer,
    standing_key,
)


class View(Protocol):
    """The reads and writes an operation needs, inside one transaction."""

    def account_kind(self, account: str) -> AccountKind | None: ...
    def add_account(self, account: str, kind: AccountKind) -> None: ...
    def balance(self, account: str, asset: Asset) -> int: ...
    def set_balance(self, account: str, asset: Asset, value: int) -> None: ...
    def supply(self, asset: Asset) -> tuple[int, int]: ...
    def set_supply(self, asset: Asset, minted: int, burned: int) -> None: ...
    def has_usage(self, task_id: str) -> bool: ...
    def put_usage(self, record: RecordUsage) -> None: ...
    def put_buckets(self, agent: str, buckets: dict[str, BucketState]) -> None: ...
    def offer(self, offer_id: str) -> PostOffer | None: ...
    def put_offer(self, offer: PostOffer) -> None: ...
    def drop_offer(self, offer_id: str) -> None: ...
    def task(self, task_id: str) -> TaskState | None: ...
    def put_task(self, state: TaskState) -> None: ...
    def standing(self, key: str) -> Standing | None: ...
    def put_standing(self, key: str, record: Standing | None) -> None: ...


_op_encoder = msgspec.msgpack.Encoder()
_op_decoder = msgspec.msgpack.Decoder(Op)


def validate(op: Op) -> Op:
    """Check an operation against its declared constraints, however it was built.

    msgspec checks constraints (positive amounts, id patterns, known assets) when decoding, not when
    a Struct is constructed in Python; a round trip through the wire format applies them to both.
    """
    try:
        checked: Op = _op_decoder.decode(_op_encoder.encode(op))
    except msgspec.ValidationError as exc:
        raise LedgerError("invalid", f"{type(op).__name__} {getattr(op, 'id', '?')!r}: {exc}") from None
    return checked


#: The largest amount of any asset that may ever be issued: every balance is below it, so no sum or
#: stored value overflows a signed 64-bit integer.
MAX_SUPPLY = (1 << 63) - 1


def _issue(view: View, asset: Asset, amount: int) -> tuple[int, int]:
    minted, burned = view.supply(asset)
    if minted + amount > MAX_SUPPLY:
        raise LedgerError("invalid", f"issuing {amount} {asset} would exceed the largest supply ({MAX_SUPPLY})")
    return minted + amount, burned


def _known(view: View, account: str) -> None:
    if view.account_kind(account) is None:
        raise LedgerError("unknown_account", f"no account `{account}`")


def _agent(view: View, account: str) -> None:
    kind = view.account_kind(account)
    if kind is None:
        raise LedgerError("unknown_account", f"no account `{account}`")
    if kind != "agent":
        raise LedgerError("invalid", f"`{account}` is a {kind} account, not an agent")


def _holds(view: View, account: str, asset: Asset, amount: int, what: str) -> int:
    have = view.balance(account, asset)
    if have < amount:
        raise LedgerError("overdraft", f"`{account}` has {have} {asset}, cannot {what} {amount}")
    return have


def _move(view: View, src: str, dst: str, asset: Asset, amount: int, have: int) -> None:
    """Move ``amount`` (already checked against ``have``, ``src``'s balance) from ``src`` to ``dst``."""
    dst_before = view.balance(dst, asset)
    view.set_balance(src, asset, have - amount)
    view.set_balance(dst, asset, dst_before + amount)


def _open_offer(view: View, offer_id: str) -> PostOffer:
    offer = view.offer(offer_id)
    if offer is None:
        raise LedgerError("not_found", f"no open offer `{offer_id}`")
    return offer


def _accept(view: View, op: AcceptOffer) -> None:
    offer = _open_offer(view, op.offer)
    terms = (op.asset, op.amount, op.price)
    if terms != (offer.asset, offer.amount, offer.price):
        raise LedgerError(
            "conflict",
            f"offer `{op.offer}` is {offer.amount} {offer.asset} for {offer.price} scrip, "
            f"not {op.amount} {op.asset} for {op.price}",
        )
    _agent(view, op.buyer)
    if op.buyer == offer.seller:
        raise LedgerError("invalid", f"`{op.buyer}` cannot accept its own offer `{op.offer}`")
    # Both sides are checked before either moves: the acceptance is whole or nothing.
    sold = _holds(view, offer.seller, offer.asset, offer.amount, "sell")
    paid = _holds(view, op.buyer, "scrip", offer.price, "pay")
    _move(view, offer.seller, op.buyer, offer.asset, offer.amount, sold)
    if offer.price:
        _move(view, op.buyer, offer.seller, "scrip", offer.price, paid)
    view.drop_offer(op.offer)


def _award(view: View, op: AwardTask) -> None:
    state = view.task(op.task)
    if state is None:
        raise LedgerError("not_found", f"no task `{op.task}`")
    _agent(view, op.agent)
    if op.agent in state.awarded:
        raise LedgerError("conflict", f"`{op.agent}` was paid for task `{op.task}` already")
    if len(state.awarded) >= state.post.max_awards:
        raise LedgerError("conflict", f"task `{op.task}` has paid all its {state.post.max_awards} reward(s)")
    reward = state.post.reward
    minted, burned = _issue(view, "scrip", reward)
    if op.supply_cap is not None and minted - burned > op.supply_cap:
        raise LedgerError(
            "capacity",
            f"minting {reward} scrip for task `{op.task}` would take the supply to {minted - burned}, "
            f"over its cap of {op.supply_cap}",
        )
    view.set_balance(op.agent, "scrip", view.balance(op.agent, "scrip") + reward)
    view.set_supply("scrip", minted, burned)
    view.put_task(TaskState(state.post, [*state.awarded, op.agent]))


def _standing(view: View, op: Subscribe | EndTrigger | Sponsor | SponsorUsed) -> None:
    if isinstance(op, Subscribe):
        _agent(view, op.subscriber)
        key = standing_key("trigger", op.trigger)
        if view.standing(key) is not None:
            raise LedgerError("conflict", f"trigger `{op.trigger}` stands already")
        view.put_standing(key, op)
    elif isinstance(op, EndTrigger):
        key = standing_key("trigger", op.trigger)
        found = view.standing(key)
        if not isinstance(found, Subscribe):
            raise LedgerError("not_found", f"no standing trigger `{op.trigger}`")
        if found.subscriber != op.subscriber:
            raise LedgerError("forbidden", f"trigger `{op.trigger}` is not `{op.subscriber}`'s to end")
        view.put_standing(key, None)
    elif isinstance(op, Sponsor):
        _agent(view, op.owner)
        view.put_standing(standing_key("sponsor", op.owner, op.artifact), op if op.cpu_seconds else None)
    else:
        key = standing_key("sponsor", op.owner, op.artifact)
        found = view.standing(key)
        if isinstance(found, Sponsor):
            left = max(found.cpu_seconds - op.cpu_seconds, 0.0)
            view.put_standing(key, msgspec.structs.replace(found, cpu_seconds=left) if left else None)


def open_already(offer_id: str) -> LedgerError:
    """The refusal of a post under the id of an open offer (``World.post_offer`` also gives it before
    queueing a post that would meet it)."""
    return LedgerError("conflict", f"offer `{offer_id}` is open already")


def apply(view: View, op: Op) -> None:
    """Apply ``op`` to ``view``, or raise ``LedgerError`` having written nothing."""
    if isinstance(op, Transfer):
        if op.src == op.dst:
            raise LedgerError("invalid", f"transfer from `{op.src}` to itself")
        _known(view, op.src)
        _known(view, op.dst)
        _move(view, op.src, op.dst, op.asset, op.amount, _holds(view, op.src, op.asset, op.amount, "transfer"))
    elif isinstance(op, PostOffer):
        _agent(view, op.seller)
        if op.asset == "scrip":
            raise LedgerError("invalid", f"offer `{op.offer}` sells scrip for scrip; transfer it instead")
        if view.offer(op.offer) is not None:
            raise open_already(op.offer)
        _holds(view, op.seller, op.asset, op.amount, "offer")
        view.put_offer(op)
    elif isinstance(op, AcceptOffer):
        _accept(view, op)
    elif isinstance(op, PostTask):
        state = view.task(op.task)
        view.put_task(TaskState(op, state.awarded if state is not None else []))
    elif isinstance(op, AwardTask):
        _award(view, op)
    elif isinstance(op, Subscribe | EndTrigger | Sponsor | SponsorUsed):
        _standing(view, op)
    elif isinstance(op, CancelOffer):
        if _open_offer(view, op.offer).seller != op.seller:
            raise LedgerError("forbidden", f"offer `{op.offer}` is not `{op.seller}`'s to cancel")
        view.drop_offer(op.offer)
    elif isinstance(op, Mint):
        _known(view, op.account)
        minted, burned = _issue(view, op.asset, op.amount)
        view.set_balance(op.account, op.asset, view.balance(op.account, op.asset) + op.amount)
        view.set_supply(op.asset, minted, burned)
    elif isinstance(op, Burn):
        _known(view, op.account)
        have = view.balance(op.account, op.asset)
        if have < op.amount:
            raise LedgerError("overdraft", f"`{op.account}` has {have} {op.asset}, cannot burn {op.amount}")
        minted, burned = view.supply(op.asset)
        view.set_balance(op.account, op.asset, have - op.amount)
        view.set_supply(op.asset, minted, burned + op.amount)
    elif isinstance(op, SetQuota):
        _agent(view, op.account)
        have = view.balance(op.account, op.asset)
        diff = op.amount - have
        minted, burned = _issue(view, op.asset, max(diff, 0))
        view.set_balance(op.account, op.asset, op.amount)
        view.set_supply(op.asset, minted, burned + max(-diff, 0))
    elif isinstance(op, RecordUsage):
        _agent(view, op.agent)
        if view.has_usage(op.task_id):
            raise LedgerError("duplicate_usage", f"task `{op.task_id}` already has a usage record")
        view.put_usage(op)
        if op.llm_cost_microusd:
            have = view.balance(op.agent, "llm_budget")
            spent = min(have, op.llm_cost_microusd)
            if spent:
                minted, burned = view.supply("llm_budget")
                view.set_balance(op.agent, "llm_budget", have - spent)
                view.set_supply("llm_budget", minted, burned + spent)
        if op.buckets:
            view.put_buckets(op.agent, op.buckets)
    elif isinstance(op, SetBuckets):
        _agent(view, op.agent)
        view.put_buckets(op.agent, op.buckets)
    elif isinstance(op, OpenAccount):
        kind = view.account_kind(op.account)
        if kind is not None:
            raise LedgerError("conflict", f"account `{op.account}` exists already ({kind})")
        if op.kind == "system" and op.account not in SYSTEM_ACCOUNTS:
            raise LedgerError("invalid", f"`{op.account}` is not a system principal {SYSTEM_ACCOUNTS}")
        issued = {asset: _issue(view, asset, amount) for asset, amount in op.grants.items() if amount}
        view.add_account(op.account, op.kind)
        for asset, (minted, burned) in issued.items():
            view.set_balance(op.account, asset, op.grants[asset])
            view.set_supply(asset, minted, burned)
    else:  # pragma: no cover - the union is closed; a new op type must get a rule here
        raise AssertionError(f"no rule for {type(op).__name__}")
    if isinstance(op, Transfer | Burn):
        src = op.src if isinstance(op, Transfer) else op.account
        assert view.balance(src, op.asset) >= 0, "invariant: no negative balance"


class MemoryView:
    """A ledger state in dictionaries: the reference the journal is replayed into."""

    def __init__(self) -> None:
        self.kinds: dict[str, AccountKind] = {}
        self.balances: dict[tuple[str, str], int] = {}
        self.supplies: dict[str, tuple[int, int]] = {}
        self.usage: dict[str, RecordUsage] = {}
        self.bucket_levels: dict[str, dict[str, BucketState]] = {}
        self.offers: dict[str, PostOffer] = {}
        self.tasks: dict[str, TaskState] = {}
        self.standing_orders: dict[str, Standing] = {}

    def account_kind(self, account: str) -> AccountKind | None:
        return self.kinds.get(account)

    def add_account(self, account: str, kind: AccountKind) -> None:
        self.kinds[account] = kind

    def balance(self, account: str, asset: Asset) -> int:
        return self.balances.get((account, asset), 0)

    def set_balance(self, account: str, asset: Asset, value: int) -> None:
        self.balances[(account, asset)] = value

    def supply(self, asset: Asset) -> tuple[int, int]:
        return self.supplies.get(asset, (0, 0))

    def set_supply(self, asset: Asset, minted: int, burned: int) -> None:
        self.supplies[asset] = (minted, burned)

    def has_usage(self, task_id: str) -> bool:
        return task_id in self.usage

    def put_usage(self, record: RecordUsage) -> None:
        self.usage[record.task_id] = record

    def put_buckets(self, agent: str, buckets: dict[str, BucketState]) -> None:
        self.bucket_levels.setdefault(agent, {}).update(buckets)

    def offer(self, offer_id: str) -> PostOffer | None:
        return self.offers.get(offer_id)

    def put_offer(self, offer: PostOffer) -> None:
        self.offers[offer.offer] = offer

    def drop_offer(self, offer_id: str) -> None:
        del self.offers[offer_id]

    def task(self, task_id: str) -> TaskState | None:
        return self.tasks.get(task_id)

    def put_task(self, state: TaskState) -> None:
        self.tasks[state.post.task] = state

    def standing(self, key: str) -> Standing | None:
        return self.standing_orders.get(key)

    def put_standing(self, key: str, record: Standing | None) -> None:
        if record is None:
            self.standing_orders.pop(key, None)
        else:
            self.standing_orders[key] = record

    def nonzero(self) -> dict[str, dict[str, int]]:
        """Balances in the shape ``Ledger.balances()`` returns."""
        out: dict[str, dict[str, int]] = {}
        for (account, asset), value in self.balances.items():
            if value:
                out.setdefault(account, {})[asset] = value
        return out
