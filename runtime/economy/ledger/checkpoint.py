"""A checkpoint of the ledger: the state the journal's first entries replay to, so that they can go.

Retention folds the journal's old entries into one ``Checkpoint`` (``LmdbLedger.compact``): what replaying
entries 1..``through`` gives — accounts, balances, supply, open offers, posted tasks and standing
triggers and sponsorships — stored in the
same transaction that deletes those entries (with their usage records and op ids). ``admin check``
replays the remaining journal from it (``view``), so every invariant is still checked: per asset the
balances sum to minted − burned, and checkpoint + journal replay to the stored balances.

Folding runs while the ledger is written, in chunks, the same way on every backend: ``fold`` replays a
chunk of the oldest entries onto the checkpoint's state outside any write (entries never change once
written), then the backend deletes them and stores the ``next_checkpoint`` in one short transaction,
after checking that no other fold moved the checkpoint meanwhile. The group commits wait for that
transaction at most, never for the replay.

What folding gives up: an op id whose entry was folded is no longer recognised as a replay, so retention
folds only entries older than a horizon no retry reaches (a task's op is retried within seconds; one a
crash interrupted is charged at the next start, and ``admin compact`` refuses to fold while the in-flight
store holds such tasks); and ``admin bill`` covers the remaining journal.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import Struct

from runtime.economy.ledger import (
    AccountKind,
    JournalEntry,
    LedgerError,
    PostOffer,
    RecordUsage,
    Standing,
    TaskState,
    rules,
)
from runtime.economy.ledger.rules import MemoryView
from runtime.host.pace import pace


class Checkpoint(Struct, frozen=True):
    """The ledger as of journal entry ``through`` (applied at ``at``); ``folded``: entries folded in all,
    ``usage_records``: the usage records dropped with them."""

    through: int
    at: float
    kinds: dict[str, AccountKind]
    balances: dict[str, dict[str, int]]
    supply: dict[str, tuple[int, int]]
    offers: list[PostOffer]
    tasks: list[TaskState]
    folded: int
    usage_records: int
    #: By key (``standing_key``); a checkpoint written before triggers stood in the ledger has none.
    standing: dict[str, Standing] = {}

    def view(self) -> MemoryView:
        """A replay's starting state: this checkpoint as a ``MemoryView``."""
        v = MemoryView()
        v.kinds = dict(self.kinds)
        v.balances = {(a, s): n for a, held in self.balances.items() for s, n in held.items()}
        v.supplies = dict(self.supply)
        v.offers = {o.offer: o for o in self.offers}
        v.tasks = {t.post.task: t for t in self.tasks}
        v.standing_orders = dict(self.standing)
        return v

    @classmethod
    def of(cls, view: MemoryView, through: int, at: float, folded: int, usage_records: int) -> Checkpoint:
        """The state of ``view`` (a replay up to entry ``through``) as a checkpoint."""
        return cls(
            through,
            at,
            dict(view.kinds),
            view.nonzero(),
            dict(view.supplies),
            sorted(view.offers.values(), key=lambda o: o.offer),
            sorted(view.tasks.values(), key=lambda t: t.post.task),
            folded,
            usage_records,
            dict(sorted(view.standing_orders.items())),
        )


class LedgerCompaction(Struct, frozen=True):
    """What one ``compact`` folded: entries and usage records, and the checkpoint's seq after it."""

    folded: int
    usage_records: int
    through: int


def fold(
    view: MemoryView, entries: Iterable[JournalEntry], last: int, horizon: float, chunk: int
) -> list[JournalEntry]:
    """Replay onto ``view`` the leading ``entries`` (in seq order) applied before ``horizon``, at most
    ``chunk``, never the journal's ``last`` entry (seqs keep counting from it); those entries. A
    ``LedgerError`` (``invalid``) when one does not replay: the journal is then not folded."""
    taken: list[JournalEntry] = []
    for entry in entries:
        pace()  # a retention pass's replay, beside the event loop (runtime.host.pace)
        if entry.seq >= last or entry.at >= horizon or len(taken) == chunk:
            break
        try:
            rules.apply(view, entry.op)
        except LedgerError as exc:
            why = f"journal entry {entry.seq} does not replay onto the checkpoint: {exc}"
            raise LedgerError("invalid", why) from None
        taken.append(entry)
    return taken


def next_checkpoint(view: MemoryView, before: Checkpoint | None, taken: list[JournalEntry]) -> Checkpoint:
    """The checkpoint after folding ``taken`` (replayed onto ``view``) into ``before``."""
    records = sum(isinstance(e.op, RecordUsage) for e in taken)
    return Checkpoint.of(
        view,
        taken[-1].seq,
        taken[-1].at,
        (before.folded if before else 0) + len(taken),
        (before.usage_records if before else 0) + records,
    )
