"""Unit tests for ``runtime.economy.buckets``: the bucket arithmetic on a hand-driven clock, and admission waits."""

from __future__ import annotations

import asyncio
import math
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.economy.buckets import Bucket, Buckets, BucketState, Estimator


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


def full(rate: float, burst_seconds: float, now: float = 0.0) -> Bucket:
    return Bucket(rate, burst_seconds, BucketState(rate * burst_seconds, now))


rates = st.floats(0.01, 100.0)
bursts = st.floats(0.1, 50.0)
dts = st.floats(0.0, 100.0)
costs = st.floats(0.0, 1000.0)


# --- properties -----------------------------------------------------------------------------------


@given(
    rate=st.one_of(st.just(0.0), rates),
    burst=bursts,
    steps=st.lists(st.tuples(dts, st.floats(-10.0, 10_000.0), costs), max_size=40),
)
def test_never_admits_below_the_estimate(rate: float, burst: float, steps: list[tuple[float, float, float]]) -> None:
    clock = FakeClock()
    bucket = full(rate, burst)
    for dt, estimate, cost in steps:
        now = clock.advance(dt)
        admitted = bucket.admits(estimate, now)
        if admitted:
            assert bucket.level(now) >= min(estimate, bucket.capacity)
        wait = bucket.wait_seconds(estimate, now)
        assert (wait == 0.0) == admitted
        if rate == 0.0:
            assert admitted or wait == math.inf
        elif not admitted:
            # Waiting the returned time is enough...
            assert bucket.admits(estimate, now + wait)
            # ...and it is not padded: 1% less is not enough, unless the deficit is within rounding.
            deficit = wait * rate
            if deficit > 1e-9 * max(1.0, abs(bucket.level(now)), bucket.capacity):
                assert not bucket.admits(estimate, now + 0.99 * wait)
        bucket.charge(cost, now)


@given(
    rate=st.one_of(st.just(0.0), rates),
    burst=bursts,
    level_fraction=st.floats(-2.0, 1.0),
    estimate=st.floats(-10.0, 10_000.0),
)
def test_admission_is_exactly_the_rule(rate: float, burst: float, level_fraction: float, estimate: float) -> None:
    """Admitted iff level ≥ min(estimate, capacity) (estimate > 0, capacity > 0), or level ≥ 0 (estimate ≤ 0).

    Levels are drawn around the estimate, including just below it, where a lax rule would slip through.
    """
    capacity = rate * burst
    need = min(estimate, capacity)
    for drawn in (level_fraction * capacity, need, math.nextafter(need, -math.inf)):
        bucket = Bucket(rate, burst, BucketState(min(drawn, capacity), 3.0))
        level = bucket.level(3.0)
        covers_positive = capacity > 0.0 and level >= need
        assert bucket.admits(estimate, 3.0) == (level >= 0.0 if estimate <= 0.0 else covers_positive)


@settings(max_examples=300)
@given(
    rate=rates,
    burst=bursts,
    max_cost=st.floats(0.0, 1000.0),
    tasks=st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 1.0), dts), max_size=60),
)
def test_conservation_bound(
    rate: float, burst: float, max_cost: float, tasks: list[tuple[float, float, float]]
) -> None:
    """Over any run, total charged ≤ rate × elapsed + capacity + max_cost.

    Derivation. Start full, level C at t0. Only the refill adds tokens, at most rate × (t − t0) of them
    (the clamp at the capacity only ever discards refill), and only charges remove them, so
    level(t) ≤ C + rate × (t − t0) − charged(t). A task is charged only after it was admitted, when the
    level is ≥ 0 (estimates are ≥ 0); the charge, ≤ max_cost, leaves it ≥ −max_cost, and between
    charges it only rises. Hence level(t) ≥ −max_cost and charged(t) ≤ rate × (t − t0) + C + max_cost.
    The estimates (fractions of up to twice max_cost, so also above the capacity) do not matter.
    """
    clock = FakeClock(1000.0)
    bucket = full(rate, burst, clock.now)
    start = clock.now
    charged = 0.0
    for estimate_fraction, cost_fraction, idle in tasks:
        estimate = estimate_fraction * max_cost
        clock.advance(idle)
        clock.advance(bucket.wait_seconds(estimate, clock.now))
        assert bucket.admits(estimate, clock.now)
        cost = cost_fraction * max_cost
        bucket.charge(cost, clock.now)
        charged += cost
        bound = rate * (clock.now - start) + bucket.capacity + max_cost
        assert charged <= bound * (1 + 1e-9) + 1e-9


