"""Writer process for the artifact store's crash test.

``python -m tests.integration.store_crash_writer DIR --round N`` opens the store at ``DIR`` (with a
small ``max_packs``, so that pack roll-ups happen while it is being killed) and streams operations from
several threads, each keeping a window of them in flight so that the group commit batches them:

- creates and rewrites of ``c{N}-{t}-{k}``: the content is ``content_for(id, version)``, and every
  acknowledged one is printed as ``w <id> <version>``;
- creates of ``d{N}-{t}-{k}`` followed, once acknowledged, by their deletion, printed as ``d <id>``.

A line is printed (and flushed) only *after* its future resolved: it is a promise that the operation
is durable, which the test checks after killing this process with SIGKILL.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from runtime.world.store.git import GitStore
from tests.harness import InFlight, crash_writer_parser, die_with_parent, stream_from_threads

AGENTS = tuple(f"w{i}" for i in range(5))
QUOTA = 1 << 40


def content_for(aid: str, version: int) -> bytes:
    """The deterministic content of version ``version`` of ``aid``: ``"<id> v<version> "`` and 0 to 2,999
    pseudo-random bytes."""
    seed = hashlib.sha256(f"{aid}:{version}".encode()).digest()
    extra = int.from_bytes(seed[:2], "big") % 3000
    return f"{aid} v{version} ".encode() + (seed * (extra // 32 + 1))[:extra]


def version_of(content: bytes) -> int:
    """The version number written at the start of ``content_for``'s output."""
    return int(content.split(b" v", 1)[1].split(b" ", 1)[0])


def agent_for(aid: str) -> str:
    """The agent that writes ``aid`` (fixed per id, so rewrites are always by the owner)."""
    return AGENTS[int(hashlib.sha1(aid.encode()).hexdigest(), 16) % len(AGENTS)]


def stream(store: GitStore, rnd: int, threads: int, window: int, max_seconds: float) -> None:
    """Submit from ``threads`` threads, ``window`` in flight each; print every acknowledged operation."""

    def write(aid: str, version: int) -> Future[Any]:
        return store.submit_write(agent_for(aid), aid, content_for(aid, version), quota=QUOTA)

    def submitter(t: int) -> Callable[[InFlight], None]:
        rng = random.Random(rnd * 1000 + t)
        versions: dict[str, int] = {}
        ids = itertools.count()

        def add(inflight: InFlight) -> None:
            roll = rng.random()
            if roll < 0.1:
                aid = f"d{rnd}-{t}-{next(ids)}"
                inflight.append((f"D {aid}", write(aid, 0)))
                return
            if versions and roll < 0.4:
                aid = rng.choice(list(versions))
                versions[aid] += 1
            else:
                aid = f"c{rnd}-{t}-{next(ids)}"
                versions[aid] = 0
            v = versions[aid]
            inflight.append((f"w {aid} {v}", write(aid, v)))

        return add

    def settle(tag: str, fut: Future[Any], inflight: InFlight) -> str | None:
        fut.result()
        if tag.startswith("D "):  # created: now delete it (acknowledged as "d <id>")
            aid = tag[2:]
            inflight.append((f"d {aid}", store.submit_delete(agent_for(aid), aid)))
            return None
        return tag

    stream_from_threads(threads, window, max_seconds, submitter, settle)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and stream operations until killed (or ``--max-seconds``)."""
    ap = crash_writer_parser("tests.integration.store_crash_writer", "store's repository path", threads=3, window=32)
    ap.add_argument("--round", type=int, required=True, help="round number: ids are c{N}-*, d{N}-*")
    ap.add_argument("--max-packs", type=int, default=4)
    args = ap.parse_args(argv)
    die_with_parent()
    store = GitStore(args.dir, max_packs=args.max_packs)
    try:
        stream(store, args.round, args.threads, args.window, args.max_seconds)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
