"""Git pack files as the artifact store writes them: pure functions of a pack directory, no store state.

``write_pack`` writes a batch's objects as one pack and its index; ``to_roll_up`` picks the packs to
merge so that their sizes stay a geometric progression (as ``git repack --geometric=2``), and
``merge_packs`` merges them by copying their packed bytes. Every file is written under a temporary name,
fsync'd when ``durable``, and moved into place ``.pack`` before ``.idx`` (git and dulwich see a pack only
once its index exists), so that a crash leaves either the old packs or the new one, never half of one.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import mmap
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.objects import ObjectID
from dulwich.pack import (
    OFS_DELTA,
    REF_DELTA,
    UnpackedObject,
    load_pack_index,
    pack_object_header,
    write_pack_data,
    write_pack_index,
)

from runtime.host.volume import fsync_dir

#: zlib level of new packs: level 1 is several times faster than git's default 6 on our small objects
#: and costs little size (object ids, a large part of trees and commits, do not compress anyway).
ZLEVEL = 1
#: Files git may keep beside a pack (reverse index, bitmap …); they go when the pack goes.
_PACK_FILES = (".idx", ".pack", ".rev", ".bitmap", ".mtimes")


def write_pack(pack_dir: Path, records: Iterator[UnpackedObject], count: int, durable: bool) -> str:
    """Write ``count`` records as one pack and its index, durably, into ``pack_dir``; return its base name.

    Both files are written under temporary names and fsync'd before ``install`` moves them into place.
    The pack is named by its checksum, as git names packs.
    """
    assert count > 0, "invariant: an empty pack"
    with _NewPack(pack_dir, durable) as new:
        with new.pack.open("wb") as f:
            entries, checksum = write_pack_data(
                f.write, records, DEFAULT_OBJECT_FORMAT, num_records=count, compression_level=ZLEVEL
            )
            flush(f, durable)
        return new.finish([(sha, off, crc) for sha, (off, crc) in entries.items()], checksum)


class _NewPack:
    """The temporary files of a pack being written. ``finish`` writes the index and installs both under
    the checksum's name; on leaving, whatever was not installed is removed."""

    def __init__(self, pack_dir: Path, durable: bool) -> None:
        self.pack_dir, self.durable = pack_dir, durable
        self.pack = pack_dir / f"tmp_pack_{secrets.token_hex(8)}"
        self.idx = pack_dir / f"tmp_idx_{secrets.token_hex(8)}"

    def __enter__(self) -> _NewPack:
        return self

    def finish(self, entries: list[tuple[bytes, int, int | None]], checksum: bytes) -> str:
        """Index the written pack (``entries``: object id, offset, CRC) and install it; its base name."""
        with self.idx.open("wb") as f:
            write_pack_index(f, sorted(entries), checksum, version=2)
            flush(f, self.durable)
        base = f"pack-{checksum.hex()}"
        install(self.pack, self.idx, self.pack_dir / base, self.durable)
        return base

    def __exit__(self, *exc: object) -> None:
        for p in (self.pack, self.idx):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def install(pack: Path, idx: Path, base: Path, durable: bool) -> None:
    """Move a written pack and its index into place, read-only as git makes them: the ``.pack`` first
    (git and dulwich see a pack only once its ``.idx`` exists), then fsync the directory."""
    for tmp, suffix in ((pack, ".pack"), (idx, ".idx")):
        os.chmod(tmp, 0o444)
        os.rename(tmp, base.with_name(base.name + suffix))
    if durable:
        fsync_dir(base.parent)


def flush(f: IO[bytes], durable: bool) -> None:
    f.flush()
    if durable:
        os.fsync(f.fileno())


def to_roll_up(packs: dict[str, int], max_packs: int) -> list[str]:
    """The packs (name -> object count) to merge into one, following git's ``repack --geometric=2``: keep
    the largest packs that already form a progression (each at least twice the next smaller), roll up the
    rest; when they all do, the smallest ones, down to ``max_packs``."""
    ordered = sorted((n, base) for base, n in packs.items())
    sizes = [n for n, _ in ordered]
    i = len(sizes) - 1
    while i > 0 and sizes[i] >= 2 * sizes[i - 1]:
        i -= 1
    split = i + 1 if i > 0 else 0
    total = sum(sizes[:split])
    while split < len(sizes) and sizes[split] < 2 * total:
        total += sizes[split]
        split += 1
    if split < 2:  # already a progression: merge the smallest to stay within max_packs
        split = len(sizes) - max_packs + 1
    return [base for _, base in ordered[:split]]


