"""The group-commit writer's policy: when it lingers for more items (``Linger``, a hand-driven clock), and
how ``serve_batches`` forms batches from a real queue."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from runtime.groupcommit import (
    LINGER_BATCH,
    LINGER_MAX_S,
    LINGER_MIN_DUE,
    LINGER_WINDOW_S,
    Delivery,
    Linger,
    Reply,
    serve_batches,
)


def steady(linger: Linger, per_s: float, start: float = 100.0, items: int = 4) -> float:
    """Feed ``linger`` batches of ``items`` taken at ``per_s`` items per second for ten averaging windows;
    the clock at the end."""
    now = start
    for _ in range(int(10 * LINGER_WINDOW_S * per_s / items)):
        now += items / per_s
        linger.taken(items, now)
    return now


def test_a_lone_item_or_a_trickle_is_committed_at_once() -> None:
    linger = Linger()
    assert linger.until(1, 5.0) == 5.0  # nothing seen yet
    slow = LINGER_MIN_DUE / LINGER_MAX_S / 2  # half the rate at which lingering starts
    now = steady(linger, slow)
    assert linger.rate == pytest.approx(slow, rel=0.05)
    assert linger.until(1, now) == now


def test_under_load_it_lingers_at_most_the_maximum_and_less_for_a_nearly_full_batch() -> None:
    linger = Linger()
    fast = 4 * LINGER_MIN_DUE / LINGER_MAX_S
    now = steady(linger, fast)
    assert linger.rate == pytest.approx(fast, rel=0.05)
    assert linger.until(1, now) == pytest.approx(now + LINGER_MAX_S)
    # Close to a full batch: only as long as the items still missing take to arrive.
    assert linger.until(LINGER_BATCH - 2, now) == pytest.approx(now + 2 / linger.rate)
    assert linger.until(LINGER_BATCH, now) == now


def test_after_an_idle_spell_the_next_item_waits_for_nothing() -> None:
    linger = Linger()
    now = steady(linger, 4 * LINGER_MIN_DUE / LINGER_MAX_S)
    now += 20 * LINGER_WINDOW_S  # nothing for a while, then one item
    linger.taken(1, now)
    assert linger.until(1, now + 1e-3) == now + 1e-3


def test_a_clock_that_does_not_move_changes_nothing() -> None:
    linger = Linger()
    now = steady(linger, 10_000.0)
    rate = linger.rate
    linger.taken(100, now)
    assert linger.rate == rate


def test_serve_batches_takes_what_is_queued_up_to_the_maximum_and_commits_it_before_stopping() -> None:
    q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for i in range(10):
        q.put(i)
    q.put(None)
    batches: list[list[int]] = []
    serve_batches(q, 4, batches.append, Linger())
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lingering_writer_stops_at_once_when_told_to_and_commits_what_it_holds() -> None:
    q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    linger = Linger()
    steady(linger, 10 * LINGER_MIN_DUE / LINGER_MAX_S)  # items have been arriving fast: it lingers
    batches: list[list[int]] = []
    writer = threading.Thread(target=serve_batches, args=(q, 1000, batches.append, linger))
    writer.start()
    for i in range(3):
        q.put(i)
    q.put(None)
    writer.join(10)
    assert not writer.is_alive()
    assert [i for b in batches for i in b] == [0, 1, 2]


def test_a_reply_hands_one_waiting_thread_its_outcome_through_a_delivery() -> None:
    replies: list[Reply[int]] = [Reply(), Reply()]
    got: list[object] = []

    def waiter(reply: Reply[int]) -> None:
        try:
            got.append(reply.wait())
        except LookupError as exc:
            got.append(exc)

    threads = [threading.Thread(target=waiter, args=(r,)) for r in replies]
    for t in threads:
        t.start()
    time.sleep(0.05)
    assert got == []  # both still wait: nothing was delivered
    delivery = Delivery()
    delivery.result(replies[0], 7)
    failure = LookupError("refused")
    delivery.exception(replies[1], failure)
    delivery.send()
    for t in threads:
        t.join(10)
    assert sorted(got, key=str) == sorted([7, failure], key=str)
