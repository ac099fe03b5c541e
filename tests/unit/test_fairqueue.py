"""Unit tests for ``runtime.pool.fairqueue.FairQueue``."""

from __future__ import annotations

from collections import Counter, deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtime.pool.fairqueue import FairQueue


def pop_all(q: FairQueue[int]) -> list[tuple[str, int]]:
    out = []
    while len(q):
        out.append(q.pop())
    return out


def test_round_robin_fairness() -> None:
    q: FairQueue[int] = FairQueue()
    for i in range(1000):
        q.push("A", i)
    for i in range(3):
        q.push("B", 1000 + i)
    first6 = [q.pop() for _ in range(6)]
    assert [item for key, item in first6 if key == "B"] == [1000, 1001, 1002]
    # strict alternation while both have work
    assert [key for key, _ in first6] == ["A", "B", "A", "B", "A", "B"]
    rest = pop_all(q)
    assert len(rest) == 997
    assert all(key == "A" for key, _ in rest)
    assert [item for _, item in rest] == list(range(3, 1000))


def test_three_agents_rotate() -> None:
    q: FairQueue[int] = FairQueue()
    for key, n in (("a", 3), ("b", 1), ("c", 2)):
        for i in range(n):
            q.push(key, i)
    assert [k for k, _ in pop_all(q)] == ["a", "b", "c", "a", "c", "a"]


def test_fifo_within_an_agent() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(50):
        q.push("x", f"x{i}")
        q.push("y", f"y{i}")
    popped: dict[str, list[str]] = {"x": [], "y": []}
    while len(q):
        key, item = q.pop()
        popped[key].append(item)
    assert popped["x"] == [f"x{i}" for i in range(50)]
    assert popped["y"] == [f"y{i}" for i in range(50)]


def test_new_agent_joins_back_of_rotation() -> None:
    q: FairQueue[int] = FairQueue()
    q.push("a", 1)
    q.push("a", 2)
    q.push("b", 1)
    assert q.pop() == ("a", 1)  # a goes to the back: [b, a]
    q.push("c", 1)  # c joins behind a
    assert [k for k, _ in pop_all(q)] == ["b", "a", "c"]


def test_agent_that_emptied_rejoins_at_back() -> None:
    q: FairQueue[int] = FairQueue()
    q.push("a", 1)
    q.push("b", 1)
    q.push("b", 2)
    assert q.pop() == ("a", 1)  # a's line is now empty and leaves the rotation
    q.push("a", 2)
    assert pop_all(q) == [("b", 1), ("a", 2), ("b", 2)]


def test_push_front_goes_to_head_of_line_and_rotation() -> None:
    q: FairQueue[int] = FairQueue()
    q.push("a", 1)
    q.push("b", 1)
    q.push("b", 2)
    q.push_front("b", 0)  # a retried task: b is served next, and 0 before 1
    assert pop_all(q) == [("b", 0), ("a", 1), ("b", 1), ("b", 2)]


def test_push_front_on_new_key() -> None:
    q: FairQueue[int] = FairQueue()
    q.push("a", 1)
    q.push_front("z", 9)
    assert len(q) == 2
    assert pop_all(q) == [("z", 9), ("a", 1)]


def test_push_front_twice_is_lifo_at_the_head() -> None:
    q: FairQueue[int] = FairQueue()
    q.push("a", 3)
    q.push_front("a", 2)
    q.push_front("a", 1)
    assert [item for _, item in pop_all(q)] == [1, 2, 3]


def test_len_tracks_push_pop_push_front_drain() -> None:
    q: FairQueue[int] = FairQueue()
    assert len(q) == 0
    q.push("a", 1)
    q.push("b", 2)
    q.push_front("a", 0)
    assert len(q) == 3
    q.pop()
    assert len(q) == 2
    q.drain()
    assert len(q) == 0


def test_peek_shows_what_pop_takes_and_leaves_it() -> None:
    q: FairQueue[int] = FairQueue()
    with pytest.raises(IndexError):
        q.peek()
    q.push("a", 1)
    q.push("b", 2)
    q.push("a", 3)
    seen = []
    while q:
        head = q.peek()
        n = len(q)
        assert q.pop()[1] == head and len(q) == n - 1
        seen.append(head)
    assert seen == [1, 2, 3]


def test_drain_returns_everything_and_empties() -> None:
    q: FairQueue[int] = FairQueue()
    for i in range(5):
        q.push("a", i)
    for i in range(3):
        q.push("b", 10 + i)
    q.push_front("b", 9)
    items = q.drain()
    assert sorted(items) == [0, 1, 2, 3, 4, 9, 10, 11, 12]
    # within each agent the drained order is that agent's line order
    assert [i for i in items if i < 9] == [0, 1, 2, 3, 4]
    assert [i for i in items if i >= 9] == [9, 10, 11, 12]
    assert len(q) == 0
    assert list(q) == []
    assert q.drain() == []
    with pytest.raises(IndexError):
        q.pop()
    # usable after a drain
    q.push("c", 1)
    assert q.pop() == ("c", 1)


def test_iter_does_not_consume() -> None:
    q: FairQueue[int] = FairQueue()
    q.push("a", 1)
    q.push("b", 2)
    assert sorted(q) == [1, 2]
    assert len(q) == 2


