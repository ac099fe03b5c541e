"""Retrying a call with exponential back-off while its failure is one that may heal, up to a deadline.

Connecting to a server that is still starting (PostgreSQL, Redis) is the case: a refused connection
is worth another try a little later, a refused login is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from runtime.errors import Unavailable

T = TypeVar("T")
E = TypeVar("E", bound=Exception)


class GaveUp(Unavailable):
    """The deadline passed while the call kept failing in ways that may heal; ``last`` is the last failure."""

    def __init__(self, attempts: int, last: Exception) -> None:
        super().__init__(f"gave up after {attempts} attempts; last: {reason(last)}")
        self.attempts = attempts
        self.last = last


def reason(exc: BaseException) -> str:
    """A failure's message on one line (drivers' messages span several), for an error or a log line."""
    return " ".join(str(exc).split())


def retry_transient(
    call: Callable[[], T],
    *,
    catch: type[E],
    is_transient: Callable[[E], bool],
    deadline_s: float,
    first_backoff_s: float = 0.1,
    max_backoff_s: float = 2.0,
    on_first_failure: Callable[[E], None] | None = None,
) -> T:
    """Return what ``call`` returns, calling it again after a ``catch`` failure that ``is_transient``.

    The waits double from ``first_backoff_s`` up to ``max_backoff_s`` and never pass the deadline.
    A failure that is not transient (or not a ``catch``) is raised at once, unchanged; when the
    deadline passes, ``GaveUp`` is raised from the last failure. ``on_first_failure`` is told of the
    first transient failure (to say once that the caller is waiting).
    """
    end = time.monotonic() + deadline_s
    backoff, attempt = first_backoff_s, 0
    while True:
        attempt += 1
        try:
            return call()
        except catch as exc:
            if not is_transient(exc):
                raise
            left = end - time.monotonic()
            if left <= 0:
                raise GaveUp(attempt, exc) from exc
            if attempt == 1 and on_first_failure is not None:
                on_first_failure(exc)
            time.sleep(min(backoff, left))
            backoff = min(backoff * 2, max_backoff_s)
