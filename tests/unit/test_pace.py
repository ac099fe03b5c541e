"""``runtime.host.pace``: a paced thread computes at most its share of the time, in short slices, and
``pace()`` does nothing on any other thread. Measured on the thread's own CPU clock, so a loaded host
only makes the paced thread's wall time longer, never the checks false."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.host.pace import SLICE_S, pace, paced, pacing


def _compute(cpu_s: float) -> tuple[float, float, int]:
    """Compute for ``cpu_s`` of this thread's CPU, calling ``pace()`` per step; (wall, cpu, sleeps seen)."""
    wall0, cpu0 = time.monotonic(), time.thread_time()
    gaps = 0
    last = time.monotonic()
    while time.thread_time() - cpu0 < cpu_s:
        sum(range(200))
        pace()
        now = time.monotonic()
        gaps += now - last > SLICE_S / 2  # a step does not take that long: a sleep (or the host's doing)
        last = now
    return time.monotonic() - wall0, time.thread_time() - cpu0, gaps


def test_a_paced_thread_sleeps_as_long_as_its_share_says() -> None:
    """At a share of a half, each slice of CPU is followed by a sleep as long: wall time at least twice
    the CPU, and many sleeps (one per slice), so a loop beside it is never kept waiting a whole pass."""
    with pacing(0.5):
        wall, cpu, gaps = _compute(0.2)
    assert wall >= 2 * cpu * 0.9, (wall, cpu)
    assert gaps >= 0.2 / SLICE_S / 2, gaps


def test_pace_is_free_outside_pacing_and_on_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``pacing``, or on another thread than the paced one, ``pace()`` never sleeps."""
    slept: list[str] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(threading.current_thread().name)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    _compute(0.05)
    assert slept == []
    with pacing(0.5):
        other = threading.Thread(target=_compute, args=(0.05,), name="other")
        other.start()
        other.join()
        _compute(0.01)
    assert slept and set(slept) == {threading.current_thread().name}, slept


def test_paced_yields_every_item_and_pacing_does_not_nest() -> None:
    assert list(paced(range(5))) == [0, 1, 2, 3, 4]
    with pacing(0.5), pytest.raises(AssertionError), pacing(0.5):
        pass
    with pytest.raises(AssertionError), pacing(0.0):
        pass
