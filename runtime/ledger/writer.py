"""The write side every ledger backend shares: validate, queue, one writer thread that group-commits.

A backend subclasses ``GroupCommitted`` and supplies ``_commit(batch)`` (apply every operation of the
batch in one durable transaction, then resolve each future) and ``_close_store()``.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Self

from runtime.groupcommit import serve_batches
from runtime.ledger import LedgerError, Op, Receipt
from runtime.ledger.rules import validate

Item = tuple[Op, "Future[Receipt]"]


class GroupCommitted(ABC):
    """``submit``/``apply``/``close`` over a queue served by one writer thread in batches of at most
    ``max_batch`` operations (1: a transaction per operation)."""

    def _start_writer(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    def submit(self, op: Op) -> Future[Receipt]:
        """Queue ``op``; the future resolves once it is durable (or with the ``LedgerError``)."""
        fut: Future[Receipt] = Future()
        # Running from the start: an operation cannot be withdrawn once queued (cancelling the
        # future, or an asyncio wrapper of it, only stops the waiting), and the writer may always
        # resolve it.
        fut.set_running_or_notify_cancel()
        try:
            op = validate(op)
        except LedgerError as exc:
            fut.set_exception(exc)
            return fut
        with self._lock:
            if self._closed:
                fut.set_exception(LedgerError("closed", "the ledger is closed"))
                return fut
            self._queue.put((op, fut))
        return fut

    def apply(self, op: Op) -> Receipt:
        """Apply one operation and wait until it is durable."""
        return self.submit(op).result()

    def _write_loop(self) -> None:
        def commit(batch: list[Item]) -> None:
            # Looked up per batch, not bound once: a test can hold the writer mid-stream.
            self._commit(batch)

        serve_batches(self._queue, self._max_batch, commit)

    @abstractmethod
    def _commit(self, batch: list[Item]) -> None:
        """Apply ``batch`` in one durable transaction, then resolve every future (``resolve``/``fail``)."""

    @abstractmethod
    def _close_store(self) -> None:
        """Release the store (the writer has stopped)."""

    def close(self) -> None:
        """Apply what is queued, stop the writer and close the store."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._writer.join()
        self._close_store()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(batch: list[Item], outcomes: list[Receipt | LedgerError]) -> None:
    """Resolve each future of a committed batch with its receipt or refusal."""
    for (_, fut), res in zip(batch, outcomes, strict=True):
        if isinstance(res, Receipt):
            fut.set_result(res)
        else:
            fut.set_exception(res)


def fail(batch: list[Item], exc: BaseException) -> None:
    """The batch's transaction was aborted: nothing of it is written, and every caller learns why."""
    err = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
    for _, fut in batch:
        fut.set_exception(err)
