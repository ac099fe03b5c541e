"""What confined code's root file system holds: the plan the sandbox bootstrap builds its minimal root from.

The root is a small tmpfs holding read-only binds of only what the interpreter needs, each at the
path it has on the host (so that the interpreter, its shared libraries and its standard library find
one another as they were built to, and a child the code execs finds them too):

* the interpreter binary (the real file, not the worker's virtual-environment link), its ELF program
  interpreter (``/lib64/ld-linux-x86-64.so.2``) and ``libpython`` when the build is shared;
* the system library directories (those of the C library and the platform's multiarch directories),
  where the C library and the libraries of the standard library's extension modules live, and
  ``/etc/ld.so.cache`` (how the loader finds a ``libpython`` outside them, as in the official image);
* the standard library (with ``lib-dynload``); the base interpreter's own ``site-packages`` inside it
  is covered by an empty directory (pip and friends are not the code's business);
* the symbolic links on the way to each of these (``/lib -> usr/lib`` ...), recreated in the tmpfs.

Nothing else of the host is there: no ``/etc`` (but the loader cache), no ``/home``, ``/root``, ``/var``,
``/sys``, no data directory, no worker socket, no virtual environment, no runtime source. The bootstrap
adds ``/dev`` (``null``, ``zero``, ``urandom``), a private ``/tmp`` and a ``/proc`` of the sandbox's own
PID namespace. A path the worker hides that lies inside one of the binds is covered as well.

The plan is computed once per worker process (``plan``) and sent in every job as a list of steps the
bootstrap replays under its staging directory, in order (every step's parent exists by then):

``("dir", path)``            an empty directory
``("link", path, target)``   a symbolic link, as on the host
``("bind", path)``           a read-only bind of the host's ``path`` (a file or a directory) at ``path``
``("cover", path)``          an empty read-only directory (or ``/dev/null``) over ``path``, inside a bind
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import sys
import sysconfig
from collections.abc import Iterable

__all__ = ["Step", "plan"]

Step = tuple[str, ...]
_MAX_LINKS = 40  # as the kernel's own limit on symbolic links followed in one lookup


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def elf_interpreter(path: str) -> str | None:
    """The program interpreter (``PT_INTERP``) of a 64-bit little-endian ELF executable, if it has one."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        phoff, phentsize, phnum = struct.unpack_from("<Q", head, 32)[0], *struct.unpack_from("<HH", head, 54)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
            if p_type == 3:  # PT_INTERP
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


def _mapped_libraries() -> list[str]:
    """Shared objects mapped into this process (real paths, as the kernel shows them)."""
    out: list[str] = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5]:
                out.append(parts[5].rstrip("\n"))
    return list(dict.fromkeys(out))


class _Planner:
    """Builds the steps: replicates each path's ancestors (directories and links) and binds its end."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.made: set[str] = set()
        self.bound: list[str] = []

    def _covered(self, path: str) -> bool:
        return any(_under(path, b) for b in self.bound)

    def add(self, path: str, bind: bool = True, depth: int = 0) -> None:
        """Make ``path`` (as named, links and all) resolve in the new root; bind its end if ``bind``."""
        if depth > _MAX_LINKS:
            raise OSError(f"too many symbolic links resolving {path}")
        parts = [p for p in os.path.normpath(path).split("/") if p]
        cur = ""
        for i, part in enumerate(parts):
            cur += "/" + part
            if self._covered(cur):
                return  # inside a bind already made: present as it is on the host
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                if cur not in self.made:
                    self.steps.append(("link", cur, target))
                    self.made.add(cur)
                rest = "/".join(parts[i + 1 :])
                resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
                self.add(resolved + ("/" + rest if rest else ""), bind, depth + 1)
                return
            if i == len(parts) - 1 and bind:
                self.steps.append(("bind", cur))
                self.made.add(cur)
                self.bound.append(cur)
            elif cur not in self.made:
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(f"{cur} (on the way to {path}) is not a directory")
                self.steps.append(("dir", cur))
                self.made.add(cur)

    def cover(self, paths: Iterable[str]) -> None:
        for p in paths:
            if self._covered(p) and os.path.lexists(p) and not any(_under(p, c) for _, c in self._covers()):
                self.steps.append(("cover", p))

    def _covers(self) -> list[tuple[str, str]]:
        return [(s[0], s[1]) for s in self.steps if s[0] == "cover"]


def _real_dirs(paths: Iterable[str]) -> list[str]:
    """Existing directories among ``paths``, resolved, without duplicates or nested ones."""
    real = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    return [p for p in real if not any(q != p and _under(p, q) for q in real)]


@functools.cache
def plan(hide: tuple[str, ...] = ()) -> tuple[Step, ...]:
    """The steps of this interpreter's minimal root; ``hide``: paths to cover if a bind holds them.

    Raises ``OSError`` when a path the interpreter needs cannot be resolved."""
    exe = os.path.realpath(sys.executable)
    libs = _mapped_libraries()
    libc = next((p for p in libs if os.path.basename(p).startswith("libc.so")), None)
    multiarch = getattr(sys.implementation, "_multiarch", "")
    lib_names = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else []
    lib_dirs = _real_dirs([*lib_names, *([os.path.dirname(libc)] if libc else [])])
    # The base interpreter's (a virtual environment's platstdlib is its own lib directory).
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    base |= {"installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    stdlib = _real_dirs([paths["stdlib"], paths["platstdlib"], os.path.join(paths["platstdlib"], "lib-dynload")])
    p = _Planner()
    for d in [*lib_dirs, *stdlib]:
        p.add(d)
    for name in lib_names:  # the loader's default directories, by the names it knows them
        if os.path.exists(name):
            p.add(name, bind=False)
    interp = elf_interpreter(exe)
    if interp is not None:
        p.add(interp)
    p.add(exe)
    for lib in libs:
        if os.path.basename(lib).startswith("libpython"):
            p.add(lib)
    if os.path.exists("/etc/ld.so.cache"):
        p.add("/etc/ld.so.cache")
    p.cover([os.path.join(d, "site-packages") for d in stdlib])
    p.cover(os.path.realpath(h) for h in hide)
    return tuple(p.steps)
