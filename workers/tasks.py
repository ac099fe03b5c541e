"""Task handlers: what a worker does for each kind of task.

``burn``, ``alloc``, ``sleep`` and ``echo`` are the instruments the accounting is checked with;
``call`` runs an importable callable for ``WorkerPoolExecutor``. A handler returns the output bytes or
raises; ``TaskError`` carries a pickled exception back so that the caller re-raises it with its type.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool

from runtime.errors import AecoError, ErrorCode
from runtime.protocol import Alloc, Burn, Call, Echo, Sleep, TaskSpec

_PAGE = 4096
_BLOCK = bytes(16384)  # hashing >2 KiB releases the GIL, so burning threads run in parallel


class TaskError(AecoError):
    """A task failed; ``payload`` is the pickled exception (for ``call``) or empty."""

    default_code: ErrorCode = "task_error"

    def __init__(self, message: str, payload: bytes = b"", raised: str = "") -> None:
        super().__init__(message)
        self.payload = payload
        #: The type name of the exception the task raised (``MemoryError`` …), if any.
        self.raised = raised


class TaskCancelled(AecoError):
    """The task stopped early because the supervisor asked (SIGUSR1): a generation between two tokens,
    an invocation whose confined child was killed. ``payload`` is the task's report of what it spent
    (a ``ThinkReport`` for a generation), or empty."""

    default_code: ErrorCode = "cancelled"

    def __init__(self, message: str, payload: bytes = b"") -> None:
        super().__init__(message)
        self.payload = payload


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    sha = hashlib.sha256
    while time.thread_time() < end:
        sha(_BLOCK)


def burn(spec: Burn) -> bytes:
    """Spend ``spec.ms`` of CPU time in each of ``spec.threads`` threads."""
    seconds = spec.ms / 1000
    if spec.threads == 1:
        _spin(seconds)
        return b""
    threads = [threading.Thread(target=_spin, args=(seconds,)) for _ in range(spec.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return b""


def alloc(spec: Alloc) -> bytes:
    """Touch ``spec.mb`` MiB page by page, hold it ``spec.hold_ms``, then free it."""
    size = spec.mb << 20
    buf = bytearray(size)  # calloc'd: untouched pages cost nothing until written
    buf[::_PAGE] = b"\x01" * (size // _PAGE)
    if spec.hold_ms:
        time.sleep(spec.hold_ms / 1000)
    del buf
    return b""


def call(spec: Call) -> bytes:
    """Unpickle ``(fn, args, kwargs)``, call it, and pickle what it returns."""
    try:
        fn, args, kwargs = pickle.loads(spec.payload)
    except BaseException as exc:  # as ProcessPoolExecutor: a call its worker cannot read breaks the pool
        text = "".join(traceback.format_exception(exc)).rstrip()
        broken = BrokenProcessPool(f"the call could not be unpickled in the worker: {_describe(exc)}")
        raise TaskError(text, pickle.dumps(broken), type(exc).__name__) from None
    try:
        value = fn(*args, **kwargs)
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # the caller gets every failure, with its type
        text = "".join(traceback.format_exception(exc)).rstrip()
        try:
            payload = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(payload)
        except Exception:
            payload = pickle.dumps(RuntimeError(f"unpicklable {type(exc).__name__}: {_describe(exc)}"))
        raise TaskError(text, payload, type(exc).__name__) from None


def initialize(payload: bytes) -> str:
    """Call a pickled ``(fn, args)`` (an executor's initializer); return its traceback if it raised."""
    try:
        fn, args = pickle.loads(payload)
        fn(*args)
    except BaseException as exc:  # the pool is told whatever stopped it, SystemExit included
        return "".join(traceback.format_exception(exc)).rstrip()
    return ""


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ itself fails
        return f"<{type(exc).__name__} with an unprintable message>"


def run(spec: TaskSpec) -> bytes:
    """Run one task and return its output; raise ``TaskError`` (or anything) if it fails."""
    if isinstance(spec, Echo):
        return spec.data.encode()
    if isinstance(spec, Call):
        return call(spec)
    if isinstance(spec, Burn):
        return burn(spec)
    if isinstance(spec, Alloc):
        return alloc(spec)
    if isinstance(spec, Sleep):
        time.sleep(spec.ms / 1000)
        return b""
    raise TaskError(f"unknown task kind {type(spec).__name__}")
