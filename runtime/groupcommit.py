"""The writer-thread loop shared by every group-committing store (ledger, event log, artifact store)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def serve_batches(q: queue.SimpleQueue[T | None], max_batch: int, commit: Callable[[list[T]], None]) -> None:
    """Commit queued items in batches until a ``None`` arrives.

    Each batch is everything queued when the writer gets to it (at most ``max_batch``), so under load
    many callers share one durable transaction, and alone a caller waits for no one. Items queued
    before the ``None`` are committed before the loop returns.
    """
    while True:
        item = q.get()
        if item is None:
            return
        batch = [item]
        stop = False
        while len(batch) < max_batch:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                stop = True
                break
            batch.append(nxt)
        commit(batch)
        if stop:
            return