# An event: ("charge", dt, cost), ("rate", dt, new rate), ("restart", dt, clean shutdown?, new epoch).
charge_events = st.tuples(st.just("charge"), dts, costs)
rate_events = st.tuples(st.just("rate"), dts, st.one_of(st.just(0.0), rates))
restart_events = st.tuples(st.just("restart"), dts, st.booleans(), st.floats(0.0, 1e6))


def reference_level(rate: float, burst: float, events: list[tuple[object, ...]]) -> tuple[float, float]:
    """Replay ``events`` with plain arithmetic over durations (no clock readings); return (level, scale).

    ``scale`` is the magnitude of the numbers involved, for the relative comparison.
    """
    level = rate * burst
    owed = 0.0  # seconds of refill since the level was last settled
    scale = level
    for event in events:
        kind, dt = event[0], event[1]
        assert isinstance(dt, float)
        owed += dt
        if kind == "charge":
            cost = event[2]
            assert isinstance(cost, float)
            level = min(rate * burst, level + rate * owed) - cost
            owed = 0.0
            scale += cost
        elif kind == "rate":
            new_rate = event[2]
            assert isinstance(new_rate, float)
            level = min(new_rate * burst, rate * burst, level + rate * owed)
            rate = new_rate
            owed = 0.0
            scale += rate * burst
        else:
            clean = event[2]
            if clean:  # settled and persisted at shutdown: the refill up to then is kept
                level = min(rate * burst, level + rate * owed)
            # Either way the downtime does not refill; after a crash, neither does the time since the
            # last persisted settlement.
            owed = 0.0
    return min(rate * burst, level + rate * owed), max(scale, 1.0)


@settings(max_examples=300)
@given(
    rate=rates,
    burst=bursts,
    events=st.lists(st.one_of(charge_events, rate_events, restart_events), max_size=50),
)
def test_no_charge_lost_or_doubled(rate: float, burst: float, events: list[tuple[object, ...]]) -> None:
    clock = FakeClock(500.0)
    bucket = full(rate, burst, clock.now)
    persisted = bucket.state
    for event in events:
        kind, dt = event[0], event[1]
        assert isinstance(dt, float)
        now = clock.advance(dt)
        if kind == "charge":
            assert isinstance(event[2], float)
            persisted = bucket.charge(event[2], now)
        elif kind == "rate":
            assert isinstance(event[2], float)
            persisted = bucket.set_rate(event[2], now)
        else:
            clean, epoch = event[2], event[3]
            assert isinstance(epoch, float)
            if clean:
                persisted = bucket.charge(0.0, now)
            # Round trip through the ledger's encoding, then a new process whose clock has a new origin.
            persisted = msgspec_roundtrip(persisted)
            clock = FakeClock(epoch)
            bucket = Bucket(bucket.rate, bucket.burst_seconds, BucketState(0.0, clock.now))
            bucket.restore(persisted, clock.now)
    expected, scale = reference_level(rate, burst, events)
    assert math.isclose(bucket.level(clock.now), expected, rel_tol=1e-9, abs_tol=1e-9 * scale)


def msgspec_roundtrip(state: BucketState) -> BucketState:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=BucketState)


# --- examples -------------------------------------------------------------------------------------


def test_level_refills_up_to_capacity() -> None:
    bucket = Bucket(2.0, 5.0, BucketState(1.0, 10.0))
    assert bucket.capacity == 10.0
    assert bucket.level(10.0) == 1.0
    assert bucket.level(12.0) == 5.0
    assert bucket.level(1000.0) == 10.0