def merge_packs(
    pack_dir: Path, bases: list[str], get_raw: Callable[[ObjectID], tuple[int, bytes]], durable: bool
) -> tuple[str, int]:
    """Write one pack holding every object of the packs ``bases`` once; return its name and size.

    Objects are copied as their packed bytes, without decompressing: a pack with no delta and no
    object already taken from an earlier one is copied as one block, and its index entries are
    shifted. A delta (an operator's ``git gc`` may leave some; our packs have none) is resolved
    through ``get_raw`` and written whole, so that the new pack never depends on the old ones.
    """
    trailer = DEFAULT_OBJECT_FORMAT.oid_length
    tables: list[list[tuple[int, bytes, int | None]]] = []
    for old in bases:
        idx = load_pack_index(pack_dir / f"{old}.idx", DEFAULT_OBJECT_FORMAT)
        try:
            tables.append(sorted((off, bytes(sha), crc) for sha, off, crc in idx.iterentries()))
        finally:
            idx.close()
    count = len({sha for table in tables for _, sha, _ in table})
    entries: list[tuple[bytes, int, int | None]] = []
    seen: set[bytes] = set()
    with _NewPack(pack_dir, durable) as new:
        with new.pack.open("wb") as out:
            digest = hashlib.sha1(usedforsecurity=False)

            def put(data: bytes | memoryview) -> None:
                out.write(data)
                digest.update(data)

            put(b"PACK" + struct.pack(">II", 2, count))
            pos = 12
            for old, table in zip(bases, tables, strict=True):
                path = pack_dir / f"{old}.pack"
                with path.open("rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    end_of_data = len(m) - trailer
                    types = {(m[off] >> 4) & 7 for off, _, _ in table}
                    if not (types & {OFS_DELTA, REF_DELTA}) and seen.isdisjoint(sha for _, sha, _ in table):
                        block = memoryview(m)[12:end_of_data]
                        put(block)
                        block.release()
                        entries.extend((sha, off - 12 + pos, crc) for off, sha, crc in table)
                        seen.update(sha for _, sha, _ in table)
                        pos += end_of_data - 12
                        continue
                    ends = [off for off, _, _ in table[1:]] + [end_of_data]
                    for (off, sha, crc), end in zip(table, ends, strict=True):
                        if sha in seen:
                            continue
                        seen.add(sha)
                        if (m[off] >> 4) & 7 in (OFS_DELTA, REF_DELTA):
                            real_type, raw = get_raw(ObjectID(sha.hex().encode()))
                            header = pack_object_header(real_type, None, len(raw), DEFAULT_OBJECT_FORMAT)
                            data = bytes(header) + zlib.compress(raw, ZLEVEL)
                            crc = None
                        else:
                            data = m[off:end]
                        put(data)
                        entries.append((sha, pos, crc if crc is not None else binascii.crc32(data)))
                        pos += len(data)
            checksum = digest.digest()
            out.write(checksum)
            flush(out, durable)
        assert len(entries) == count, f"invariant: merged {len(entries)} objects, expected {count}"
        return new.finish(entries, checksum), count


def remove_pack(pack_dir: Path, base: str) -> None:
    """Delete a pack, its index first (a ``.pack`` without its ``.idx`` is invisible, and cleaned up on
    open), and whatever git added beside it."""
    for suffix in _PACK_FILES:
        with contextlib.suppress(FileNotFoundError):
            (pack_dir / f"{base}{suffix}").unlink()


def idx_count(idx: Path) -> int:
    """Objects in a pack, read from its index's fan-out table (v2 has an 8-byte header, v1 none)."""
    with idx.open("rb") as f:
        head = f.read(8 + 256 * 4)
    base = 8 if head[:4] == b"\xfftOc" else 0
    count: int = struct.unpack_from(">I", head, base + 255 * 4)[0]
    return count


def damage(pack: Path) -> str | None:
    """What is wrong with a pack and its index, or None when both are whole: each file's SHA-1 trailer
    matches its bytes, the index is of this pack (it records the pack's trailer), and both count the
    same objects. Reads both files once (hashing runs at memory speed, so a start pays milliseconds
    per 100 MB of packs)."""
    idx = pack.with_suffix(".idx")
    try:
        with pack.open("rb") as pf, idx.open("rb") as xf:
            packed = _hashed(pf, "pack")
            indexed = _hashed(xf, "index")
            pf.seek(0)
            head = pf.read(12)
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except (OSError, ValueError) as exc:
        return str(exc)
    if head[:4] != b"PACK" or len(head) < 12:
        return "the pack has no PACK header"
    if indexed[-40:-20] != packed[-20:]:
        return "the index is not of this pack (it records another pack's checksum)"
    if struct.unpack_from(">I", head, 8)[0] != idx_count(idx):
        return "the pack and its index count different objects"
    return None


def _hashed(f: IO[bytes], what: str) -> bytes:
    """A Git file's last 40 bytes, once its SHA-1 trailer is checked against the bytes before it."""
    size = os.fstat(f.fileno()).st_size
    if size < 40:
        raise ValueError(f"the {what} is {size} bytes, shorter than its trailer")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
        if hashlib.sha1(view[: size - 20], usedforsecurity=False).digest() != view[size - 20 :]:
            raise ValueError(f"the {what}'s bytes do not match its SHA-1 checksum")
        return bytes(view[size - 40 :])
