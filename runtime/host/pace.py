"""Long background work beside an event loop, in short slices: ``pacing`` and ``pace``.

A thread computing in Python holds the GIL, and hands it over only when it makes a system call or is
asked to at the switch interval (``sys.getswitchinterval()``, 5 ms). The event loop gives the GIL up
at each of its system calls — every LMDB transaction it begins, every socket send, every poll — and
must then wait for it back: beside a thread that computes, each one costs the loop up to a switch
interval (the convoy effect), and a loop that makes hundreds a second all but stops. A retention pass
computes for seconds (the store's squash, the journal's fold, the events' archive): that stopped
agents' actions for most of the pass.

``with pacing(share):`` on such a thread, and ``pace()`` called often in its loops (once per object, per
journal entry, per event), make it sleep a little after every ``SLICE_S`` of its own CPU: it uses at
most ``share`` of the interpreter's time, and while it sleeps the loop runs free. ``pace()`` is a no-op
on any other thread, so the stores call it unconditionally. Never call it while holding a lock or a
write transaction another thread waits for: the sleep would hold them too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: The CPU a paced thread runs between two sleeps: short enough that the loop's wait for the GIL is
#: never long (the loop's own steps take about as long), long enough that the sleeps cost little.
SLICE_S = 0.002
#: The default share of the time a paced thread computes.
SHARE = 0.5
#: ``pace()`` reads the thread's CPU clock once per this many calls (a call is a loop's one item).
_CHECK_EVERY = 16


class _Pacer:
    __slots__ = ("calls", "rest_per_s", "slice_start")

    def __init__(self, share: float) -> None:
        assert 0.0 < share <= 1.0, f"invariant: a share of the time in (0, 1], not {share}"
        #: Seconds of sleep per second of CPU: a share of 0.5 sleeps as long as it computed.
        self.rest_per_s = 1.0 / share - 1.0
        self.slice_start = time.thread_time()
        self.calls = 0


class _Local(threading.local):
    pacer: _Pacer | None = None


_local = _Local()


@contextlib.contextmanager
def pacing(share: float = SHARE) -> Iterator[None]:
    """Pace this thread's ``pace()`` calls to ``share`` of the time, until the block ends."""
    assert _local.pacer is None, "invariant: pacing is not nested"
    _local.pacer = _Pacer(share)
    try:
        yield
    finally:
        _local.pacer = None


def pace() -> None:
    """On a thread inside ``pacing``: sleep once this slice's CPU is spent (see the module docstring)."""
    p = _local.pacer
    if p is None:
        return
    p.calls += 1
    if p.calls % _CHECK_EVERY:
        return
    used = time.thread_time() - p.slice_start
    if used >= SLICE_S:
        time.sleep(used * p.rest_per_s if p.rest_per_s > 0 else 0.0)
        p.slice_start = time.thread_time()


def paced(items: Iterable[T]) -> Iterator[T]:
    """``items``, with a ``pace()`` before each."""
    for item in items:
        pace()
        yield item
