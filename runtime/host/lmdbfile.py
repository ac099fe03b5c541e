"""An LMDB environment's file checked when it opens.

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
import signal
import subprocess
import sys
from pathlib import Path

import lmdb

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