def test_set_rate_settles_at_the_old_rate_first() -> None:
    bucket = Bucket(1.0, 100.0, BucketState(0.0, 0.0))
    state = bucket.set_rate(5.0, 10.0)
    # 10 s at the old rate 1/s, not at the new 5/s.
    assert state == BucketState(10.0, 10.0)
    assert bucket.level(12.0) == pytest.approx(20.0)
    assert bucket.capacity == 500.0


def test_set_rate_clamps_the_level_to_the_new_capacity() -> None:
    bucket = full(10.0, 2.0)
    assert bucket.level(0.0) == 20.0
    bucket.set_rate(1.0, 0.0)
    assert bucket.capacity == 2.0
    assert bucket.level(0.0) == 2.0
    # Raising the rate again does not give the clamped tokens back.
    bucket.set_rate(10.0, 0.0)
    assert bucket.level(0.0) == 2.0


def test_set_rate_keeps_debt() -> None:
    bucket = full(10.0, 2.0)
    bucket.charge(50.0, 0.0)
    bucket.set_rate(1.0, 0.0)
    assert bucket.level(0.0) == -30.0


def test_restore_does_not_refill() -> None:
    bucket = full(2.0, 10.0)
    bucket.restore(BucketState(3.0, 7.0), 1000.0)
    assert bucket.level(1000.0) == 3.0
    assert bucket.level(1001.0) == 5.0
    # Nor does it forgive debt.
    bucket.restore(BucketState(-4.0, 123456.0), 5.0)
    assert bucket.level(5.0) == -4.0


def test_restore_clamps_to_a_smaller_capacity() -> None:
    bucket = full(1.0, 10.0)
    bucket.restore(BucketState(50.0, 0.0), 0.0)
    assert bucket.level(0.0) == 10.0


def test_debt_waits_until_paid_back_and_the_estimate_covered() -> None:
    bucket = full(2.0, 5.0)  # capacity 10
    state = bucket.charge(30.0, 0.0)
    assert state == BucketState(-20.0, 0.0)
    estimate = 4.0
    assert not bucket.admits(estimate, 0.0)
    wait = bucket.wait_seconds(estimate, 0.0)
    assert wait == pytest.approx((estimate - state.level) / bucket.rate) == pytest.approx(12.0)
    assert not bucket.admits(estimate, 11.9)
    assert bucket.admits(estimate, wait)
    # Debt blocks even an estimate of zero until it is paid back.
    assert not bucket.admits(0.0, 9.9)
    assert bucket.admits(0.0, 10.0)


def test_estimate_above_capacity_is_admitted_when_full() -> None:
    bucket = full(1.0, 10.0)
    assert bucket.admits(1e9, 0.0)
    bucket.charge(0.5, 0.0)
    assert not bucket.admits(1e9, 0.0)
    assert bucket.wait_seconds(1e9, 0.0) == pytest.approx(0.5)


def test_zero_rate_admits_nothing_positive() -> None:
    bucket = full(0.0, 10.0)
    assert bucket.capacity == 0.0
    assert not bucket.admits(1.0, 0.0)
    assert bucket.wait_seconds(1.0, 0.0) == math.inf
    assert bucket.admits(0.0, 0.0)
    bucket.charge(1.0, 0.0)
    assert bucket.wait_seconds(0.0, 1e6) == math.inf


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        full(-1.0, 1.0)
    with pytest.raises(ValueError):
        full(1.0, 0.0)
    with pytest.raises(ValueError):
        Bucket(1.0, 1.0, BucketState(2.0, 0.0))
    bucket = full(1.0, 1.0)
    with pytest.raises(ValueError):
        bucket.charge(-1.0, 0.0)
    with pytest.raises(ValueError):
        bucket.charge(math.nan, 0.0)
    with pytest.raises(ValueError):
        bucket.admits(math.nan, 0.0)
    with pytest.raises(ValueError):
        bucket.set_rate(math.inf, 0.0)


