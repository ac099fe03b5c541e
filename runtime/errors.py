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
state                  ``conflict``, ``duplicate_usage``, ``cursor``, ``readonly``, ``closed``, ``busy``,
                       ``damaged`` (a file of the data directory does not hold what it must)
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

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NoReturn, cast, get_args

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
    "damaged",
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


class Damaged(AecoError):
    """A file of the data directory is damaged or missing where the rest of the data says it must be. The
    message names the file, says what is wrong with it and the command that repairs it (or that nothing
    can, and a backup must be restored)."""

    default_code: ErrorCode = "damaged"

    def __init__(self, path: str | Path, why: str, fix: str) -> None:
        super().__init__(f"{path}: {why} ({fix})")
        self.path = Path(path)
        self.why = why


#: What to do about a damaged file that nothing rebuilds.
RESTORE = "restore the data_dir from a backup"


def repair_command(data: str | Path) -> str:
    """The command that repairs the data directory ``data`` (``runtime.ops.repair``)."""
    return f"python -m runtime.admin --data-dir {data} repair"


# ------------------------------------------------------------------------------ command lines

#: Codes that mean the operator asked for something wrong (exit 2), rather than that it failed (exit 1).
INPUT_CODES: frozenset[str] = frozenset(
    {c for c in ERROR_CODES if c.startswith("invalid")} | {"protocol", "not_found", "unknown_account", "capacity"}
)
#: The help of ``--debug``, which every command line takes (``command`` takes it out of the arguments).
DEBUG_HELP = "on a failure, show its traceback too"
#: ``--debug`` was given: ``report`` shows the traceback of the error it reports.
_debug = False


def report(line: str) -> None:
    """Print ``error: <line>`` on stderr, the one line every command ends a failure with; with ``--debug``,
    the traceback of the exception being handled (if any) first."""
    if _debug and sys.exc_info()[1] is not None:
        traceback.print_exc()
    print(f"error: {line}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """The parser of every command line: it takes ``--debug``, and a mistake on the line is one line,
    ``error: <what> (see <prog> --help)``, and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message: str) -> NoReturn:
        """Say what is wrong with the command line in one line and exit 2."""
        report(f"{message} (see {self.prog} --help)")
        raise SystemExit(2)


def _stop_starting(signum: int, frame: FrameType | None) -> NoReturn:
    # The process ends here, with os._exit, not by raising SystemExit: the handler runs wherever the main
    # thread is, and an exception raised inside a finalizer (a ``ZipFile.__del__`` that importlib.metadata
    # leaves to the garbage collector runs during the supervisor's imports) is printed as ignored while
    # the start goes on — it then ran for good, its signal spent (seen once, under load). Nothing is open
    # yet, so nothing needs closing; the line is written unbuffered, as a write this signal interrupted
    # may hold stderr's buffer.
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    line = f"error: stopped by {signal.Signals(signum).name} while starting (nothing was opened)\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    os._exit(128 + signum)


def command(module: str, argv: list[str] | None = None, *, quiet_until_loop: bool = False) -> int:
    """Run ``module.main(argv)`` as a ``python -m`` command line, the one way every entry point runs.

    ``--debug`` (anywhere on the line) is taken out of ``argv`` and makes ``report`` show tracebacks.
    A SIGINT or SIGTERM while the module loads stops the process with one line (nothing was opened
    yet); with ``quiet_until_loop`` that lasts until the command installs its own handlers (the
    supervisor's loop), else the usual ones come back once it has loaded. What ``main`` lets escape is
    one line too: an ``AecoError`` its message (exit 2 for bad input, 1 for a failure), anything else
    its type and message with a hint to ``--debug``, a Ctrl-C ``interrupted`` (exit 130).
    """
    global _debug
    args = sys.argv[1:] if argv is None else argv
    _debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    before = {sig: signal.signal(sig, _stop_starting) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        main = cast(Callable[[list[str]], int], importlib.import_module(module).main)
        if not quiet_until_loop:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        return main(args)
    except KeyboardInterrupt:
        report("interrupted (Ctrl-C)")
        return 130
    except AecoError as exc:
        report(str(exc))
        return 2 if exc.code in INPUT_CODES else 1
    except Exception as exc:
        hint = "" if _debug else " (an unexpected failure: run again with --debug for the traceback)"
        report(f"{type(exc).__name__}: {exc}{hint}")
        return 1
