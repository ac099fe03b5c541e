"""``python -m runtime.admin bill``: the fold over the journal and the ``--since`` forms."""

from __future__ import annotations

import pytest

from runtime.economy.ledger import JournalEntry, RecordUsage, Transfer
from runtime.ops.bill import bill, parse_since, render


def usage(n: int, agent: str, kind: str, ok: bool = True, **fields: int | float) -> RecordUsage:
    return RecordUsage(
        id=f"usage:{n}",
        task_id=str(n),
        agent=agent,
        kind=kind,
        ok=ok,
        cpu_seconds=0.5,
        **fields,  # type: ignore[arg-type]
    )


JOURNAL = [
    JournalEntry(1, 100.0, usage(1, "ann", "think", llm_tokens=200, llm_cost_microusd=400_000, wall_seconds=2.0)),
    JournalEntry(2, 110.0, usage(2, "ann", "burn", memory_bytes=8 << 20, wall_seconds=0.5)),
    JournalEntry(3, 120.0, Transfer(id="t", src="ann", dst="ben", asset="scrip", amount=5, memo="gift")),
    JournalEntry(4, 130.0, usage(4, "ben", "think", llm_tokens=999, llm_cost_microusd=1)),
    JournalEntry(5, 140.0, usage(5, "ann", "think", ok=False, llm_tokens=100, llm_cost_microusd=200_000)),
]


def test_the_bill_adds_up_one_agents_usage_by_kind() -> None:
    b = bill("ann", JOURNAL)
    assert list(b.by_kind) == ["burn", "think"]
    think, burn = b.by_kind["think"], b.by_kind["burn"]
    assert (think.tasks, think.failed, think.llm_tokens) == (2, 1, 300)
    assert think.llm_cost_usd == pytest.approx(0.6)
    assert burn.memory_peak_bytes == 8 << 20 and burn.memory_byte_seconds == pytest.approx(4 << 20)
    assert b.total.tasks == 3 and b.total.cpu_seconds == pytest.approx(1.5)
    assert b.total.llm_cost_usd == pytest.approx(0.6)  # ben's dollar is not ann's
    text = render(b)
    assert "think" in text and "0.600000" in text.splitlines()[-1]


def test_since_keeps_what_was_applied_from_then_on() -> None:
    b = bill("ann", JOURNAL, since=110.0)
    assert b.total.tasks == 2 and b.total.llm_tokens == 100
    assert bill("ann", JOURNAL, since=1000.0).total.tasks == 0


def test_since_forms() -> None:
    assert parse_since("90s", 1000.0) == 910.0
    assert parse_since("15m", 1000.0) == 100.0
    assert parse_since("2h", 10_000.0) == 2800.0
    assert parse_since("1d", 100_000.0) == 13_600.0
    assert parse_since("1970-01-02", 0) == 86_400.0
    assert parse_since("1970-01-01T01:00Z", 0) == 3600.0
    assert parse_since("1970-01-01T00:00:30", 0) == 30.0
    with pytest.raises(ValueError, match="expected a duration such as 90s"):
        parse_since("yesterday", 0)
