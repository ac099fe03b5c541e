"""Group commit, written once for every store that has it (the ledger, the event log, the artifact store).

Callers on any thread queue items (an operation and the future that will carry its outcome); one
writer thread takes everything queued when it gets to it, at most ``max_batch`` items, and hands the
batch to the store's ``_commit``, which applies it in one durable transaction and then resolves every
future. Under load many callers share one sync; alone a caller waits for no one.

Under load the writer lingers (``Linger``): a durable commit costs about the same whatever its size (its
syncs and the transaction: ~200 µs of CPU on these hosts, against ~15 µs per item), so when items arrive
fast enough that a few more are due within ``LINGER_MAX_S``, it waits that long at most for them before it
commits (asleep: what is queued meanwhile wakes nobody). Alone, or at a trickle, an item waits for nothing.

A caller on a thread gets a ``concurrent.futures.Future`` (or, blocking for its one item, a ``Reply``); a
caller on an event loop an ``asyncio`` future of its loop. A batch's outcomes go out through one
``Delivery``: the loop's futures of the whole batch are resolved by one call on that loop (one wake-up of
its self-pipe, not one per item, and no thread-safe future chained to an asyncio one per item).

Invariants:

- An item is queued only while the writer accepts: ``_enqueue`` and ``_stop_writer`` are ordered by one
  lock, so nothing is queued after the stop, and everything queued before it is committed before
  ``_stop_writer`` returns.
- One thread commits, so batches are committed in the order their first items were queued.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures as cf
import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Self, TypeVar

T = TypeVar("T")


class Reply(Generic[T]):
    """The outcome of one item for the one thread that queued it and waits for it (``wait``): a
    ``concurrent.futures.Future`` without what a lone waiter does not need (a condition, callbacks,
    cancelling), so it costs a lock instead of ~7 µs of Python per item — many callers blocking one item
    at a time (a node's threads, the ledger's ``apply``) each pay that once per item."""

    __slots__ = ("_done", "_exc", "_value")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()  # released once, by the writer, when the outcome is set
        self._value: T | None = None
        self._exc: BaseException | None = None

    def set_result(self, value: T) -> None:
        """Succeed with ``value`` (once)."""
        self._value = value
        self._done.release()

    def set_exception(self, exc: BaseException) -> None:
        """Fail with ``exc`` (once)."""
        self._exc = exc
        self._done.release()

    def wait(self) -> T:
        """Block until the outcome is set; return the value or raise the exception."""
        self._done.acquire()
        if self._exc is not None:
            raise self._exc
        return self._value  # type: ignore[return-value]


#: Where a queued item's outcome goes: a waiting thread's reply or future, or a future of the event loop
#: that queued it.
Waiting = Reply[T] | cf.Future[T] | asyncio.Future[T]


#: The longest a writer holds an item back waiting for others to share its commit: what it adds to a
#: caller's wait under load, against one commit's CPU (~200 µs) saved per item that joins.
LINGER_MAX_S = 0.004
#: It lingers only when at least this many more items are due within ``LINGER_MAX_S`` at the recent rate
#: (750 items/s): below that, the wait would cost more latency than the commits it saves are worth (at
#: that rate many callers share the writer, each waiting far longer for its other work than the linger).
LINGER_MIN_DUE = 3.0
#: It stops lingering once a batch holds this many items: past it, a commit's own cost is small per item.
LINGER_BATCH = 32
#: The arrival rate is an average over about this long (older batches weigh exponentially less).
LINGER_WINDOW_S = 0.1


class Linger:
    """When a writer waits for more items before committing (see the module docstring), from the rate at
    which its batches filled recently; ``now`` is the writer's ``time.monotonic``, explicit for tests."""

    __slots__ = ("_last", "rate")

    def __init__(self) -> None:
        #: Items per second, averaged over about ``LINGER_WINDOW_S``.
        self.rate = 0.0
        self._last: float | None = None

    def taken(self, items: int, now: float) -> None:
        """A batch of ``items`` was taken at ``now``: they arrived since the previous batch was taken."""
        last, self._last = self._last, now
        if last is None or now <= last:
            return
        kept = math.exp(-(now - last) / LINGER_WINDOW_S)
        self.rate = kept * self.rate + (1.0 - kept) * items / (now - last)

    def until(self, held: int, now: float) -> float:
        """Until when to wait for more items when ``held`` are in hand at ``now`` (``now``: commit at once)."""
        if held >= LINGER_BATCH or self.rate * LINGER_MAX_S < LINGER_MIN_DUE:
            return now
        return now + min(LINGER_MAX_S, (LINGER_BATCH - held) / self.rate)


def _take_queued(q: queue.SimpleQueue[T | None], batch: list[T], most: int) -> bool:
    """Move what is queued into ``batch`` (up to ``most`` items in all) without waiting; True once it
    took the ``None`` that stops the writer."""
    while len(batch) < most:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            return False
        if nxt is None:
            return True
        batch.append(nxt)
    return False


