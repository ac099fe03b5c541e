"""Token buckets: per agent and per renewable resource (``cpu`` in CPU-seconds, ``llm_tokens`` in tokens).

    level(t) = min(capacity, level(t0) + rate × (t − t0)),    capacity = rate × burst_seconds

A task is admitted when the level covers its estimate; after the task its measured cost is subtracted,
and the level may go below zero (debt), which the agent pays back by waiting. Every method takes an
explicit ``now`` (a clock reading in seconds) so that the arithmetic can be tested with a hand-driven
clock; ``Buckets`` supplies the real clock and the asynchronous waiting.

Invariants (asserted where they can break):

- ``state.level <= capacity``: tokens never accumulate beyond the burst, whatever the order of refills,
  rate changes and restores.
- Time never runs backwards for a bucket: ``now >= state.updated`` for every call except ``restore``,
  which starts a new clock epoch (clock readings do not survive a restart).
- Cost is never forgiven and never charged twice: ``charge`` is the only operation that lowers the
  level, and it lowers it by exactly the cost it is given; ``set_rate`` and ``restore`` only ever clamp
  the level to the capacity, the same clamp the refill formula applies.
- A bucket with ``rate > 0`` has ``capacity > 0`` (``burst_seconds > 0``), so every estimate is
  admitted after a finite wait; with ``rate == 0`` nothing positive is ever admitted again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["Bucket", "BucketState", "Buckets", "Estimator"]

#: Weight of the newest observation in ``Estimator``'s moving average.
ALPHA = 0.3


class BucketState(msgspec.Struct, frozen=True):
    """What is persisted of a bucket: its level as settled at the clock reading ``updated``."""

    level: Annotated[float, Meta(ge=-1e15, le=1e15)]  # finite: NaN or inf would poison every refill
    #: Clock reading (seconds) at which ``level`` was settled; meaningful only within one run.
    updated: Annotated[float, Meta(ge=-1e15, le=1e15)]


class Bucket:
    """A token bucket for one agent and one renewable resource.

    ``rate`` is in units per second, ``capacity`` is ``rate × burst_seconds``. The level may be
    negative (debt); it refills by the same formula from below zero.
    """

    __slots__ = ("_burst_seconds", "_rate", "_state")

    def __init__(self, rate: float, burst_seconds: float, state: BucketState) -> None:
        if not (math.isfinite(burst_seconds) and burst_seconds > 0.0):
            raise ValueError(f"burst_seconds must be finite and > 0, got {burst_seconds!r}")
        self._burst_seconds = burst_seconds
        self._rate = _checked_rate(rate, burst_seconds)
        if not (math.isfinite(state.level) and math.isfinite(state.updated)):
            raise ValueError(f"bucket state must be finite, got {state!r}")
        if state.level > self.capacity:
            raise ValueError(f"level {state.level} exceeds capacity {self.capacity}")
        self._state = state

    @property
    def rate(self) -> float:
        """Refill rate, units per second (change it with ``set_rate``)."""
        return self._rate

    @property
    def burst_seconds(self) -> float:
        """Seconds of refill the bucket can hold."""
        return self._burst_seconds

    @property
    def capacity(self) -> float:
        """Largest level: ``rate × burst_seconds``."""
        return self._rate * self._burst_seconds

    @property
    def state(self) -> BucketState:
        """The last settled state: what the caller persists."""
        return self._state

    def level(self, now: float) -> float:
        """The level at ``now``: ``min(capacity, level + rate × (now − updated))``; negative is debt."""
        state = self._state
        assert now >= state.updated, f"clock ran backwards: {now} < {state.updated}"
        assert state.level <= self.capacity
        return min(self.capacity, state.level + self._rate * (now - state.updated))

    def admits(self, estimate: float, now: float) -> bool:
        """Whether a task estimated to cost ``estimate`` may start at ``now``.

        The level must cover ``min(estimate, capacity)``: an estimate above the capacity is admitted
        when the bucket is full, otherwise it could never run. An estimate ``<= 0`` only needs the
        level to be ``>= 0`` (debt blocks everything). A bucket with capacity 0 (``rate == 0``)
        admits no positive estimate: an agent holding none of the right does not get to run on it.
        """
        if math.isnan(estimate):
            raise ValueError("estimate is NaN")
        level = self.level(now)
        if estimate <= 0.0:
            return level >= 0.0
        capacity = self.capacity
        if capacity == 0.0:
            return False
        return level >= min(estimate, capacity)

    def wait_seconds(self, estimate: float, now: float) -> float:
        """Seconds from ``now`` until ``admits(estimate, ·)`` becomes true at the current rate.

        0 when admitted already, ``math.inf`` when the rate is 0 and it is not. Otherwise the exact
        ``(need − level) / rate``, rounded up by the few ulps needed so that ``admits(estimate, now + w)``
        holds for the returned ``w`` (a waiter that sleeps ``w`` is never sent back for a sliver).
        """
        if self.admits(estimate, now):
            return 0.0
        if self._rate == 0.0:
            return math.inf
        capacity = self.capacity
        assert capacity > 0.0
        need = 0.0 if estimate <= 0.0 else min(estimate, capacity)
        level = self.level(now)
        assert level < need <= capacity
        wait = (need - level) / self._rate
        # The division and the addition in ``now + wait`` each round; step up from the float grid
        # around ``now`` with a doubling step so this ends within a few iterations (and surely within
        # the float range: the level reaches the capacity, which covers ``need``, as ``wait`` grows).
        step = math.ulp(now + wait)
        for _ in range(4096):
            if self.admits(estimate, now + wait):
                assert wait > 0.0
                return wait
            wait += step
            step *= 2.0
        raise AssertionError("wait_seconds did not converge")

    def charge(self, cost: float, now: float) -> BucketState:
        """Settle the refill up to ``now``, then subtract the measured ``cost``; return the new state.

        Never refuses: the level may go below zero (debt). ``charge(0.0, now)`` settles without
        charging (for example to persist the refill earned so far before a clean shutdown).
        """
        if not (math.isfinite(cost) and cost >= 0.0):
            raise ValueError(f"cost must be finite and >= 0, got {cost!r}")
        self._state = BucketState(self.level(now) - cost, now)
        assert self._state.level <= self.capacity
        return self._state

    def set_rate(self, rate: float, now: float) -> BucketState:
        """Switch to ``rate`` at ``now``: the refill up to ``now`` is at the old rate; return the new state.

        The capacity follows the rate; a level above the new capacity is clamped to it (the refill
        formula would clamp it at the next reading anyway). Debt is kept as it is.
        """
        level = self.level(now)
        self._rate = _checked_rate(rate, self._burst_seconds)
        self._state = BucketState(min(level, self.capacity), now)
        return self._state

    def restore(self, state: BucketState, now: float) -> None:
        """Load a persisted ``state`` without refilling for the time the runtime was down.

        A restart neither refills nor empties a bucket: the level is ``state.level`` (clamped to the
        capacity, in case the rate or burst shrank in between) and refilling resumes from ``now``.
        ``state.updated`` is ignored: it is a clock reading of the previous run.
        """
        if not math.isfinite(state.level):
            raise ValueError(f"bucket state must be finite, got {state!r}")
        self._state = BucketState(min(state.level, self.capacity), now)


def _checked_rate(rate: float, burst_seconds: float) -> float:
    if not (math.isfinite(rate) and rate >= 0.0):
        raise ValueError(f"rate must be finite and >= 0, got {rate!r}")
    capacity = rate * burst_seconds
    # A capacity that underflows to 0 (or overflows) would make admission impossible or meaningless.
    if not math.isfinite(capacity) or (rate > 0.0) != (capacity > 0.0):
        raise ValueError(f"rate {rate!r} × burst_seconds {burst_seconds!r} is not a usable capacity")
    return rate


class Buckets:
    """The per-agent, per-resource buckets, with asynchronous admission for the agents' asyncio loops.

    ``on_event(kind, agent, resource, level)`` is called with ``"agent_blocked"`` when an agent starts
    waiting and ``"agent_unblocked"`` when it is admitted after waiting.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str, str, float], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_event = on_event
        self._buckets: dict[str, dict[str, Bucket]] = {}
        #: Number of ``acquire`` calls of each agent that are waiting (absent when none).
        self._waiting: dict[str, int] = {}
        #: Per agent, the event its waiters sleep on; ``set_rate`` sets and discards it. Created by the
        #: first waiter so that it belongs to the running event loop.
        self._wake: dict[str, asyncio.Event] = {}
        #: Per agent, when it started waiting (while it does) and the seconds it waited before that:
        #: the blocked share a status display shows is the change of ``blocked_seconds`` over an interval.
        self._blocked_since: dict[str, float] = {}
        self._blocked_total: dict[str, float] = {}

    def add(
        self,
        agent: str,
        resource: str,
        rate: float,
        burst_seconds: float,
        state: BucketState | None = None,
    ) -> Bucket:
        """Create ``agent``'s bucket for ``resource``: full, or restored from a persisted ``state``.

        A restored bucket is not refilled for the time the runtime was down (see ``Bucket.restore``).
        Adding a bucket that exists is a ``ValueError``: replacing it would forget its level.
        """
        per_agent = self._buckets.setdefault(agent, {})
        if resource in per_agent:
            raise ValueError(f"bucket {agent}/{resource} exists")
        now = self._clock()
        bucket = Bucket(rate, burst_seconds, BucketState(rate * burst_seconds, now))
        if state is not None:
            bucket.restore(state, now)
        per_agent[resource] = bucket
        return bucket

    def get(self, agent: str, resource: str) -> Bucket:
        """The bucket of ``agent`` for ``resource`` (``KeyError`` if there is none)."""
        return self._buckets[agent][resource]

    def agents(self) -> list[str]:
        """Agents that have buckets, in the order they were added."""
        return list(self._buckets)

    def __contains__(self, agent: object) -> bool:
        """Whether ``agent`` has buckets here."""
        return agent in self._buckets

    def level(self, agent: str, resource: str) -> float:
        """The level of ``agent``'s ``resource`` bucket now (for status displays and agent contexts)."""
        return self.get(agent, resource).level(self._clock())

    def blocked(self, agent: str) -> bool:
        """Whether ``agent`` is waiting in ``acquire`` right now."""
        return agent in self._waiting

    def blocked_seconds(self, agent: str) -> float:
        """Seconds ``agent`` has spent blocked (waiting in ``acquire``) since its buckets were made, now
        included."""
        since = self._blocked_since.get(agent)
        return self._blocked_total.get(agent, 0.0) + (self._clock() - since if since is not None else 0.0)

    async def acquire(self, agent: str, resource: str, estimate: float) -> float:
        """Wait until ``agent``'s ``resource`` bucket admits ``estimate``; return the seconds waited.

        Returns at once (0.0) when admitted. Otherwise the agent is ``blocked`` and sleeps for exactly
        the time the refill needs, woken early by ``set_rate`` so that a trade takes effect at once;
        no polling. Admission does not charge: call ``charge`` with the measured cost afterwards.

        Cancelled while waiting, the agent is no longer blocked but no ``agent_unblocked`` is emitted:
        that event means "admitted", and a cancelled acquire was not.
        """
        bucket = self.get(agent, resource)
        now = self._clock()
        if bucket.admits(estimate, now):
            return 0.0
        start = now
        self._waiting[agent] = self._waiting.get(agent, 0) + 1
        self._blocked_since.setdefault(agent, now)
        try:
            self._emit("agent_blocked", agent, resource, bucket.level(now))
            while True:
                # Recomputed after every wake-up: a timer may fire a hair early, and a trade changes the rate.
                wait = bucket.wait_seconds(estimate, now)
                if wait == 0.0:
                    break
                wake = self._wake.get(agent)
                if wake is None:
                    wake = self._wake[agent] = asyncio.Event()
                try:
                    async with asyncio.timeout(None if math.isinf(wait) else wait):
                        await wake.wait()
                except TimeoutError:
                    pass
                now = self._clock()
        finally:
            count = self._waiting[agent] - 1
            assert count >= 0
            if count:
                self._waiting[agent] = count
            else:
                del self._waiting[agent]
                since = self._blocked_since.pop(agent)
                self._blocked_total[agent] = self._blocked_total.get(agent, 0.0) + self._clock() - since
                # The event is bound to this event loop: a later waiter (maybe in another loop) makes its own.
                self._wake.pop(agent, None)
        self._emit("agent_unblocked", agent, resource, bucket.level(now))
        return now - start

    def charge(self, agent: str, resource: str, cost: float) -> BucketState:
        """Subtract the measured ``cost`` now; return the new state, for the caller to persist.

        The caller writes the state to the ledger together with the task's usage record, so that a
        restart neither loses the charge nor applies it twice.
        """
        return self.get(agent, resource).charge(cost, self._clock())

    def set_rate(self, agent: str, resource: str, rate: float) -> BucketState:
        """Change the rate (a trade of the rate right) now and wake ``agent``'s waiters to re-check.

        The refill up to now is settled at the old rate. Returns the new state, for the caller to
        persist with the trade.
        """
        state = self.get(agent, resource).set_rate(rate, self._clock())
        wake = self._wake.pop(agent, None)
        if wake is not None:
            wake.set()
        return state

    def _emit(self, kind: str, agent: str, resource: str, level: float) -> None:
        if self._on_event is not None:
            self._on_event(kind, agent, resource, level)


class Estimator:
    """A running estimate of an agent's cost per task kind, for admission.

    An exponential moving average (weight ``ALPHA`` = 0.3 on the newest cost): the first observation
    becomes the estimate; before any, the estimate is ``default``. Use one estimator per resource.
    """

    def __init__(self, default: float) -> None:
        if not (math.isfinite(default) and default >= 0.0):
            raise ValueError(f"default must be finite and >= 0, got {default!r}")
        self._default = default
        self._estimates: dict[tuple[str, str], float] = {}

    def estimate(self, agent: str, kind: str) -> float:
        """The estimated cost of ``agent``'s next task of ``kind``."""
        return self._estimates.get((agent, kind), self._default)

    def observe(self, agent: str, kind: str, cost: float) -> None:
        """Fold the measured ``cost`` of a finished task into ``agent``'s estimate for ``kind``."""
        if not (math.isfinite(cost) and cost >= 0.0):
            raise ValueError(f"cost must be finite and >= 0, got {cost!r}")
        key = (agent, kind)
        previous = self._estimates.get(key)
        self._estimates[key] = cost if previous is None else ALPHA * cost + (1.0 - ALPHA) * previous
