"""A node's cache of account holdings, for the shared (PostgreSQL) ledger's reads on the event loop.

An agent's turn reads its own balances several times (its scrip for the context and the check after
thinking, ``memory_quota`` for each task, ``disk_quota`` for each write); on a shared ledger each read
would be a round trip. This cache keeps, per account, every balance as of one journal seq.

Where its entries come from, and why they stay true:

- the node's own ledger writer puts the exact balances of every account its batch touched, checked
  under the ledger lock to be what the batch read and final at the batch's last seq. Every debit of an
  agent is made by the node that runs it (transfers, prices and code's transfers are all submitted by
  the payer's node), so between its own operations an agent's balances change only by credits from
  elsewhere;
- a read puts what it found, with the journal seq of its snapshot;
- ``credit(account, asset, amount, seq)``: a credit from elsewhere, announced by the event stream (a
  ``transfer`` event another node committed, which carries the journal seq of its operation), is added
  to the entry unless the entry's seq shows it already holds it. Credits are announced once each, so
  none is counted twice; an entry with credits added is still exact as of its seq plus every credit
  after it that was announced, which is every change but this node's own (those put a newer entry);
- balances read while credits arrived (from a ``token`` taken before the read) get those credits whose
  seq is after theirs added when they are put: a credit's operation is in the balances read at a
  journal seq exactly when its own seq is not after it. (The last ``KEEP_CREDITS`` credits of an
  account are kept for this; a read older than those is not put.) With three nodes most agents are
  credited from elsewhere between two of their own operations: dropping such reads made about every
  fourth turn read its holdings again;
- ``forget(account)`` drops the entry (a change that cannot be applied: the next read fetches it);
- ``max_age_s``: an entry older than this is not used. It bounds how long a change that announces
  itself to nobody (an operator's or a tool's operation written straight to the database, a wake-up
  message lost with Redis down) stays unseen.

The rule is about the accounts of the agents this node runs, and only those are read through the
cache by the runtime (an agent's own turn, its own world calls). An account run elsewhere may be cached
too (a batch of this node touched it), but its debits, made by its own node, announce nothing here:
such an entry is only as fresh as ``max_age_s``.

Invariants (asserted in ``put``): an entry's balances are the account's exact balances at the seq it
carries plus the announced credits after that seq; an entry is never replaced by one of an older seq;
balances read or computed before a ``forget`` of their account (or before credits no longer kept) are
never put after it (``token``): they may predate the change, so the entry is dropped instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Balances by asset (non-zero only).
Amounts = dict[str, int]
#: Per account, how many of its latest credits are kept for the reads in flight (see the module docstring).
KEEP_CREDITS = 32


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
        #: Per account: the counter of its last change a read in flight cannot be given (a forget).
        self._forgotten: dict[str, int] = {}
        #: Per account: its latest credits, as (counter, asset, amount, journal seq), oldest first.
        self._credits: dict[str, list[tuple[int, str, int, int]]] = {}
        #: Reads answered from the cache, and those that had to ask the database.
        self.hits = 0
        self.misses = 0

    def token(self) -> int:
        """Taken before reading balances from the database: ``put`` with it adds the credits announced
        meanwhile that the read does not hold, and is refused for an account forgotten meanwhile (what
        was read may predate the change that made it forget)."""
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
        return self.put_all({account: amounts}, seq, token) == 1

    def put_all(self, holdings: dict[str, Amounts], seq: int, token: int) -> int:
        """``put`` for every account of ``holdings`` (all exact at journal ``seq``), under one taking of
        the lock (a ledger batch touches dozens); return how many were kept."""
        now = self._clock()
        kept = 0
        with self._lock:
            for account, amounts in holdings.items():
                assert all(v > 0 for v in amounts.values()), f"invariant: only positive balances are kept ({amounts})"
                if self._forgotten.get(account, -1) >= token:
                    # A forget came after these were read: they may miss the change, and the entry may
                    # miss what they saw. Neither can be trusted alone.
                    self._entries.pop(account, None)
                    continue
                old = self._entries.get(account)
                if old is not None and old[0] > seq:
                    continue
                held = dict(amounts)
                for counter, asset, amount, at_seq in self._credits.get(account, ()):
                    if counter >= token and at_seq > seq:  # announced during the read, and not in it
                        held[asset] = held.get(asset, 0) + amount
                self._entries[account] = (seq, now, held)
                kept += 1
        return kept

    def forget(self, account: str) -> None:
        """Drop ``account``'s entry (it changed in a way the cache cannot apply)."""
        with self._lock:
            self._entries.pop(account, None)
            self._credits.pop(account, None)
            self._forgotten[account] = self._forgets
            self._forgets += 1

    def credit(self, account: str, asset: str, amount: int, seq: int) -> None:
        """Another node's operation at journal ``seq`` gave ``account`` ``amount`` of ``asset``."""
        assert amount > 0, f"invariant: a credit is positive ({amount})"
        with self._lock:
            entry = self._entries.get(account)
            if entry is not None and entry[0] < seq:
                amounts = dict(entry[2])
                amounts[asset] = amounts.get(asset, 0) + amount
                self._entries[account] = (entry[0], entry[1], amounts)
            # Kept for the reads in flight, which may predate it (``put``).
            kept = self._credits.setdefault(account, [])
            kept.append((self._forgets, asset, amount, seq))
            self._forgets += 1
            if len(kept) > KEEP_CREDITS:
                # A read begun before the oldest credit kept can no longer be given all it missed.
                self._forgotten[account] = kept.pop(0)[0]
