"""The figures of batched thinking (``runtime.economy.thinking``): what a batch's work says was
evaluated, reused and kept."""

from __future__ import annotations

from runtime.economy.thinking import ThinkFigures
from runtime.protocol import SeqWork


def test_a_shared_prefix_counts_once_as_evaluated_and_again_as_reused_for_each_other_user() -> None:
    t = ThinkFigures()
    t.started(3)
    assert (t.batched_now, t.batched_peak) == (3, 3)
    # Three fresh sequences sharing 100 prefix tokens evaluated in this batch, 10/20/30 of their own.
    t.ended([SeqWork(own_tokens=n, shared_tokens=100, decode_steps=5) for n in (10, 20, 30)])
    assert (t.batches, t.batched_thinks, t.sizes, t.batched_now) == (1, 3, {3: 1}, 0)
    assert t.tokens_evaluated == 60 + 100 and t.tokens_reused == 200 and t.prefix_hits == 0


def test_kept_tokens_are_reused_and_make_a_prefix_hit() -> None:
    t = ThinkFigures()
    for size in (2, 2, 1):
        t.started(size)
    assert t.batched_peak == 5
    t.ended([SeqWork(own_tokens=4, kept_tokens=300), SeqWork(own_tokens=6, kept_tokens=280)])
    t.ended([SeqWork(own_tokens=400), SeqWork(own_tokens=0)])  # a cancel before anything was evaluated
    t.ended([SeqWork(own_tokens=7, kept_tokens=100)])
    assert t.sizes == {2: 2, 1: 1} and t.largest == 2 and t.batched_now == 0
    assert t.prefix_hits == 3 and t.tokens_reused == 680 and t.tokens_evaluated == 417
    assert "3 batches (2×2, 1×1); prefix hits 3/5" in t.line() and "reused 680 (62%)" in t.line()


def test_remote_requests_in_flight_and_their_peak() -> None:
    t = ThinkFigures()
    assert not t.any()
    t.remote_started()
    t.remote_started()
    t.remote_ended()
    assert (t.remote_now, t.remote_peak, t.remote_thinks) == (1, 2, 1) and t.any()
    assert "remote 1 in flight (peak 2), 1 done" in t.line()
