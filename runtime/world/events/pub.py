"""Live observers: a ZeroMQ PUB socket that sends every committed event, and the SUB side of it.

Frames are ``[kind, msgpack Event]``: the kind leads so that an observer subscribes by kind prefix
(``"artifact_"``, ``"agent_"``) and ZeroMQ filters on the publisher's side. The socket is an XPUB (a PUB
that hears its observers' subscriptions): while nobody subscribes, events are neither encoded nor sent
(ZeroMQ would drop every one of them), which is most of a run when no observer is attached.

An observer can never slow the supervisor: sends are non-blocking, and a PUB socket that reaches an
observer's high-water mark drops that observer's messages — only that observer's, the others keep
theirs. ZeroMQ does this silently (a PUB send neither blocks nor fails at the HWM), so losses are
counted where they can be seen: an observer subscribed to every kind sees the gap in ``seq``
(``Observer.missed``), and can fetch what it missed from the log (``python -m runtime.events dump``).
The publisher counts what it sent and the sends that failed outright (``dropped``).

The observer CLI is ``python -m runtime.events tail ENDPOINT``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import zmq

from runtime.world.events import Event

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Event)
_NOBLOCK = int(zmq.NOBLOCK)
#: Plain ints: ``send_multipart`` would build a ``zmq.Flag`` (an enum) per frame.
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
#: How often the publisher looks for (un)subscriptions: a look costs tens of microseconds of the writer's
#: thread on a loaded host (ZeroMQ processes the socket's commands), and a new observer may miss the
#: events of the first moments anyway (ZeroMQ's subscriptions take a moment to arrive).
_LOOK_EVERY_S = 0.05


class EventPublisher:
    """A bound XPUB socket; a ``Notifier`` to attach to the event log (``EventLog.attach``).

    ``endpoint`` is ``ipc://PATH`` or ``tcp://HOST:PORT`` (``tcp://127.0.0.1:*`` picks a free port);
    by default an ``ipc`` socket ``events.sock`` in ``run_dir`` (a fresh private directory, removed on
    ``close``, if none is given). ``endpoint`` afterwards is the address observers connect to.
    ``hwm`` is how many events may wait for each observer before that observer starts losing them.
    """

    def __init__(self, endpoint: str | None = None, *, run_dir: str | Path | None = None, hwm: int = 1000) -> None:
        self._own_dir: str | None = None
        if endpoint is None:
            if run_dir is None:
                run_dir = self._own_dir = tempfile.mkdtemp(prefix="aeco-events-")
            # Observers on this machine may read the world's events; nobody else may connect.
            os.chmod(run_dir, 0o700)
            endpoint = f"ipc://{Path(run_dir) / 'events.sock'}"
        # A socket must not be used by two threads at once: the writer thread announces, the owner
        # closes. The lock is never contended in between.
        self._lock = threading.Lock()
        self._closed = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        #: Events handed to ZeroMQ (each observer may still have lost some at its HWM).
        self.sent = 0
        #: Events ZeroMQ refused outright (none are expected from a PUB socket; see the module doc).
        self.dropped = 0
        #: Events committed while no observer subscribed to anything: not encoded, not sent.
        self.unheard = 0
        #: The prefixes observers subscribe to: XPUB hands over the first subscription to a prefix and
        #: the last unsubscription from it (an observer that disconnects unsubscribes from all of its own).
        self._topics: set[bytes] = set()
        self._next_look = 0.0

    def _hear_subscriptions(self) -> None:
        """Take the (un)subscriptions observers sent since the last look (under ``_lock``)."""
        sock = self._sock
        while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            msg = sock.recv(_NOBLOCK)
            if msg[:1] == b"\x01":
                self._topics.add(msg[1:])
            elif msg[:1] == b"\x00":
                self._topics.discard(msg[1:])

    def announce(self, events: Sequence[Event]) -> None:
        """Send each event without blocking; called by the log's writer thread after each commit."""
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            if now >= self._next_look:
                self._next_look = now + _LOOK_EVERY_S
                self._hear_subscriptions()
            if not self._topics:  # nobody listens: ZeroMQ would drop them all
                self.unheard += len(events)
                return
            for ev in events:
                try:
                    self._sock.send(ev.kind.encode(), _MORE_NOBLOCK)
                    self._sock.send(_enc.encode(ev), _NOBLOCK)
                    self.sent += 1
                except zmq.ZMQError:  # Again, or the context going away: never the writer's problem
                    self.dropped += 1

    def close(self) -> None:
        """Close the socket (dropping what observers have not taken) and remove a private run dir."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Observer:
    """A SUB socket on an ``EventPublisher``: the events whose kind starts with one of ``prefixes``
    (``("",)``: all of them).

    ZeroMQ subscriptions take a moment to reach the publisher: events published right after
    connecting may be missed (which is what the log is for). ``hwm`` bounds what this observer
    buffers; 0 means no bound (ZeroMQ then never drops for it, at the cost of memory if it stalls).
    """

    def __init__(self, endpoint: str, prefixes: Sequence[str] = ("",), *, hwm: int = 1000) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        for p in prefixes:
            self._sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        self._everything = "" in prefixes
        #: The ``seq`` of the last event received (0 before the first).
        self.last_seq = 0
        #: Events lost between the first and the last received; counted only when subscribed to every
        #: kind (with a prefix filter a gap in ``seq`` is just another kind's event).
        self.missed = 0
        self.received = 0

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` if none came within ``timeout`` seconds (``None``: wait)."""
        if timeout is not None and not self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        _kind, payload = self._sock.recv_multipart()
        ev = _dec.decode(payload)
        if self._everything and self.last_seq and ev.seq > self.last_seq + 1:
            self.missed += ev.seq - self.last_seq - 1
        self.last_seq = max(self.last_seq, ev.seq)
        self.received += 1
        return ev

    def fileno(self) -> int:
        """A file descriptor that turns readable when events may be waiting (for ``add_reader``;
        edge-triggered: drain with ``recv(0)`` until it returns ``None``)."""
        return int(self._sock.getsockopt(zmq.FD))

    def close(self) -> None:
        """Disconnect."""
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
