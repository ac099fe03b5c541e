"""The data volume: its size and free space (``statvfs``) and the bytes the data directory holds.

The container's storage limit needs no file of its own: with ``docker run --storage-opt size=…`` (overlay2
on XFS with project quotas, or devicemapper/btrfs/zfs) the kernel reports the quota as the filesystem's
size to ``statvfs`` inside the container, so the volume's ``total_bytes`` *is* the limit; on a bind mount
or named volume it is the host filesystem's size. A quota the filesystem does not report (``du``-based
quotas of some orchestrators) cannot be seen from inside and is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from msgspec import Struct


class Volume(Struct, frozen=True):
    """The volume the data directory is on, now."""

    #: The directory measured (the data directory).
    path: str
    #: The filesystem's size and what an unprivileged writer may still use (``f_bavail``), in bytes.
    total_bytes: int
    free_bytes: int
    #: Bytes of the files under the data directory (allocated blocks, as ``du`` counts them).
    data_bytes: int
    source: str = "statvfs of the data directory (a container's --storage-opt size= shows up as its size)"


def tree_bytes(path: Path) -> int:
    """Allocated bytes of every regular file under ``path`` (0 if it does not exist); files removed
    while it walks are skipped. Sparse LMDB maps count what they hold, not their map size."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists (a data directory not made yet is on that one's volume)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def measure(data: Path) -> Volume:
    """The volume of ``data`` (or of its nearest existing parent) and the bytes ``data`` holds."""
    st = os.statvfs(nearest_existing(data.absolute()))
    return Volume(str(data), st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, tree_bytes(data))


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
