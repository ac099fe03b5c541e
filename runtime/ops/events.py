"""Observer CLI: events as JSON lines.

``python -m runtime.events tail ENDPOINT [--kind PREFIX]... [--count N] [--timeout S]`` prints live
events from a supervisor's PUB socket; with no ``--kind`` it notes on stderr the events it missed
(``# missed N events before seq S``: it was too slow and its buffer filled).

``python -m runtime.events dump DIR [--since N] [--kind KIND]... [--agent A] [--limit N]`` prints
events from the durable log itself (read-only, safe while the supervisor writes), for instance what
``tail`` missed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import lmdb
import msgspec
import zmq

from runtime.errors import Parser, report
from runtime.world.events.log import EventLog
from runtime.world.events.pub import Observer

_json = msgspec.json.Encoder()


def _print(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()  # one line at a time: observers are usually piped into something live


def tail(endpoint: str, kinds: Sequence[str], count: int | None, timeout: float | None) -> int:
    """Print events until ``count`` were printed or none came for ``timeout`` seconds (or Ctrl-C)."""
    with Observer(endpoint, kinds or ("",), hwm=10_000) as obs:
        printed, missed = 0, 0
        while count is None or printed < count:
            ev = obs.recv(timeout)
            if ev is None:
                if printed:
                    return 0
                within = "" if timeout is None else f" within {timeout:g} s"
                report(f"no events from {endpoint}{within} (is a supervisor running there?)")
                return 1
            if obs.missed > missed:
                print(f"# missed {obs.missed - missed} events before seq {ev.seq}", file=sys.stderr, flush=True)
                missed = obs.missed
            _print(_json.encode(ev))
            printed += 1
    return 0


def dump(path: str, since: int, kinds: Sequence[str], agent: str | None, limit: int | None) -> int:
    """Print events from the log at ``path``."""
    log = EventLog(path, readonly=True)
    try:
        for ev in log.read(since, kinds=kinds or None, agent=agent, limit=limit):
            _print(_json.encode(ev))
    finally:
        log.close()
    return 0


def _error(line: str) -> int:
    report(line)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the subcommand."""
    ap = Parser(prog="python -m runtime.events", description="Print events as JSON lines.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tail", help="live events from a supervisor's PUB socket")
    t.add_argument("endpoint", help="e.g. ipc:///run/aeco/events.sock or tcp://127.0.0.1:5601")
    t.add_argument("--kind", action="append", default=[], help="kind prefix to subscribe to (repeatable)")
    t.add_argument("--count", type=int, default=None, help="stop after this many events")
    t.add_argument("--timeout", type=float, default=None, help="stop when no event came for this long")
    d = sub.add_parser("dump", help="events from the durable log")
    d.add_argument("dir", help="the event log's directory")
    d.add_argument("--since", type=int, default=0, help="only events with a larger seq")
    d.add_argument("--kind", action="append", default=[], help="only this kind (repeatable)")
    d.add_argument("--agent", default=None, help="only events for this agent and for everyone")
    d.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "tail" and not args.endpoint.startswith(("ipc://", "tcp://")):
        return _error(f"endpoint {args.endpoint!r}: not ipc://PATH or tcp://HOST:PORT (as the supervisor prints it)")
    if args.cmd == "dump" and not (Path(args.dir) / "data.mdb").is_file():
        return _error(f"{args.dir}: no event log there (give the `events` directory under the data_dir)")
    try:
        if args.cmd == "tail":
            return tail(args.endpoint, args.kind, args.count, args.timeout)
        return dump(args.dir, args.since, args.kind, args.agent, args.limit)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # the reader went away (``| head``): not an error of ours
        sys.stderr.close()
        return 0
    except (zmq.ZMQError, lmdb.Error, OSError) as exc:  # the endpoint or the log cannot be used as given
        return _error(f"{args.endpoint if args.cmd == 'tail' else args.dir}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
