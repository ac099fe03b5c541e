"""The pool's end of the wire: one ZeroMQ ROUTER socket, its frames, and the secret handshake.

Each worker holds a DEALER whose identity, and a secret, the pool handed it through an inherited pipe
(``hand_keys``). A frame is two parts, the sender's identity and one ``protocol`` message; nothing from
a peer is believed before its ``Hello`` carried that identity's secret (``proves``). Frames that are
not two parts, or do not decode, are dropped (``drop``); frames from peers that are not a worker of
this pool, or not yet proved, are refused (``refuse``); both are counted and logged a bounded number of
times, so that a flood costs counters, not log lines.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets

import msgspec
import zmq

from runtime import protocol as p
from runtime.config import PoolConfig

log = logging.getLogger("runtime.pool")
_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)  # plain ints: no enum lookups per frame
#: ``send_multipart`` would build a ``zmq.Flag`` (an enum) for each frame but the last.
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
#: Malformed frames logged before going quiet.
_DROPS_LOGGED = 20
#: Refused peers remembered so that each is logged once; past this many (a flood of made-up identities)
#: further ones are refused without a line: a bounded set, a bounded log.
_REFUSED_PEERS_MAX = 100


def hand_keys(worker_id: int) -> tuple[int, p.WorkerKeys]:
    """A new worker's identity and secret, and the read end of a pipe that holds them for it to
    inherit (see ``WorkerKeys``). The identity's random part is what makes it unguessable; its
    number only makes logs readable."""
    keys = p.WorkerKeys(identity=f"w{worker_id}-{secrets.token_hex(16)}".encode(), secret=secrets.token_bytes(32))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, msgspec.msgpack.encode(keys))  # far below a pipe's buffer: never blocks
    finally:
        os.close(write_end)
    return read_end, keys


def proves(hello: p.Hello, secret: bytes) -> bool:
    """Whether ``hello`` carries ``secret`` (compared in constant time)."""
    return hmac.compare_digest(hello.secret, secret)


class Wire:
    """The ROUTER socket workers connect to, with the counts of what it refused."""

    def __init__(self, cfg: PoolConfig, run_dir: str) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self.sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone worker fails instead of vanishing
        self.sock.setsockopt(zmq.LINGER, 0)
        if cfg.transport == "ipc":
            os.chmod(run_dir, 0o700)
            self.endpoint = f"ipc://{run_dir}/pool.sock"
            self.sock.bind(self.endpoint)
        else:
            self.sock.bind(f"tcp://{cfg.tcp_host}:*")
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.malformed_frames = 0
        #: Frames from peers that are not a worker this pool spawned and that proved it.
        self.refused_frames = 0
        self._refused_peers: set[bytes] = set()
        self._log_budget = _DROPS_LOGGED

    def fileno(self) -> int:
        """The descriptor that becomes readable when the socket's events change (edge-triggered)."""
        return int(self.sock.getsockopt(zmq.FD))

    def send(self, ident: bytes, msg: p.Message) -> None:
        """Send ``msg`` to the worker ``ident``; ``zmq.ZMQError`` if it is not connected."""
        self.sock.send(ident, _MORE_NOBLOCK)  # unreachable or full: refused here, before any frame is queued
        self.sock.send(p.encode(msg), _NOBLOCK)

    def has_input(self) -> bool:
        """A frame waits (checking EVENTS is cheaper than ending every drain on a zmq.Again)."""
        return not self.sock.closed and bool(int(self.sock.getsockopt(zmq.EVENTS)) & _POLLIN)

    def recv(self) -> list[bytes]:
        """The next frame's parts (call only after ``has_input``)."""
        return self.sock.recv_multipart(_NOBLOCK)

    def decode(self, payload: bytes, sender: str) -> p.Message | None:
        """The message in ``payload``, or None (dropped) if it is not one."""
        try:
            return p.decode(payload)
        except p.ProtocolError as exc:
            self.drop(f"from {sender}: {exc}")
            return None

    def refuse(self, ident: bytes, why: str) -> None:
        """Ignore a frame from a peer that has not proved it is one of our workers: it gets no task,
        and nothing it says is charged or counted. Logged once per peer."""
        self.refused_frames += 1
        if ident in self._refused_peers or len(self._refused_peers) >= _REFUSED_PEERS_MAX:
            return
        self._refused_peers.add(ident)
        last = len(self._refused_peers) == _REFUSED_PEERS_MAX
        log.warning("refused peer %r: %s%s", ident[:40], why, " (further peers not logged)" if last else "")

    def drop(self, why: str) -> None:
        """Count (and log, while the budget lasts) a frame that is not a well-formed message."""
        self.malformed_frames += 1
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning("dropped frame: %s%s", why, "" if self._log_budget else " (further drops not logged)")

    def close(self) -> None:
        """Close the socket (``term`` then ends the context)."""
        self.sock.close(0)

    def term(self) -> None:
        """End the ZeroMQ context (after ``close``; outside the pool's lock, as it joins its I/O thread)."""
        self.ctx.term()