def serve_batches(
    q: queue.SimpleQueue[T | None], max_batch: int, commit: Callable[[list[T]], None], linger: Linger | None = None
) -> None:
    """Commit queued items in batches until a ``None`` arrives.

    Each batch is everything queued when the writer gets to it (at most ``max_batch``), and with
    ``linger`` what arrives while it lingers. Items queued before the ``None`` are committed before the
    loop returns.
    """
    clock = time.monotonic
    while True:
        item = q.get()
        if item is None:
            return
        batch = [item]
        stop = _take_queued(q, batch, max_batch)
        if linger is not None and not stop:
            # It lingers asleep, not waiting on the queue: an item queued meanwhile wakes nobody (no
            # thread switch, no hand-over of the GIL, per item), and what came is taken when it wakes.
            now = clock()
            end = linger.until(len(batch), now)
            if end > now and len(batch) < max_batch:
                time.sleep(end - now)
                stop = _take_queued(q, batch, max_batch)
            linger.taken(len(batch), clock())
        commit(batch)
        if stop:
            return


class Delivery:
    """The outcomes of one committed batch, handed over once it is durable: a thread's future at once,
    an event loop's futures together, by one ``call_soon_threadsafe`` per loop for the whole batch."""

    __slots__ = ("_loops",)

    def __init__(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}

    def result(self, fut: Waiting[T], value: T) -> None:
        """``fut`` succeeds with ``value``."""
        if isinstance(fut, asyncio.Future):
            self._loops.setdefault(fut.get_loop(), []).append((fut, value, None))
        else:
            fut.set_result(value)

    def exception(self, fut: Waiting[Any], exc: BaseException) -> None:
        """``fut`` fails with ``exc``."""
        if isinstance(fut, asyncio.Future):
            self._loops.setdefault(fut.get_loop(), []).append((fut, None, exc))
        else:
            fut.set_exception(exc)

    def send(self) -> None:
        """Hand the event loops their outcomes (call once, after the last ``result``/``exception``)."""
        for loop, outcomes in self._loops.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(_settle, outcomes)
        self._loops = {}


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the futures' loop: resolve each one its caller still waits for (a cancelled wait is done)."""
    for fut, value, exc in outcomes:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)


class Hold:
    """A writer held for a test (``GroupCommitter.hold``): it takes its next batch, sets ``waiting``,
    and commits nothing until ``release``. ``sizes`` records every batch committed from the hold on."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.sizes: list[int] = []
        self._go = threading.Event()

    def release(self) -> None:
        """Let the writer commit the batch it holds, and every later one."""
        self._go.set()

    def _before(self, batch_size: int) -> None:
        self.sizes.append(batch_size)
        self.waiting.set()
        self._go.wait()


class GroupCommitter(abc.ABC, Generic[T]):
    """The write side of a group-committing store (see the module docstring).

    A subclass calls ``_init_writer`` in its constructor, ``_start_writer`` once its store is ready to
    write (a read-only store never does: it accepts nothing), ``_enqueue`` to queue an item (refusing
    it, with its own error, when that returns False) and ``_stop_writer`` from its ``close``; it
    implements ``_commit`` and ``close``. A ``with`` block closes it.
    """

    def _init_writer(self, name: str, max_batch: int) -> None:
        assert max_batch >= 1
        self._writer_name = name
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders _enqueue against _stop_writer
        self._accepting = False
        self._stopped = False
        self._writer: threading.Thread | None = None
        self._hold: Hold | None = None

    def _start_writer(self) -> None:
        """Accept items from now on and start the writer thread."""
        with self._lock:
            assert self._writer is None and not self._stopped, "a writer starts once"
            self._accepting = True
            self._writer = threading.Thread(target=self._write_loop, name=self._writer_name, daemon=True)
            self._writer.start()

    def _enqueue(self, item: T) -> bool:
        """Queue ``item`` for the writer; False (and nothing queued) when the writer does not accept."""
        with self._lock:
            if not self._accepting:
                return False
            self._queue.put(item)
            return True

    def _stop_writer(self) -> bool:
        """Stop accepting, let the writer commit what is queued and stop. False when already stopped."""
        with self._lock:
            if self._stopped:
                return False
            self._stopped, self._accepting = True, False
            writer = self._writer
            if writer is not None:
                self._queue.put(None)
        if writer is not None:
            writer.join()
            self._writer = None
        return True

    @property
    def stopped(self) -> bool:
        """Whether ``_stop_writer`` has run (the store is closing or closed)."""
        return self._stopped

    def hold(self) -> Hold:
        """Test seam: hold the writer before its next batch (see ``Hold``); many items then queue up
        behind it and form one batch once released."""
        self._hold = Hold()
        return self._hold

    def _write_loop(self) -> None:
        def commit(batch: list[T]) -> None:
            if (hold := self._hold) is not None:
                hold._before(len(batch))
            self._commit(batch)

        serve_batches(self._queue, self._max_batch, commit, Linger())

    @abc.abstractmethod
    def close(self) -> None:
        """Commit what is queued, stop the writer (``_stop_writer``) and release the store; once closed,
        nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def _commit(self, batch: list[T]) -> None:
        """Apply ``batch`` in one durable transaction, then resolve every item's future (or fail them all
        with why, writing nothing)."""
