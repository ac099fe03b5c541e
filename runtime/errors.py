"""One root for every error the project raises on purpose, and one vocabulary of error codes.

Every exception of the runtime, its workers and its native engines is an ``AecoError`` carrying a
``code`` from ``ErrorCode``. Callers catch the root (an agent's turn: any refusal becomes a reason it
reads) or a precise family (``LedgerError``, ``StoreError``, ``TaskFailed`` …), never a list of
unrelated types. The families keep the builtin base their callers relied on (``ValueError`` for bad
values, ``RuntimeError`` for servers that cannot be used, ``FileNotFoundError`` for a missing model),
so ``except ValueError`` around a parse still works.

Codes, by who meets them (an agent reads the code and the message; an operator reads the message):

=====================  ========================================================================
input                  ``invalid`` (a value out of range or of the wrong shape), ``invalid_id``,
                       ``invalid_config``, ``invalid_action``, ``invalid_agent``, ``invalid_text``,
                       ``invalid_vector``, ``invalid_schema``, ``invalid_output`` (a completion that
                       does not match its schema), ``protocol`` (a frame that is not a message)
permission             ``forbidden``, ``not_found``, ``unknown_account``, ``not_code``
money and quotas       ``overdraft``, ``insufficient_funds``, ``quota_exceeded``, ``budget_spent``,
                       ``capacity`` (rights that do not fit the container)
state                  ``conflict``, ``duplicate_usage``, ``cursor``, ``readonly``, ``closed``, ``busy``
tasks                  ``task_error``, ``memory_exceeded``, ``worker_crashed``, ``deadline_exceeded``,
                       ``pool_failed``, ``pool_closed``, ``cancelled``, ``bad_report`` (a worker
                       reported a usage that cannot be true: refused, charged from the kernel)
confined code          ``code_error`` (the agent's code failed), ``cpu_exceeded``, ``killed``,
                       ``output_too_large``, ``sandbox_error`` (confinement could not be applied)
servers and engines    ``unavailable`` (PostgreSQL, Redis, an embedder), ``model_not_found``,
                       ``inference`` (the model could not generate), ``calibration``
=====================  ========================================================================
"""

from __future__ import annotations

import errno
from typing import Literal, get_args

ErrorCode = Literal[
    # input
    "invalid",
    "invalid_id",
    "invalid_config",
    "invalid_action",
    "invalid_agent",
    "invalid_text",
    "invalid_vector",
    "invalid_schema",
    "invalid_output",
    "protocol",
    # permission
    "forbidden",
    "not_found",
    "unknown_account",
    "not_code",
    # money and quotas
    "overdraft",
    "insufficient_funds",
    "quota_exceeded",
    "disk_full",
    "budget_spent",
    "capacity",
    # state
    "conflict",
    "duplicate_usage",
    "cursor",
    "readonly",
    "closed",
    "busy",
    # tasks
    "task_error",
    "memory_exceeded",
    "worker_crashed",
    "deadline_exceeded",
    "pool_failed",
    "pool_closed",
    "cancelled",
    "bad_report",
    # confined code
    "code_error",
    "cpu_exceeded",
    "killed",
    "output_too_large",
    "sandbox_error",
    # servers and engines
    "unavailable",
    "model_not_found",
    "inference",
    "calibration",
]
#: Every code, for validation and documentation.
ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))


class AecoError(Exception):
    """An error the project raised on purpose: ``code`` (from ``ErrorCode``) says what kind, ``message``
    says what happened in words a person can act on.

    A family whose errors carry different codes (``LedgerError``, ``StoreError``, ``TaskFailed`` …)
    passes ``code`` and reads ``"<code>: <message>"``; a family of one code (``ConfigError``,
    ``CapacityError``, ``Unavailable`` …) sets ``default_code`` and reads as its message alone, the one
    line an operator sees.
    """

    #: The code of a family whose instances do not choose one.
    default_code: ErrorCode = "invalid"

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        self.code: ErrorCode = code or self.default_code
        assert self.code in ERROR_CODES, f"unknown error code {self.code!r}"
        self.message = message
        super().__init__(message if code is None else f"{code}: {message}")


class Unavailable(AecoError, RuntimeError):
    """A server or engine the runtime needs could not be used (after retrying where that makes sense).
    The message is one line naming what, where (URLs without their passwords) and why."""

    default_code: ErrorCode = "unavailable"


class StorageFailed(AecoError, OSError):
    """A durable store could not commit a batch, and nothing of it was written: ``disk_full`` when the
    volume (or the store's map) is full, else ``unavailable``. Callers handle it as any refusal; the
    same operation can be retried once space returns."""


def storage_failure(exc: BaseException, store: str) -> Exception:
    """What the callers of a failed commit of ``store`` hear: a project error as it is, and a failure of
    the storage itself (an ``OSError``, an LMDB error …) as a ``StorageFailed`` that says so."""
    if isinstance(exc, AecoError):
        return exc
    if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: the caller hears what it was
        return RuntimeError(f"{store}: the commit was interrupted ({exc!r})")
    text = str(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "MDB_MAP_FULL" in text
    if full:
        return StorageFailed(f"{store}: the disk is full ({text}); nothing of the batch was written", code="disk_full")
    return StorageFailed(f"{store}: the commit failed ({type(exc).__name__}: {text})", code="unavailable")
