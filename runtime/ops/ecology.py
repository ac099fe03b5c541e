"""Ecosystem figures, from the ledger: how scrip is spread and how fast it moves, and what each agent did.

- ``gini``: the Gini coefficient of the agents' scrip (0: all hold the same; near 1: one holds it all);
- ``velocity_per_hour``: scrip that changed hands (transfers, prices, accepted offers) ÷ the scrip supply,
  per hour of the ledger's life — how many times over the money supply turns in an hour;
- per agent: transfers it made (any asset; an accepted offer counts for the buyer) and code invocations
  it was charged for (its own, its triggers', its contract checks and task tests);
- ``offers_accepted``, ``tasks_solved``.

``EcologyMeter.update`` reads only the journal entries since its last call, so a status refresh costs
what happened since the previous one (plus one read of the balances). One meter may be read from the
status loop and the metrics thread at once: it holds a lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from runtime.economy.ledger import AcceptOffer, AwardTask, Ledger, RecordUsage, Transfer


class EcologyFigures(msgspec.Struct, frozen=True):
    """The figures at one moment (see the module docstring)."""

    gini: float
    velocity_per_hour: float
    scrip_supply: int
    scrip_volume: int
    offers_accepted: int
    tasks_solved: int
    transfers: dict[str, int]
    invocations: dict[str, int]

    def line(self) -> str:
        """One line for the live view."""
        return (
            f"ecology: gini {self.gini:.2f}, velocity {self.velocity_per_hour:.2f}/h, supply {self.scrip_supply},"
            f" transfers {sum(self.transfers.values())}, invocations {sum(self.invocations.values())},"
            f" offers {self.offers_accepted}, tasks solved {self.tasks_solved}"
        )


def gini(values: Sequence[int]) -> float:
    """The Gini coefficient of non-negative ``values`` (0 for none, or all zero)."""
    xs = sorted(values)
    n, total = len(xs), sum(xs)
    if n == 0 or total == 0:
        return 0.0
    # Mean absolute difference over twice the mean, with the sorted-rank formula (O(n log n)).
    weighted = sum((2 * i - n + 1) * x for i, x in enumerate(xs))
    return weighted / (n * total)


class EcologyMeter:
    """Follows one ledger's journal; ``figures()`` brings it up to date and reports."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = 0
        self._first_at: float | None = None
        self._volume = 0
        self._offers = 0
        self._solved = 0
        self._transfers: Counter[str] = Counter()
        self._invocations: Counter[str] = Counter()

    def _update(self) -> None:
        for entry in self.ledger.journal(self._seq):
            self._seq = entry.seq
            if self._first_at is None:
                self._first_at = entry.at
            op = entry.op
            if isinstance(op, Transfer):
                self._transfers[op.src] += 1
                self._volume += op.amount if op.asset == "scrip" else 0
            elif isinstance(op, AcceptOffer):
                self._transfers[op.buyer] += 1
                self._offers += 1
                self._volume += op.price
            elif isinstance(op, RecordUsage) and op.kind == "invoke":
                self._invocations[op.agent] += 1
            elif isinstance(op, AwardTask):
                self._solved += 1

    def figures(self) -> EcologyFigures:
        """The figures now."""
        with self._lock:
            self._update()
            kinds = self.ledger.accounts()
            held = self.ledger.balances()
            scrip = [held.get(a, {}).get("scrip", 0) for a, kind in kinds.items() if kind == "agent"]
            minted, burned = self.ledger.supply().get("scrip", (0, 0))
            supply = minted - burned
            hours = (self._clock() - self._first_at) / 3600 if self._first_at is not None else 0.0
            velocity = self._volume / supply / hours if supply and hours > 0 else 0.0
            return EcologyFigures(
                gini=gini(scrip),
                velocity_per_hour=velocity,
                scrip_supply=supply,
                scrip_volume=self._volume,
                offers_accepted=self._offers,
                tasks_solved=self._solved,
                transfers=dict(self._transfers),
                invocations=dict(self._invocations),
            )

    def metrics(self) -> Iterator[Metric]:
        """The figures as Prometheus metrics (for a collector to yield)."""
        f = self.figures()
        yield GaugeMetricFamily("aeco_ecology_gini", "Gini coefficient of the agents' scrip", f.gini)
        yield GaugeMetricFamily(
            "aeco_ecology_velocity_per_hour", "Scrip that changed hands / supply, per hour", f.velocity_per_hour
        )
        yield GaugeMetricFamily("aeco_ecology_scrip_supply", "Scrip minted less burned", f.scrip_supply)
        yield CounterMetricFamily("aeco_ecology_offers_accepted", "Offers accepted", f.offers_accepted)
        yield CounterMetricFamily("aeco_ecology_tasks_solved", "Task rewards minted", f.tasks_solved)
        transfers = CounterMetricFamily("aeco_agent_transfers", "Transfers an agent made", labels=["agent"])
        for agent, n in sorted(f.transfers.items()):
            transfers.add_metric([agent], n)
        invocations = CounterMetricFamily("aeco_agent_invocations", "Code runs charged to an agent", labels=["agent"])
        for agent, n in sorted(f.invocations.items()):
            invocations.add_metric([agent], n)
        yield from (transfers, invocations)