def test_pop_on_empty_raises_index_error() -> None:
    q: FairQueue[int] = FairQueue()
    with pytest.raises(IndexError):
        q.pop()
    q.push("a", 1)
    q.pop()
    with pytest.raises(IndexError):
        q.pop()
    assert len(q) == 0


# --- properties --------------------------------------------------------------------------------------

KEYS = ["a", "b", "c", "d"]
KEY = st.sampled_from(KEYS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEY, st.integers()), max_size=60))
def test_pushes_then_pops_are_round_robin(pushes: list[tuple[str, int]]) -> None:
    """With every push done first, the pop order is rounds over the keys in first-push order."""
    q: FairQueue[int] = FairQueue()
    lines: dict[str, list[int]] = {}
    for key, item in pushes:
        q.push(key, item)
        lines.setdefault(key, []).append(item)
    expected = [
        (key, line[r])
        for r in range(max((len(v) for v in lines.values()), default=0))
        for key, line in lines.items()
        if r < len(line)
    ]
    assert pop_all(q) == expected


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), KEY, st.integers()),
        st.tuples(st.just("push_front"), KEY, st.integers()),
        st.tuples(st.just("pop"), st.just(""), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_multiset_and_per_key_order(ops: list[tuple[str, str, int]]) -> None:
    q: FairQueue[int] = FairQueue()
    model: dict[str, deque[int]] = {}
    pushed: Counter[int] = Counter()
    popped: Counter[int] = Counter()
    for op, key, item in ops:
        if op == "push":
            q.push(key, item)
            model.setdefault(key, deque()).append(item)
            pushed[item] += 1
        elif op == "push_front":
            q.push_front(key, item)
            model.setdefault(key, deque()).appendleft(item)
            pushed[item] += 1
        elif len(q):
            k, got = q.pop()
            assert model[k].popleft() == got  # the head of that key's line, nothing else
            popped[got] += 1
        else:
            with pytest.raises(IndexError):
                q.pop()
        assert len(q) == sum(len(v) for v in model.values())
    for k, got in pop_all(q):
        assert model[k].popleft() == got
        popped[got] += 1
    assert popped == pushed
    assert all(not v for v in model.values())


class FairQueueMachine(RuleBasedStateMachine):
    """Stateful check against a per-key model, plus a bounded-wait fairness invariant.

    A key with work waits at most (number of other keys) pops, plus one pop for every ``push_front``
    of another key (which puts that key at the head of the rotation) while it waits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q: FairQueue[int] = FairQueue()
        self.model: dict[str, deque[int]] = {}
        self.serial = 0
        self.pushed: Counter[int] = Counter()
        self.popped: Counter[int] = Counter()
        #: pops since each non-empty key was last served (or since it became non-empty)
        self.waited: dict[str, int] = {}
        #: push_fronts of other keys since each waiting key started waiting
        self.fronts: dict[str, int] = {}

    def _next(self) -> int:
        self.serial += 1
        return self.serial

    @rule(key=KEY)
    def push(self, key: str) -> None:
        item = self._next()
        if not self.model.get(key):
            self.waited[key] = self.fronts[key] = 0
        self.q.push(key, item)
        self.model.setdefault(key, deque()).append(item)
        self.pushed[item] += 1

    @rule(key=KEY)
    def push_front(self, key: str) -> None:
        item = self._next()
        for k in self.fronts:
            if k != key:
                self.fronts[k] += 1
        # key is now at the head of the rotation: nothing is ahead of it
        self.waited[key] = self.fronts[key] = 0
        self.q.push_front(key, item)
        self.model.setdefault(key, deque()).appendleft(item)
        self.pushed[item] += 1

    @precondition(lambda self: len(self.q) > 0)
    @rule()
    def pop(self) -> None:
        key, item = self.q.pop()
        assert self.model[key].popleft() == item
        self.popped[item] += 1
        for k in self.waited:
            self.waited[k] += 1
        if self.model[key]:
            self.waited[key] = self.fronts[key] = 0
        else:
            del self.waited[key], self.fronts[key]

    @precondition(lambda self: len(self.q) == 0)
    @rule()
    def pop_empty(self) -> None:
        with pytest.raises(IndexError):
            self.q.pop()

    @rule()
    def drain(self) -> None:
        items = self.q.drain()
        assert Counter(items) == Counter(i for line in self.model.values() for i in line)
        for i in items:
            self.popped[i] += 1
        self.model.clear()
        self.waited.clear()
        self.fronts.clear()

    @invariant()
    def length_matches(self) -> None:
        assert len(self.q) == sum(len(v) for v in self.model.values())

    @invariant()
    def conservation(self) -> None:
        in_queue = Counter(i for line in self.model.values() for i in line)
        assert self.popped + in_queue == self.pushed
        assert Counter(self.q) == in_queue

    @invariant()
    def bounded_wait(self) -> None:
        others = len(KEYS) - 1
        for k, w in self.waited.items():
            assert w <= others + self.fronts[k], (k, w, self.fronts[k])


TestFairQueueMachine = FairQueueMachine.TestCase
TestFairQueueMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
