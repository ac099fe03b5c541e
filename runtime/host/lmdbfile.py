"""An LMDB environment's file checked when it opens.

LMDB keeps no checksums: a damaged meta page fails the open (``lmdb.InvalidError``), but a file cut short
opens, and the first read of a page past its end faults with SIGBUS (the map is larger than the file).
``check_length`` turns that into an error at open, naming the file, which each store handles as it
handles any damaged file (refused, or set aside and rebuilt when it is derived).
"""

from __future__ import annotations

import os
from pathlib import Path

import lmdb


def check_length(env: lmdb.Environment, path: str | Path) -> None:
    """Raise ``lmdb.CorruptedError`` when ``path/data.mdb`` is shorter than the pages its meta page says
    are in use."""
    data = Path(path) / "data.mdb"
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.stat(data).st_size
    if size < used:
        raise lmdb.CorruptedError(f"{data}: truncated: {size} bytes, but its pages in use take {used}")


def check_file(path: str | Path) -> None:
    """``check_length`` of the environment at ``path`` (if any), opened read-only for it: for an environment
    written through its map (``writemap``), whose open extends the file to the map's size with zeros,
    hiding where it was cut."""
    if not (Path(path) / "data.mdb").exists():
        return
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        check_length(env, path)
    finally:
        env.close()
