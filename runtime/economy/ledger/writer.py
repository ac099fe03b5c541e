"""The write side every ledger backend shares: validate, queue, one writer thread that group-commits.

A backend subclasses ``GroupCommitted``, calls ``_start_ledger_writer`` once it is ready, and supplies
``_commit(batch)`` (apply every operation of the batch in one durable transaction, then resolve each
future) and ``_close_store()``.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from concurrent.futures import Future

from runtime.economy.ledger import LedgerError, Op, Receipt
from runtime.economy.ledger.rules import validate
from runtime.errors import storage_failure
from runtime.groupcommit import Delivery, GroupCommitter, Reply, Waiting

Item = tuple[Op, Waiting[Receipt]]


class GroupCommitted(GroupCommitter[Item]):
    """``submit``/``apply``/``close`` over the shared group-commit writer (``runtime.groupcommit``), in
    batches of at most ``max_batch`` operations (1: a transaction per operation)."""

    def _start_ledger_writer(self, max_batch: int) -> None:
        self._init_writer("ledger-writer", max_batch)
        self._start_writer()

    def submit(self, op: Op) -> Future[Receipt]:
        """Queue ``op``; the future resolves once it is durable (or with the ``LedgerError``)."""
        fut: Future[Receipt] = Future()
        # Running from the start: an operation cannot be withdrawn once queued (cancelling the
        # future, or an asyncio wrapper of it, only stops the waiting), and the writer may always
        # resolve it.
        fut.set_running_or_notify_cancel()
        self._queue_op(op, fut)
        return fut

    def submit_async(self, op: Op) -> asyncio.Future[Receipt]:
        """``submit`` for code on an event loop (call it there): a future of that loop, resolved with the
        rest of its batch in one call on the loop. Cancelling it only stops the waiting."""
        fut: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._queue_op(op, fut)
        return fut

    def _queue_op(self, op: Op, fut: Waiting[Receipt]) -> None:
        try:
            op = validate(op)
        except LedgerError as exc:
            fut.set_exception(exc)
            return
        if not self._enqueue((op, fut)):
            fut.set_exception(LedgerError("closed", "the ledger is closed"))

    def apply(self, op: Op) -> Receipt:
        """Apply one operation and wait until it is durable."""
        reply: Reply[Receipt] = Reply()
        self._queue_op(op, reply)
        return reply.wait()

    @abstractmethod
    def _close_store(self) -> None:
        """Release the store (the writer has stopped)."""

    def close(self) -> None:
        """Apply what is queued, stop the writer and close the store."""
        if self._stop_writer():
            self._close_store()


def resolve(batch: list[Item], outcomes: list[Receipt | LedgerError]) -> None:
    """Resolve each future of a committed batch with its receipt or refusal."""
    delivery = Delivery()
    for (_, fut), res in zip(batch, outcomes, strict=True):
        if isinstance(res, Receipt):
            delivery.result(fut, res)
        else:
            delivery.exception(fut, res)
    delivery.send()


def fail(batch: list[Item], exc: BaseException) -> None:
    """The batch's transaction was aborted: nothing of it is written, and every caller learns why."""
    err = storage_failure(exc, "the ledger")
    delivery = Delivery()
    for _, fut in batch:
        delivery.exception(fut, err)
    delivery.send()
