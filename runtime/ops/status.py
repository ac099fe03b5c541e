"""``python -m runtime.status [--config FILE | --data-dir DIR] [--watch | --health MAX_AGE_S]``: what a
running supervisor shows in its live view, from another terminal (it refreshes ``<data>/run/status.json``
every ``status_interval_s``).

``--health MAX_AGE_S`` is the container's health check: exit 0 only while the supervisor that wrote the
status is alive, says it is running and refreshed it within the last ``MAX_AGE_S`` seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import msgspec

from runtime import config as config_mod
from runtime.economy.thinking import ThinkFigures
from runtime.errors import Parser, report
from runtime.host.limits import Limits, Sizing
from runtime.host.volume import Volume
from runtime.ops.ecology import EcologyFigures
from runtime.ops.stats import AgentStats, ContainerStats, Snapshot, Totals

log = logging.getLogger("runtime.ops.status")

STATUS_NAME = "status.json"


class Status(msgspec.Struct):
    """The live view as a file, for ``python -m runtime.status`` in another terminal.

    ``table`` is the rendered view; the other fields are the same facts structured, for programs:
    the container's limits and their sources, what was sized from them, and its and each agent's usage.
    """

    pid: int
    at: float
    running: bool
    table: str
    limits: Limits | None = None
    sizing: Sizing | None = None
    container: ContainerStats | None = None
    agents: list[AgentStats] = []
    totals: Totals | None = None
    ecology: EcologyFigures | None = None
    volume: Volume | None = None
    #: Batch sizes, thinks at once, prefix-cache hits, prompt tokens evaluated vs reused (``ThinkFigures``).
    thinking: ThinkFigures | None = None

    @classmethod
    def of(cls, snap: Snapshot, table: str, running: bool, ecology: EcologyFigures | None = None) -> Status:
        """This process's status now: ``snap`` and ``table`` (the live view's frame as text), with the
        economy's figures when there are some."""
        return cls(
            os.getpid(),
            time.time(),
            running,
            table,
            snap.limits,
            snap.sizing,
            snap.container,
            snap.agents,
            snap.totals,
            ecology,
            snap.volume,
            snap.thinking,
        )


def write_status(path: Path, status: Status) -> bool:
    """Replace the status file atomically (a reader never sees half of it). On a full or read-only disk
    the old file stays and the run goes on: said once in the log, and False."""
    global _unwritable
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(status))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not _unwritable:
            log.warning("the status file %s cannot be written (%s); the run goes on", path, exc.strerror)
        _unwritable = True
        return False
    _unwritable = False
    return True


#: Whether the last status write failed (its warning is not repeated every refresh).
_unwritable = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def show(path: Path) -> int:
    """Print the status once; 1 if there is none, 0 otherwise."""
    try:
        st = msgspec.json.decode(path.read_bytes(), type=Status)
    except OSError as exc:
        report(f"no status at {path}: {exc.strerror} (is a supervisor running with this data directory?)")
        return 1
    except msgspec.DecodeError as exc:
        print(f"unreadable status at {path}: {exc}", file=sys.stderr)
        return 1
    age = time.time() - st.at
    if st.running and _alive(st.pid):
        head = f"supervisor {st.pid}, running (as of {age:.1f} s ago)"
    else:
        head = f"supervisor {st.pid}, stopped ({age:.0f} s ago); its last view:"
    print(head)
    print(st.table)
    return 0


def healthy(path: Path, max_age_s: float) -> int:
    """0 if a live supervisor refreshed the status within ``max_age_s`` seconds, else 1 (and why)."""
    try:
        st = msgspec.json.decode(path.read_bytes(), type=Status)
    except (OSError, msgspec.DecodeError) as exc:
        print(f"unhealthy: no readable status at {path}: {exc}")
        return 1
    age = time.time() - st.at
    if not st.running or not _alive(st.pid):
        print(f"unhealthy: supervisor {st.pid} has stopped")
        return 1
    if age > max_age_s:
        print(f"unhealthy: supervisor {st.pid} has not refreshed its status for {age:.0f} s (limit {max_age_s:g} s)")
        return 1
    print(f"healthy: supervisor {st.pid}, status {age:.1f} s old")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = Parser(prog="python -m runtime.status", description=(__doc__ or "").splitlines()[0])
    config_mod.add_data_dir_options(ap)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    mode.add_argument(
        "--health",
        type=float,
        metavar="MAX_AGE_S",
        help="exit 0 only if a live supervisor refreshed its status within MAX_AGE_S seconds",
    )
    args = ap.parse_args(argv)
    if args.health is not None and args.health <= 0:
        ap.error(f"--health must be positive, got {args.health}")
    try:
        data = config_mod.data_dir_of(args.data_dir, args.config)
    except config_mod.ConfigError as exc:
        report(str(exc))
        return 2
    path = data / "run" / STATUS_NAME
    if args.health is not None:
        return healthy(path, args.health)
    if not args.watch:
        return show(path)
    try:
        while True:
            sys.stdout.write("\x1b[H\x1b[J")
            show(path)
            sys.stdout.flush()
            time.sleep(1)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
