"""Archived events: the files retention moves old events into, the same for every event log backend.

A log archives a contiguous run of its oldest events, ``first..last``, as ``events-FIRST-LAST.jsonl.gz``
(zero-padded seqs, so that names sort oldest first; one JSON event per line) under the archive
directory. The file is written under a temporary name, fsync'd and renamed (``write``) *before* the
events leave the log; they then leave it ``CHUNK`` at a time, each chunk one transaction that also moves
the log's ``archived`` mark, so that the log's writer waits for one chunk at most. A crash between two
chunks leaves the mark inside a file's range (``interrupted``): the next archive finishes removing that
file's events before it moves more. A crash before the first chunk leaves a file whose events are all
still in the log: the next archive, starting at the same seq, replaces it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from runtime.host.volume import fsync_dir

#: Events removed per transaction: the log's writer waits for one chunk at most (milliseconds), and a
#: pass of any size is many short transactions.
CHUNK = 2_000
_PREFIX, _SUFFIX = "events-", ".jsonl.gz"


def name(first: int, last: int) -> str:
    """The file name of the archive of events ``first..last``."""
    return f"{_PREFIX}{first:012d}-{last:012d}{_SUFFIX}"


def write(directory: Path, first: int, last: int, lines: list[bytes]) -> Path:
    """Write ``lines`` (the JSON of events ``first..last``) as their archive file, durably; its path. A
    file an interrupted archive left for the same first seq is replaced."""
    assert len(lines) == last - first + 1, f"invariant: {len(lines)} events for seqs {first}..{last}"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_PREFIX}{first:012d}-*"):  # a crash's copy of fewer of these events
        stale.unlink()
    path = directory / name(first, last)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(b"\n".join(lines) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
    return path


def interrupted(directory: Path, mark: int) -> int | None:
    """The last seq of the archive file whose events a crash left partly in the log (the log's
    ``archived`` mark is inside its range), or None."""
    for f in directory.glob(f"{_PREFIX}{'[0-9]' * 12}-{'[0-9]' * 12}{_SUFFIX}"):
        lo, hi = (int(x) for x in f.name[len(_PREFIX) : -len(_SUFFIX)].split("-"))
        if lo <= mark < hi:
            return hi
    return None


def chunks(first: int, last: int) -> list[tuple[int, int]]:
    """``first..last`` cut into runs of at most ``CHUNK`` seqs, in order."""
    return [(lo, min(lo + CHUNK - 1, last)) for lo in range(first, last + 1, CHUNK)]