def test_buckets_registry_on_a_fake_clock() -> None:
    clock = FakeClock(100.0)
    buckets = Buckets(clock=clock)
    buckets.add("a", "cpu", 1.0, 10.0)
    buckets.add("b", "cpu", 2.0, 10.0, state=BucketState(4.0, 5.0))
    buckets.add("a", "llm_tokens", 50.0, 10.0)
    assert buckets.agents() == ["a", "b"]
    assert buckets.level("a", "cpu") == 10.0
    # Restored: no refill for the 95 s between the old reading and now.
    assert buckets.level("b", "cpu") == 4.0
    clock.advance(1.0)
    assert buckets.charge("b", "cpu", 10.0) == BucketState(-4.0, 101.0)
    assert buckets.set_rate("b", "cpu", 4.0) == BucketState(-4.0, 101.0)
    assert buckets.get("b", "cpu").wait_seconds(0.0, clock.now) == 1.0
    with pytest.raises(ValueError):
        buckets.add("a", "cpu", 1.0, 1.0)
    with pytest.raises(KeyError):
        buckets.get("c", "cpu")


def test_estimator_moving_average() -> None:
    est = Estimator(default=2.5)
    assert est.estimate("a", "think") == 2.5
    est.observe("a", "think", 10.0)
    assert est.estimate("a", "think") == 10.0
    est.observe("a", "think", 0.0)
    assert est.estimate("a", "think") == pytest.approx(7.0)
    est.observe("a", "think", 20.0)
    assert est.estimate("a", "think") == pytest.approx(0.3 * 20.0 + 0.7 * 7.0)
    # Per agent and per kind.
    assert est.estimate("b", "think") == 2.5
    assert est.estimate("a", "invoke") == 2.5
    with pytest.raises(ValueError):
        est.observe("a", "think", -1.0)


# --- asynchronous admission (real clock) ----------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, float]] = []

    def __call__(self, kind: str, agent: str, resource: str, level: float) -> None:
        self.events.append((kind, agent, resource, level))


def empty_cpu_bucket() -> tuple[Recorder, Buckets]:
    """Agent ``a`` with an empty ``cpu`` bucket refilling at 1/s, its events recorded."""
    recorder = Recorder()
    buckets = Buckets(on_event=recorder)
    buckets.add("a", "cpu", 0.0, 1.0)
    return recorder, buckets


async def blocked_on(buckets: Buckets, amount: float) -> asyncio.Task[float]:
    """``a`` acquiring ``amount`` of cpu, returned once the bucket says it is blocked (no fixed sleep)."""
    waiter = asyncio.create_task(buckets.acquire("a", "cpu", amount))
    while not buckets.blocked("a"):
        await asyncio.sleep(0.001)
    assert not waiter.done()
    return waiter


def test_acquire_returns_at_once_when_admitted() -> None:
    recorder = Recorder()
    buckets = Buckets(on_event=recorder)
    buckets.add("a", "cpu", 10.0, 1.0)
    assert asyncio.run(buckets.acquire("a", "cpu", 5.0)) == 0.0
    assert recorder.events == []
    assert not buckets.blocked("a")


def test_acquire_waits_for_the_refill() -> None:
    recorder = Recorder()
    buckets = Buckets(on_event=recorder)
    buckets.add("a", "cpu", 10.0, 1.0, state=BucketState(0.0, 0.0))
    started = time.perf_counter()
    waited = asyncio.run(buckets.acquire("a", "cpu", 2.0))
    elapsed = time.perf_counter() - started
    assert 0.15 <= waited <= 1.0
    assert 0.15 <= elapsed <= 1.0
    assert [e[:3] for e in recorder.events] == [
        ("agent_blocked", "a", "cpu"),
        ("agent_unblocked", "a", "cpu"),
    ]
    assert recorder.events[0][3] == pytest.approx(0.0, abs=0.1)
    assert recorder.events[1][3] >= 2.0
    assert not buckets.blocked("a")


def test_set_rate_wakes_a_waiter_early() -> None:
    recorder, buckets = empty_cpu_bucket()

    async def scenario() -> float:
        waiter = await blocked_on(buckets, 1.0)
        traded = time.perf_counter()
        buckets.set_rate("a", "cpu", 100.0)
        await waiter
        return time.perf_counter() - traded

    assert asyncio.run(scenario()) < 0.5  # the refill alone would take 1 s
    assert [e[0] for e in recorder.events] == ["agent_blocked", "agent_unblocked"]
    assert not buckets.blocked("a")


