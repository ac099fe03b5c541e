"""What thinking did in this run, for the live view, ``status.json`` and ``/metrics``: how many thinks
went in ``think_batch`` tasks and in batches of which sizes, how many ran at once, how many started
from tokens a worker kept (prefix-cache hits), and the prompt tokens evaluated against those reused.

Counted from each batch's ``SeqWork`` (what the worker reports it evaluated per sequence):

    evaluated = sum of own_tokens + the shared prefix once (it was evaluated once for all its users)
    reused    = sum of kept_tokens (a kept prompt or prefix, not evaluated again)
              + the shared prefix for every user but the first (each copy saved evaluating it)

A sequence is a prefix-cache hit when it kept some tokens (``kept_tokens`` > 0).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from msgspec import Struct

from runtime.protocol import SeqWork

__all__ = ["ThinkFigures"]

#: The remote figures are counted by the threads that make the requests.
_remote_lock = threading.Lock()


class ThinkFigures(Struct):
    """Thinking so far in this run (``Economy.thinking``); ``*_now`` are what runs at this moment."""

    #: ``think_batch`` tasks that ended, the thinks they held, and how many batches had each size.
    batches: int = 0
    batched_thinks: int = 0
    sizes: dict[int, int] = {}
    #: Thinks in batches running now, and the most at once so far.
    batched_now: int = 0
    batched_peak: int = 0
    #: Thinks that started from tokens their worker kept (their agent's last prompt, or the prefix cache).
    prefix_hits: int = 0
    #: Prompt tokens evaluated, and those reused instead (see the module docstring).
    tokens_evaluated: int = 0
    tokens_reused: int = 0
    #: Thinks against a remote server in flight now (requests made from the supervisor), and the most at once.
    remote_now: int = 0
    remote_peak: int = 0
    remote_thinks: int = 0

    @property
    def largest(self) -> int:
        """The largest batch so far (0: none)."""
        return max(self.sizes, default=0)

    def any(self) -> bool:
        """Whether any think went in a batch or to a remote server (or is going now)."""
        return bool(self.batches or self.batched_now or self.remote_thinks or self.remote_now)

    def started(self, size: int) -> None:
        """A batch of ``size`` thinks was handed to the pool."""
        self.batched_now += size
        self.batched_peak = max(self.batched_peak, self.batched_now)

    def ended(self, work: Sequence[SeqWork]) -> None:
        """A batch ended (however); ``work`` is what its worker reported per sequence (empty: nothing)."""
        size = len(work)
        self.batched_now -= size
        self.batches += 1
        self.batched_thinks += size
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.prefix_hits += sum(1 for w in work if w.kept_tokens)
        shared = max((w.shared_tokens for w in work), default=0)
        users = sum(1 for w in work if w.shared_tokens)
        self.tokens_evaluated += sum(w.own_tokens for w in work) + shared
        self.tokens_reused += sum(w.kept_tokens for w in work) + shared * max(0, users - 1)

    def remote_started(self) -> None:
        """A request to a remote server left (called from the thread that makes it)."""
        with _remote_lock:
            self.remote_now += 1
            self.remote_peak = max(self.remote_peak, self.remote_now)

    def remote_ended(self) -> None:
        """A request to a remote server ended, however (called from the thread that made it)."""
        with _remote_lock:
            self.remote_now -= 1
            self.remote_thinks += 1

    def line(self) -> str:
        """One line for the live view."""
        sizes = ", ".join(f"{n}×{size}" for size, n in sorted(self.sizes.items(), reverse=True)) or "none"
        total = self.tokens_evaluated + self.tokens_reused
        reused = f"{self.tokens_reused / total:.0%}" if total else "-"
        remote = (
            f"; remote {self.remote_now} in flight (peak {self.remote_peak}), {self.remote_thinks} done"
            if self.remote_thinks or self.remote_now
            else ""
        )
        return (
            f"thinks: {self.batched_now} thinking in batches now (peak {self.batched_peak}); "
            f"{self.batches} batches ({sizes}); prefix hits {self.prefix_hits}/{self.batched_thinks}; "
            f"prompt tokens evaluated {self.tokens_evaluated}, reused {self.tokens_reused} ({reused}){remote}"
        )
