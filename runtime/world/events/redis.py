"""Wake-ups across nodes: Redis pub/sub announces commits, PostgreSQL says what was committed.

Each node runs one ``RedisRelay`` on its ``PostgresEventLog``. The relay is

- a ``Notifier``: after each local commit it publishes ``{"node", "first", "last"}`` (the batch's seqs)
  on the channel ``aeco:events:<namespace>``. The writer thread only records the range; a publisher
  thread sends it, coalescing ranges that pile up, so a slow or absent Redis never holds a commit
  back. Pub/sub is fire-and-forget: a publish that fails is counted (``dropped``) and not retried.
- a subscriber: on an announcement from another node of seqs beyond what this node has seen, it reads
  the new events *from PostgreSQL* (the payload is only a hint) and hands them to the log's
  ``heard``, which tells the log's followers (the node's caches) and wakes the local waiters they
  concern. Each event is handed over once: the relay keeps a high-water mark of the seqs it has dealt
  with, and skips the ones this node committed itself (their commit already told the followers and
  woke the local waiters).

Not every event is news to another node: an ``action`` event (one per turn, the commonest kind) is
addressed to the agent that acted, which only the node that committed it runs, and no cache follows
it. The relay reads every other kind (``NODE_LOCAL``): about a third of the rows in a busy world.

Messages get lost (a disconnect, a restart, Redis down for a while). The relay catches up from the log
whenever it may have missed something: once subscribed (at start and after each reconnect, which backs
off exponentially), and on a slow safety poll (``poll_s``) that compares ``last_seq`` with its mark,
so a lost message delays a wake-up by at most ``poll_s`` and never loses an event. Catching up while
no waiter is registered and nothing follows the stream just moves the mark (a waiter that registers
later reads the log itself). Once subscribed, the relay sets the log's ``relayed``: from then on every
event reaches the log's followers, which is what lets it answer some reads from memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from runtime.errors import Unavailable
from runtime.host.postgres import redact
from runtime.host.retry import GaveUp, reason, retry_transient
from runtime.world.events import Event
from runtime.world.events.postgres import PostgresEventLog

_logger = logging.getLogger("runtime.world.events")

#: Events read from the log per query while catching up, so a long outage is caught up in pages.
_PAGE = 1000
#: Kinds whose events concern only the node that committed them (see the module docstring): not read.
NODE_LOCAL = frozenset({"action"})


class RedisUnavailable(Unavailable):
    """The Redis server could not be used; the message says which URL (without its password) and why."""


class Announcement(msgspec.Struct, frozen=True):
    """What a node publishes after a commit: which node, and the seqs of the batch."""

    node: str
    first: int
    last: int


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Announcement)


def _transient(exc: redis.RedisError) -> bool:
    # A refused or timed-out connection may heal; a refused login (a ConnectionError too) will not.
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError) and not isinstance(
        exc, redis.AuthenticationError
    )


def connect(
    url: str,
    *,
    what: str = "REDIS_URL",
    deadline_s: float = 30.0,
    first_backoff_s: float = 0.1,
    client_name: str | None = None,
) -> redis.Redis:
    """A client of the Redis server at ``url`` that answered a ``PING``, retrying with back-off while
    the server refuses connections (as ``runtime.host.postgres.connect`` does for PostgreSQL).

    Raises ``RedisUnavailable`` at once for a malformed URL or a rejected login, and after
    ``deadline_s`` for a server that never answered. The client does not retry commands itself: a
    caller sees each failure and decides.
    """
    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=max(0.5, min(5.0, deadline_s)),
            socket_timeout=10.0,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name,
        )
    except ValueError as exc:
        raise RedisUnavailable(f"{what}={redact(url)!r} is malformed: {exc}") from exc

    def waiting(exc: redis.RedisError) -> None:
        _logger.warning(
            "redis: %s not reachable yet (%s); retrying for up to %g s", redact(url), reason(exc), deadline_s
        )

    try:
        retry_transient(
            client.ping,
            catch=redis.RedisError,
            is_transient=_transient,
            deadline_s=deadline_s,
            first_backoff_s=first_backoff_s,
            on_first_failure=waiting,
        )
        return client
    except redis.RedisError as exc:
        client.close()
        raise RedisUnavailable(
            f"{what}={redact(url)!r} was rejected by the server: {reason(exc)}. "
            "Check the user, password and database number in the URL."
        ) from exc
    except GaveUp as gave_up:
        client.close()
        raise RedisUnavailable(
            f"{what}={redact(url)!r}: no Redis server answered within {deadline_s:g} s "
            f"({gave_up.attempts} attempts; last: {reason(gave_up.last)}). Is the server running and reachable?"
        ) from gave_up.last


class RedisRelay:
    """Carries wake-ups between the nodes sharing one PostgreSQL event log (see the module docstring).

    ``namespace`` separates deployments (or tests) sharing one Redis server. ``poll_s`` is the safety
    poll: the longest a lost message can delay a wake-up. ``max_backoff_s`` caps the wait between
    reconnect attempts. Attaches itself to ``log``; ``close`` before closing the log.
    """

    def __init__(
        self,
        url: str,
        log: PostgresEventLog,
        *,
        namespace: str = "default",
        node: str | None = None,
        poll_s: float = 1.0,
        what: str = "REDIS_URL",
        deadline_s: float = 30.0,
        first_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, not {poll_s}")
        self.log = log
        self.channel = f"aeco:events:{namespace}"
        self.node = node or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        #: Every connection of this relay carries this name (``CLIENT LIST`` shows it).
        self.client_name = f"aeco-relay-{self.node}"[:64].replace(" ", "_")
        self._control = f"{self.channel}:stop:{self.node}"  # ``close`` wakes the subscriber through it
        self.poll_s, self._first_backoff_s, self._max_backoff_s = poll_s, first_backoff_s, max_backoff_s
        self._url = url
        self._client = connect(url, what=what, deadline_s=deadline_s, client_name=self.client_name)

        #: Announcements published, and those that failed (Redis down: fire-and-forget).
        self.published = 0
        self.dropped = 0
        #: Announcements received from other nodes.
        self.received = 0
        #: Other nodes' events handed to ``log.notice``.
        self.delivered = 0
        #: Times the subscription was lost (and re-made).
        self.disconnects = 0

        self._hw = threading.Lock()  # guards the mark, the local seqs and the pending range
        #: Every seq up to here has been dealt with: noticed, committed here, or passed with no waiter.
        self._seen = log.opened_seq
        #: Seqs above the mark committed by this node.
        self._local: set[int] = set()
        self._pending: tuple[int, int] | None = None
        self._wake = threading.Condition(self._hw)
        self._stop = threading.Event()
        self._closed = False
        #: Set while subscribed: each time a subscription is confirmed and the catch-up after it is done;
        #: cleared when it is lost.
        self.subscribed = threading.Event()

        self._publisher = threading.Thread(target=self._publish_loop, name="relay-publisher", daemon=True)
        self._subscriber = threading.Thread(target=self._subscribe_loop, name="relay-subscriber", daemon=True)
        self._publisher.start()
        self._subscriber.start()
        if not self.subscribed.wait(deadline_s):
            self.close()
            raise RedisUnavailable(f"{what}={redact(url)!r}: no subscription to {self.channel} within {deadline_s:g} s")
        log.attach(self)
        log.relayed = True

    # --------------------------------------------------------------------------- local commits

    def announce(self, events: Sequence[Event]) -> None:
        """Record this node's committed ``events`` and queue their announcement (the writer thread)."""
        if self._closed or not events:
            return
        with self._hw:
            self._local.update(ev.seq for ev in events)
            self._advance_over_local()
            first, last = events[0].seq, events[-1].seq
            if self._pending is not None:
                first = min(first, self._pending[0])
            self._pending = (first, last)
            self._wake.notify()

    def _advance_over_local(self) -> None:
        # Holding _hw: this node's own seqs right above the mark need no catching up.
        while self._seen + 1 in self._local:
            self._seen += 1
            self._local.discard(self._seen)

    def _publish_loop(self) -> None:
        backoff = self._first_backoff_s
        while True:
            with self._hw:
                while self._pending is None and not self._stop.is_set():
                    self._wake.wait()
                if self._pending is None:
                    return
                first, last = self._pending
                self._pending = None
            try:
                self._client.publish(self.channel, _enc.encode(Announcement(self.node, first, last)))
                self.published += 1
                backoff = self._first_backoff_s
            except redis.RedisError as exc:
                self.dropped += 1
                _logger.warning(
                    "relay: announcing seqs %d..%d failed (%s); other nodes catch up by polling", first, last, exc
                )
                # Not retried: later commits are announced when Redis answers again, and the others'
                # safety poll covers the gap. The pause keeps a dead server from costing a timeout per commit.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    # ------------------------------------------------------------------------- other nodes' commits

    def _subscribe_loop(self) -> None:
        backoff = self._first_backoff_s
        while not self._stop.is_set():
            pubsub = PubSub(self._client.connection_pool)
            try:
                pubsub.subscribe(self.channel, self._control)
                self._listen(pubsub)
                return  # stopped
            except Exception as exc:
                if self._stop.is_set():
                    return
                self.subscribed.clear()
                self.disconnects += 1
                # A dropped connection is expected now and then; anything else deserves its traceback.
                expected = isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError)
                _logger.warning(
                    "relay: lost the subscription to %s (%s); reconnecting in %g s",
                    self.channel,
                    exc,
                    backoff,
                    exc_info=not expected,
                )
            finally:
                pubsub.close()
            # Until Redis is back, the safety poll alone keeps the waiters of this node informed.
            end = time.monotonic() + backoff
            while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
                self._catch_up()
                self._stop.wait(min(left, self.poll_s))
            backoff = min(backoff * 2, self._max_backoff_s)

    def _listen(self, pubsub: PubSub) -> None:
        next_poll = time.monotonic() + self.poll_s
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=max(0.0, next_poll - time.monotonic()))
            if msg is None:
                pass
            elif msg["type"] == "subscribe":
                if msg["channel"] == self.channel.encode():
                    # From now on every announcement reaches us: what came before is in the log.
                    self._catch_up()
                    self.subscribed.set()
                continue
            elif msg["type"] == "message" and msg["channel"] == self.channel.encode():
                # Every announcement already waiting is taken with this one: one read covers them all.
                upto = self._heard(msg["data"])
                while (more := pubsub.get_message(timeout=0)) is not None:
                    if more["type"] == "message" and more["channel"] == self.channel.encode():
                        upto = max(upto, self._heard(more["data"]))
                if upto:
                    self._catch_up(upto if upto > 0 else None)
            if time.monotonic() >= next_poll:
                self._catch_up()
                next_poll = time.monotonic() + self.poll_s

    def _heard(self, data: bytes) -> int:
        """What an announcement calls for: the seq to catch up to (0: nothing; -1: up to the log's end)."""
        try:
            ann = _dec.decode(data)
        except msgspec.DecodeError:
            # Not ours, or from a newer version: any message may mean news, and looking is cheap.
            _logger.warning("relay: ignoring the content of an unreadable message on %s", self.channel)
            return -1
        if ann.node == self.node:
            return 0  # our own commit: it already woke our waiters
        self.received += 1
        with self._hw:
            return ann.last if ann.last > self._seen else 0

    def _catch_up(self, upto: int | None = None) -> None:
        """Hand every event after the mark that this node did not commit to ``log.heard``: up to ``upto``
        (an announced seq: committed, as is every seq below it), else up to the log's last seq."""
        try:
            last = self.log.last_seq() if upto is None else upto
            with self._hw:
                seen = self._seen
            if last <= seen:
                return
            # Read before this check, ``last`` covers everything a waiter registered after it will read itself.
            if self.log.waiting() == 0 and not self.log.followed():
                self._mark(last, ())
                return
            while seen < last:
                events = self.log.read_except(seen, NODE_LOCAL, _PAGE)
                # A short page read everything after ``seen`` that had committed, which includes ``last``.
                full = len(events) == _PAGE
                upto = events[-1].seq if full else max([last, *(ev.seq for ev in events[-1:])])
                fresh = self._mark(upto, events)
                if fresh:
                    # Counted before they are handed over: whoever a waiter's wake-up reaches sees the count.
                    self.delivered += len(fresh)
                    self.log.heard(fresh)
                seen = upto
        except Exception:
            # The database is down or restarting: the next message or poll tries again.
            _logger.exception("relay: catching up from the event log failed")

    def _mark(self, upto: int, events: Sequence[Event]) -> list[Event]:
        """Move the mark to ``upto``; return those of ``events`` not dealt with before."""
        with self._hw:
            # ``own``: an event this node committed whose announcement has not reached ``_local`` yet
            # (the read raced the writer between its COMMIT and its notifiers) is still its own.
            fresh = [ev for ev in events if ev.seq > self._seen and ev.seq not in self._local and not self.log.own(ev)]
            if upto > self._seen:
                self.log.forget_own(upto)
                self._seen = upto
                self._local = {s for s in self._local if s > upto}
                self._advance_over_local()
            return fresh

    def seen(self) -> int:
        """The high-water mark: every event up to it has been dealt with by this node."""
        with self._hw:
            return self._seen

    def close(self) -> None:
        """Stop announcing and listening (announcements not yet sent are sent first) and disconnect."""
        if self._closed:
            return
        self._closed = True
        self.log.relayed = False
        self._stop.set()
        with self._hw:
            self._wake.notify()
        self._publisher.join()
        # Wakes the subscriber out of its wait; if Redis is down, the subscriber is not waiting on it.
        with contextlib.suppress(redis.RedisError):
            self._client.publish(self._control, b"stop")
        self._subscriber.join()
        self._client.close()

    def __enter__(self) -> RedisRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