def test_blocked_is_visible_while_waiting() -> None:
    buckets = Buckets()
    buckets.add("a", "cpu", 10.0, 1.0, state=BucketState(0.0, 0.0))
    buckets.add("b", "cpu", 10.0, 1.0)

    async def scenario() -> list[bool]:
        waiter = asyncio.create_task(buckets.acquire("a", "cpu", 3.0))
        seen = []
        await asyncio.sleep(0.05)
        seen.append(buckets.blocked("a"))
        seen.append(buckets.blocked("b"))
        await waiter
        seen.append(buckets.blocked("a"))
        return seen

    assert asyncio.run(scenario()) == [True, False, False]


def test_blocked_until_every_wait_of_the_agent_ends() -> None:
    buckets = Buckets()
    buckets.add("a", "cpu", 10.0, 1.0, state=BucketState(0.0, 0.0))
    buckets.add("a", "llm_tokens", 100.0, 1.0, state=BucketState(0.0, 0.0))

    async def scenario() -> list[bool]:
        short = asyncio.create_task(buckets.acquire("a", "llm_tokens", 5.0))  # 0.05 s
        long = asyncio.create_task(buckets.acquire("a", "cpu", 2.0))  # 0.2 s
        await short
        seen = [buckets.blocked("a")]
        await long
        seen.append(buckets.blocked("a"))
        return seen

    assert asyncio.run(scenario()) == [True, False]


def test_blocked_seconds_count_the_time_any_wait_of_the_agent_lasted() -> None:
    buckets = Buckets()
    buckets.add("a", "cpu", 10.0, 1.0, state=BucketState(0.0, 0.0))
    buckets.add("a", "llm_tokens", 100.0, 1.0, state=BucketState(0.0, 0.0))
    buckets.add("b", "cpu", 10.0, 1.0)

    async def scenario() -> tuple[float, float, float]:
        short = asyncio.create_task(buckets.acquire("a", "llm_tokens", 5.0))  # 0.05 s
        long = asyncio.create_task(buckets.acquire("a", "cpu", 2.0))  # 0.2 s, overlapping: counted once
        await short
        during = buckets.blocked_seconds("a")
        await long
        return during, buckets.blocked_seconds("a"), buckets.blocked_seconds("b")

    during, after, never = asyncio.run(scenario())
    assert 0.04 <= during < after
    assert 0.19 <= after < 0.4
    assert never == 0.0


def test_cancelled_wait_clears_blocked() -> None:
    recorder, buckets = empty_cpu_bucket()

    async def scenario() -> None:
        waiter = await blocked_on(buckets, 1.0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(scenario())
    assert not buckets.blocked("a")
    assert [e[0] for e in recorder.events] == ["agent_blocked"]


def test_waiting_does_not_spin() -> None:
    buckets = Buckets()
    buckets.add("a", "cpu", 10.0, 1.0, state=BucketState(0.0, 0.0))
    cpu_before = time.process_time()
    waited = asyncio.run(buckets.acquire("a", "cpu", 5.0))
    cpu_used = time.process_time() - cpu_before
    assert waited >= 0.45
    assert cpu_used < 0.05


def test_buckets_outlive_an_event_loop() -> None:
    """A cancelled wait in one event loop does not break waiting in the next (a restarted supervisor loop)."""
    buckets = Buckets()
    buckets.add("a", "cpu", 0.0, 1.0)

    async def cancelled_wait() -> None:
        waiter = asyncio.create_task(buckets.acquire("a", "cpu", 1.0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    async def traded_wait() -> float:
        waiter = asyncio.create_task(buckets.acquire("a", "cpu", 1.0))
        await asyncio.sleep(0.01)
        buckets.set_rate("a", "cpu", 1000.0)
        return await waiter

    asyncio.run(cancelled_wait())
    assert asyncio.run(traded_wait()) < 0.5
