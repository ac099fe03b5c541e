"""The exact split of a batch's measured CPU among its sequences (``runtime.economy.split``)."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from runtime.economy.charging import split_usage
from runtime.economy.split import CALL_OVERHEAD, split_batch, split_exact, weights
from runtime.pool.accounting import TaskUsage
from runtime.protocol import SeqWork, ThinkBatchReport


def test_shares_sum_to_the_total_exactly_for_any_weights() -> None:
    rng = random.Random(16)
    for _ in range(2000):
        n = rng.randint(1, 20)
        ws = [Fraction(rng.randint(0, 1000), rng.randint(1, 7)) for _ in range(n)]
        total = rng.randint(0, 10**9)
        shares = split_exact(total, ws)
        assert sum(shares) == total
        assert all(s >= 0 for s in shares)
        whole = sum(ws)
        for s, w in zip(shares, ws, strict=True):  # each within one unit of its exact part
            exact = total * w / whole if whole else Fraction(total, n)
            assert abs(s - exact) < 1


def test_the_remainder_goes_to_the_largest_fractions_then_the_earlier() -> None:
    assert split_exact(10, [Fraction(1)] * 3) == [4, 3, 3]
    assert split_exact(10, [Fraction(1), Fraction(2), Fraction(2)]) == [2, 4, 4]
    assert split_exact(7, [Fraction(0), Fraction(0)]) == [4, 3]  # nothing measurable: equal parts
    assert split_exact(0, [Fraction(3), Fraction(1)]) == [0, 0]


def test_bad_amounts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative amount"):
        split_exact(-1, [Fraction(1)])
    with pytest.raises(ValueError, match="among no one"):
        split_exact(5, [])
    with pytest.raises(ValueError, match="must not be negative"):
        split_exact(5, [Fraction(-1), Fraction(2)])


def test_weights_follow_the_documented_rule() -> None:
    # Two sequences: one decodes 3 steps, the other 1. Step 0 holds both, steps 1 and 2 only the first.
    work = [
        SeqWork(own_tokens=10, shared_tokens=100, decode_steps=3),
        SeqWork(own_tokens=20, shared_tokens=100, decode_steps=1),
    ]
    w = weights(work)
    step_of_two = (CALL_OVERHEAD + 2) / 2
    alone = CALL_OVERHEAD + 1
    assert w[0] == 10 + Fraction(100, 2) + step_of_two + 2 * alone
    assert w[1] == 20 + Fraction(100, 2) + step_of_two


def test_forced_tokens_count_as_the_sequences_own_evaluation() -> None:
    # Jump-forward: the grammar's forced text is evaluated for one sequence alone, with its prompt or
    # after a drawn token, so it weighs as its own prompt tokens do; the step shares are unchanged.
    plain = [SeqWork(own_tokens=10, decode_steps=4), SeqWork(own_tokens=10, decode_steps=4)]
    forced = [SeqWork(own_tokens=10, decode_steps=4, forced_tokens=12), SeqWork(own_tokens=10, decode_steps=4)]
    assert weights(forced)[0] == weights(plain)[0] + 12
    assert weights(forced)[1] == weights(plain)[1]
    shares = split_batch(1_000_003, forced)
    assert sum(shares) == 1_000_003 and shares[0] > shares[1]


def test_a_kept_prefix_is_charged_less_than_evaluating_it() -> None:
    fresh = [SeqWork(own_tokens=30, shared_tokens=400, decode_steps=20) for _ in range(4)]
    kept = [SeqWork(own_tokens=30, kept_tokens=400, decode_steps=20) for _ in range(4)]
    # Four agents alone with the same suffix, the same decoding: weights differ only by the prefix.
    assert weights(kept)[0] < weights(fresh)[0]
    assert weights(fresh)[0] - weights(kept)[0] == 100


def test_nobody_pays_for_a_prefix_they_did_not_use() -> None:
    work = [
        SeqWork(own_tokens=5, shared_tokens=300, decode_steps=4),
        SeqWork(own_tokens=5, shared_tokens=300, decode_steps=4),
        SeqWork(own_tokens=5, decode_steps=4),  # started from no shared prefix
    ]
    w = weights(work)
    assert w[0] == w[1] == w[2] + 150


def test_split_batch_sums_and_orders_by_work() -> None:
    work = [SeqWork(own_tokens=n, decode_steps=d) for n, d in ((50, 10), (500, 10), (50, 80))]
    shares = split_batch(1_234_567, work)
    assert sum(shares) == 1_234_567
    assert shares[1] > shares[0] and shares[2] > shares[0]


def test_split_usage_keeps_cpu_occupancy_and_memory_exact() -> None:
    usage = TaskUsage(
        cpu_seconds=2.345679,
        peak_memory_bytes=10_000_001 + 7_777_777,
        baseline_memory_bytes=10_000_001,
        wall_seconds=1.5,
        worker_pid=4242,
        memory_probe="vmhwm",
        occupancy_seconds=0.100003,
    )
    work = [SeqWork(own_tokens=i * 13 + 1, shared_tokens=77, decode_steps=i * 5) for i in range(7)]
    report = ThinkBatchReport([], work)
    parts = split_usage(usage, report)
    assert len(parts) == 7
    assert sum(round(p.cpu_seconds * 1e6) for p in parts) == 2_345_679
    assert sum(round(p.occupancy_seconds * 1e6) for p in parts) == 100_003
    assert sum(p.task_memory_bytes for p in parts) == 7_777_777
    assert all(p.worker_pid == 4242 and p.wall_seconds == 1.5 for p in parts)
