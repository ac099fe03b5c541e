"""The ledger's invariants, checked against any backend through the ``Ledger`` interface."""

from __future__ import annotations

from collections import Counter

from msgspec import Struct

from runtime.economy.ledger import ASSETS, Ledger, LedgerError, RecordUsage
from runtime.economy.ledger.checkpoint import Checkpoint
from runtime.economy.ledger.rules import MemoryView, apply


class CheckReport(Struct):
    """What ``check`` looked at and every violation it found (empty: all invariants hold)."""

    accounts: int
    journal_entries: int
    usage_records: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when every invariant holds."""
        return not self.problems


def check(ledger: Ledger, start: Checkpoint | None = None) -> CheckReport:
    """Check every invariant of the ledger; the journal is replayed from ``start``, the checkpoint its
    folded entries left (``LmdbLedger.checkpoint()``), when there is one.

    Reads happen in several snapshots; run it on a quiet ledger (or accept that a concurrent
    write may show up as a difference between the journal replay and the balances).
    """
    problems: list[str] = []
    balances = ledger.balances()
    supply = ledger.supply()
    for account, held in sorted(balances.items()):
        for asset, value in sorted(held.items()):
            if value < 0:
                problems.append(f"negative balance: {account} holds {value} {asset}")
    for asset in ASSETS:
        total = sum(held.get(asset, 0) for held in balances.values())
        minted, burned = supply.get(asset, (0, 0))
        if total != minted - burned:
            problems.append(
                f"{asset}: balances sum to {total}, but minted {minted} - burned {burned} = {minted - burned}"
            )

    replay = start.view() if start is not None else MemoryView()
    entries = 0
    usage_ops: Counter[str] = Counter()
    last_seq = start.through if start is not None else 0
    for entry in ledger.journal():
        entries += 1
        if entry.seq != last_seq + 1:
            problems.append(f"journal gap: entry {entry.seq} follows {last_seq}")
        last_seq = entry.seq
        if isinstance(entry.op, RecordUsage):
            usage_ops[entry.op.task_id] += 1
        try:
            apply(replay, entry.op)
        except LedgerError as exc:
            problems.append(f"journal entry {entry.seq} ({entry.op.id}) does not replay: {exc}")
    if replay.nonzero() != balances:
        diff = sorted(
            f"{a}/{s}: replay {replay.balance(a, s)}, stored {balances.get(a, {}).get(s, 0)}"
            for a in set(balances) | {a for a, _ in replay.balances}
            for s in ASSETS
            if replay.balance(a, s) != balances.get(a, {}).get(s, 0)
        )
        problems.append("replaying the journal does not give the balances: " + "; ".join(diff[:10]))
    if set(replay.kinds.items()) != set(ledger.accounts().items()):
        problems.append("replaying the journal does not give the accounts")
    if replay.offers != {o.offer: o for o in ledger.offers()}:
        problems.append("replaying the journal does not give the open offers")
    if replay.tasks != {t.post.task: t for t in ledger.tasks()}:
        problems.append("replaying the journal does not give the tasks and their awards")
    if [v for _, v in sorted(replay.standing_orders.items())] != ledger.standing():
        problems.append("replaying the journal does not give the standing triggers and sponsorships")

    records = Counter(r.task_id for r in ledger.usage_records())
    for task_id, n in records.items():
        if usage_ops[task_id] != 1:
            problems.append(f"task {task_id}: {n} usage record(s) from {usage_ops[task_id]} journal entries")
    for task_id in usage_ops.keys() - records.keys():
        problems.append(f"task {task_id}: journalled usage but no usage record")
    return CheckReport(len(ledger.accounts()), entries, sum(records.values()), problems)
