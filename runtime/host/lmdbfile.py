"""An LMDB environment's file checked when it opens, and rewritten smaller when it is mostly free.

LMDB keeps no checksums: a damaged meta page fails the open (``lmdb.InvalidError``), but a file cut short
opens, and the first read of a page past its end faults with SIGBUS (the map is larger than the file).
``check_length`` turns that into an error at open, naming the file, which each store handles as it
handles any damaged file (refused, or set aside and rebuilt when it is derived).

The meta page's last page in use is not enough on its own: a transaction may count pages it allocated
and freed again without ever writing them, so a whole file can end a few pages short of it. When the
file is shorter, a child process reads every page the environment reaches; only if that child dies of
a signal is the file damaged. A whole file pays one ``stat``; a short one, a child's read of the file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lmdb

from runtime.host.volume import fsync_dir

#: ``shrink`` rewrites a file whose compact copy takes less than this share of it: below, the space
#: given back is worth a rewrite; above, the pages freed are reused by the next writes anyway.
SHRINK_BELOW = 0.5

#: Run by the child: every key and value of every database, which touches every page the tree reaches.
_WALK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=sys.argv[2] != "write", max_dbs=64)
with env.begin() as txn:
    names = [bytes(k) for k, _ in txn.cursor()]
    for name in names:
        try:
            db = env.open_db(name, txn=txn, create=False)
        except lmdb.Error:
            continue  # a plain key of the main database, not a named one
        for k, v in txn.cursor(db=db):
            bytes(k), bytes(v)
if sys.argv[2] == "write":  # a write reads the free list to allocate pages; it is never committed
    with env.begin(write=True) as txn:
        txn.put(b"\\0aeco-probe", b"")
        txn.abort()
"""


def check_length(env: lmdb.Environment, path: str | Path, *, strict: bool = False) -> None:
    """Raise ``lmdb.CorruptedError`` when ``path/data.mdb`` is cut short: shorter than the pages its meta
    page says are in use, and a read of every page it reaches (and of its free list, by a write that is
    not committed) faults. ``strict``: shorter is enough (an environment written through its map, whose
    file always spans the whole map)."""
    data = Path(path) / "data.mdb"
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.stat(data).st_size
    if size >= used:
        return
    if strict:
        raise lmdb.CorruptedError(f"{data}: truncated: {size} bytes, its pages in use take {used}")
    mode = "read" if env.flags().get("readonly") else "write"
    walk = subprocess.run([sys.executable, "-c", _WALK, str(path), mode], capture_output=True, timeout=600)
    if walk.returncode < 0:
        died = signal.Signals(-walk.returncode).name
        raise lmdb.CorruptedError(f"{data}: truncated: {size} bytes, its pages in use take {used} ({died} on a read)")


def check_file(path: str | Path) -> None:
    """``check_length`` of the environment at ``path`` (if any), opened read-only for it: for an environment
    written through its map (``writemap``), whose open extends the file to the map's size with zeros,
    hiding where it was cut."""
    if not (Path(path) / "data.mdb").exists():
        return
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        check_length(env, path, strict=True)
    finally:
        env.close()


def shrink(path: str | Path) -> tuple[int, int] | None:
    """Rewrite the environment at ``path`` compactly when its compact copy (``env.copy(compact=True)``)
    takes less than ``SHRINK_BELOW`` of its file: LMDB reuses the pages a deletion frees but never
    gives them back, so a file stays at its largest. Only for an environment no process has open (the
    caller holds the data directory). The copy is written beside it, fsync'd and renamed over
    ``data.mdb``: a crash leaves the old file or the new one. (bytes before, bytes after) when it was
    rewritten, else None."""
    data = Path(path) / "data.mdb"
    if not data.exists():
        return None
    before = data.stat().st_size
    tmp = data.parent.with_name(f".{data.parent.name}.shrink")
    shutil.rmtree(tmp, ignore_errors=True)  # a crash's copy
    tmp.mkdir()
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=64)
        try:
            env.copy(str(tmp), compact=True)
        finally:
            env.close()
        copy = tmp / "data.mdb"
        after = copy.stat().st_size
        if after >= before * SHRINK_BELOW:
            return None
        fd = os.open(copy, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(copy, data)
        fsync_dir(data.parent)
        return before, after
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
