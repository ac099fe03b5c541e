"""A node's cache of account holdings, for the shared (PostgreSQL) ledger's reads on the event loop.

An agent's turn reads its own balances several times (its scrip for the context and the check after
thinking, ``memory_quota`` for each task, ``disk_quota`` for each write); on a shared ledger each read
would be a round trip. This cache keeps, per account, every balance as of one journal seq.

Where its entries come from, and why they stay true:

- the node's own ledger writer puts the exact balances of every account its batch touched, read under
  the ledger lock and final at the batch's last seq. Every debit of an agent is made by the node that
  runs it (transfers, prices and code's transfers are all submitted by the payer's node), so between
  its own operations an agent's balances change only by credits from elsewhere;
- a read puts what it found, with the journal seq of its snapshot;
- ``forget(account)``: a credit from elsewhere, announced by the event stream (a ``transfer`` event
  another node committed), drops the entry; the next read fetches it again;
- ``max_age_s``: an entry older than this is not used. It bounds how long a change that announces
  itself to nobody (an operator's or a tool's operation written straight to the database, a wake-up
  message lost with Redis down) stays unseen.

Invariants (asserted in ``put``): an entry's balances are the account's exact balances at the seq it
carries; an entry is never replaced by one of an older seq; an entry read or computed before a
``forget`` of its account is never put after it (``token``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Balances by asset (non-zero only).
Amounts = dict[str, int]


class HoldingsCache:
    """Per account: (journal seq, when it was put, balances). Thread-safe: the ledger's writer thread
    puts, the event loop reads, the event stream's threads forget."""

    def __init__(self, max_age_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_age_s < 0:
            raise ValueError(f"max_age_s must be >= 0, not {max_age_s}")
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, float, Amounts]] = {}
        self._forgets = 0
        self._forgotten: dict[str, int] = {}
        #: Reads answered from the cache, and those that had to ask the database.
        self.hits = 0
        self.misses = 0

    def token(self) -> int:
        """Taken before reading balances from the database: ``put`` with it is refused for an account
        forgotten meanwhile (what was read may predate the change that made it forget)."""
        with self._lock:
            return self._forgets

    def get(self, account: str) -> Amounts | None:
        """The cached balances of ``account`` if there is a fresh entry (a copy), else None."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(account)
            if entry is None or now - entry[1] > self.max_age_s:
                self.misses += 1
                return None
            self.hits += 1
            return dict(entry[2])

    def put(self, account: str, seq: int, amounts: Amounts, token: int) -> bool:
        """Keep ``amounts`` as ``account``'s balances at journal ``seq``; return whether they were kept."""
        assert all(v > 0 for v in amounts.values()), f"invariant: only positive balances are kept ({amounts})"
        now = self._clock()
        with self._lock:
            if self._forgotten.get(account, -1) >= token:
                return False
            old = self._entries.get(account)
            if old is not None and old[0] > seq:
                return False
            self._entries[account] = (seq, now, dict(amounts))
            return True

    def forget(self, account: str) -> None:
        """Drop ``account``'s entry (it changed by an operation of another node)."""
        with self._lock:
            self._entries.pop(account, None)
            self._forgotten[account] = self._forgets
            self._forgets += 1
