"""Ecosystem figures from a real ledger's journal (``runtime.ops.ecology``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.economy.ledger import (
    AcceptOffer,
    AwardTask,
    OpenAccount,
    PostOffer,
    PostTask,
    RecordUsage,
    Transfer,
)
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.ops.ecology import EcologyMeter, gini


def test_gini_is_zero_for_equal_holdings_and_near_one_for_a_monopoly() -> None:
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 100]) == pytest.approx(0.75)  # (n - 1) / n for one holder of n
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)


def test_figures_follow_the_journal_incrementally(tmp_path: Path) -> None:
    clock = [0.0]
    with LmdbLedger(tmp_path / "ledger", durable=False) as led:
        led.apply(OpenAccount(id="o1", account="alice", grants={"scrip": 100, "cpu_rate": 50}))
        led.apply(OpenAccount(id="o2", account="bob", grants={"scrip": 100}))
        first = next(iter(led.journal())).at
        meter = EcologyMeter(led, clock=lambda: clock[0])
        clock[0] = first + 1800  # half an hour after the first entry
        f = meter.figures()
        assert (f.gini, f.scrip_supply, f.scrip_volume, f.velocity_per_hour) == (0.0, 200, 0, 0.0)
        led.apply(Transfer(id="t1", src="alice", dst="bob", asset="scrip", amount=40))
        led.apply(Transfer(id="t2", src="alice", dst="bob", asset="cpu_rate", amount=10))
        led.apply(PostOffer(id="p1", offer="s1", seller="alice", asset="cpu_rate", amount=5, price=20))
        led.apply(AcceptOffer(id="a1", offer="s1", buyer="bob", asset="cpu_rate", amount=5, price=20))
        led.apply(RecordUsage(id="u1", task_id="k1", agent="bob", kind="invoke", ok=True, cpu_seconds=0.1))
        led.apply(PostTask(id="pt", task="t", reward=50))
        led.apply(AwardTask(id="aw", task="t", agent="alice", artifact="x", blob="0" * 40))
        f = meter.figures()
        assert f.transfers == {"alice": 2, "bob": 1} and f.invocations == {"bob": 1}
        assert (f.offers_accepted, f.tasks_solved, f.scrip_supply, f.scrip_volume) == (1, 1, 250, 60)
        assert f.velocity_per_hour == pytest.approx(60 / 250 / 0.5, rel=0.01)
        # alice 130, bob 120 scrip.
        assert f.gini == pytest.approx(abs(130 - 120) / (2 * 2 * 125))
        assert "tasks solved 1" in f.line()
        assert {m.name for m in meter.metrics()} >= {"aeco_ecology_gini", "aeco_agent_transfers"}
