"""The seccomp filter of confined code: a classic-BPF program, built here and installed by the sandbox.

The worker builds the program once (``program()``) and hands its bytes to the sandbox bootstrap in the
job; ``sandbox_boot`` installs it with ``prctl(PR_SET_SECCOMP)`` as the very last step before the
agent's code runs (after the namespaces, the root, the keyring, the rlimits and the privilege drop, so
that none of those needs a call the filter refuses). The same bytes are what ``bwrap --seccomp`` reads,
which is how the benchmark gives bubblewrap the same policy.

Policy: a deny-list, at least as strict as the default profile of Docker/runc for the calls that
matter to a tenant on a shared host, every refusal an ``EPERM`` (never a kill: the sandbox must report,
not die):

* keyrings (``add_key``, ``request_key``, ``keyctl``): a uid's keyring is a channel between tenants;
* mounts and roots (``mount``, ``umount2``, ``pivot_root``, ``chroot``, the new mount API);
* namespaces: ``unshare``, ``setns``, and ``clone`` with any namespace flag; ``clone3`` passes its
  flags in memory, where a filter cannot read them, so it fails with ``ENOSYS`` and the C library falls
  back to ``clone`` (glibc does for ``fork``, threads and ``posix_spawn``);
* kernel attack surface and introspection: ``bpf``, ``userfaultfd``, ``perf_event_open``,
  ``io_uring_*``, ``ptrace``, ``process_vm_*``, ``kcmp``, ``pidfd_getfd``, ``process_madvise``,
  ``kexec_*``, module loading, ``open_by_handle_at``/``name_to_handle_at``, ``swapon``/``swapoff``,
  ``reboot``, ``quotactl``, ``acct``, clock setting, ``syslog``, ``iopl``/``ioperm``, NUMA policy,
  ``fanotify_init`` and the obsolete calls Docker also refuses;
* memory the sandbox could neither bound nor measure without a cgroup: ``memfd_create``,
  ``memfd_secret``, SysV ``shmget``/``msgget``, ``fcntl(F_SETPIPE_SZ)`` (pipes keep their 64 KiB) and
  ``setsockopt`` of ``SO_SNDBUF``/``SO_RCVBUF`` (sockets keep the default buffers);
* channels through shared host files: ``flock``, ``fcntl`` record locks and leases (a lock on a
  read-only library file is still a lock on the host's inode), and ``inotify`` (watching who opens a
  shared file);
* ``socket`` of any family but ``AF_UNIX``, ``AF_INET``, ``AF_INET6`` (``AF_VSOCK`` reaches the
  hypervisor whatever the network namespace; ``AF_ALG``, ``AF_PACKET``... are attack surface);
* ``personality`` other than the values Docker allows (querying, ``UNAME26``, no-ASLR);
* any call of another architecture (``int 0x80`` from x86-64 uses the i386 numbers) or of the x32 ABI.

Everything else is allowed: the confined code is an ordinary unprivileged Python program.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ARCHES", "DENIED", "Arch", "arch", "denied_numbers", "program"]

#: Calls refused outright (``EPERM``), by name; a name an architecture lacks is skipped there.
DENIED: tuple[str, ...] = (
    # keyrings
    "add_key",
    "request_key",
    "keyctl",
    # mounts and roots
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # namespaces (clone and clone3: see _checked)
    "unshare",
    "setns",
    # kernel attack surface, other processes, the machine
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "quotactl",
    "quotactl_fd",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "afs_syscall",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "move_pages",
    "migrate_pages",
    "fanotify_init",
    # memory no rlimit bounds
    "memfd_create",
    "memfd_secret",
    "shmget",
    "msgget",
    # channels through shared host files
    "flock",
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
)

#: ``clone`` flags that make namespaces (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET):
#: the mask of Docker's profile.
CLONE_NAMESPACES = 0x7E020000
#: ``personality`` values allowed: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE, both, and the query.
PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)
#: ``socket`` families allowed: AF_UNIX, AF_INET, AF_INET6.
FAMILIES = (1, 2, 10)
#: ``fcntl`` commands refused: F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE, F_SETPIPE_SZ.
FCNTL_REFUSED = (6, 7, 37, 38, 1024, 1031)
#: ``setsockopt(SOL_SOCKET, ...)`` options refused: SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE.
SOL_SOCKET = 1
SOCKOPT_REFUSED = (7, 8, 32, 33)


@dataclass(frozen=True)
class Arch:
    """One architecture: its audit number, whether it has the x32 ABI to refuse, its call numbers."""

    name: str
    audit: int
    x32: bool
    numbers: dict[str, int]


# name: (x86-64, the generic table), None where the architecture has no such call. x86-64 from the kernel's
# arch/x86/entry/syscalls/syscall_64.tbl (Linux UAPI asm/unistd_64.h); the generic one (arm64 and the other
# new architectures) from include/uapi/asm-generic/unistd.h. One row per call, so none is listed for one
# architecture and forgotten for the other.
_NUMBERS: dict[str, tuple[int | None, int | None]] = {
    # keys
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    # mounts and roots
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51), "move_mount": (429, 429),
    "open_tree": (428, 428), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442),
    # namespaces
    "unshare": (272, 97), "setns": (308, 268),
    # kernel interfaces an escape starts from
    "bpf": (321, 280), "userfaultfd": (323, 282), "perf_event_open": (298, 241), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    # other processes
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "pidfd_getfd": (438, 438), "process_madvise": (440, 440),
    # kernels and modules
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "create_module": (174, None), "get_kernel_syms": (177, None),
    "query_module": (178, None),
    # file handles
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    # the machine
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "acct": (163, 89), "settimeofday": (164, 170), "clock_settime": (227, 112),
    "clock_adjtime": (305, 266), "syslog": (103, 116), "vhangup": (153, 58), "iopl": (172, None),
    "ioperm": (173, None),
    # old or obscure
    "lookup_dcookie": (212, 18), "nfsservctl": (180, 42), "uselib": (134, None), "ustat": (136, None),
    "sysfs": (139, None), "_sysctl": (156, None), "afs_syscall": (183, None), "personality": (135, 92),
    # memory policy and anonymous memory
    "mbind": (237, 235), "set_mempolicy": (238, 237), "get_mempolicy": (239, 236), "move_pages": (279, 239),
    "migrate_pages": (256, 238), "memfd_create": (319, 279), "memfd_secret": (447, 447),
    # System V IPC, locks, notifications
    "shmget": (29, 194), "msgget": (68, 186), "flock": (73, 32), "fanotify_init": (300, 262),
    "inotify_init": (253, None), "inotify_init1": (294, 26), "inotify_add_watch": (254, 27),
    # processes, sockets and descriptors (their arguments are checked)
    "clone": (56, 220), "clone3": (435, 435), "socket": (41, 198), "fcntl": (72, 25), "setsockopt": (54, 208),
}  # fmt: skip


def _table(column: int) -> dict[str, int]:
    """One architecture's column of ``_NUMBERS``: the calls it has, by name."""
    return {name: nr for name, pair in _NUMBERS.items() if (nr := pair[column]) is not None}


#: By ``os.uname().machine``. Both are little-endian, which the argument offsets below assume.
ARCHES: dict[str, Arch] = {
    "x86_64": Arch("x86_64", 0xC000003E, True, _table(0)),
    "aarch64": Arch("aarch64", 0xC00000B7, False, _table(1)),
}

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = 32-bit word of seccomp_data at k
_JEQ, _JSET, _RET = 0x15, 0x45, 0x06  # BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JSET|BPF_K, BPF_RET|BPF_K
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_X32_BIT = 0x40000000
# Offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}: the low word of an argument
# (all the arguments tested are ints, or flags in the low word) on a little-endian machine.
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    return 16 + 8 * i


def arch(machine: str | None = None) -> Arch:
    """The architecture of this machine (or ``machine``); ``ValueError`` when the filter has no table for it."""
    name = machine or os.uname().machine
    try:
        return ARCHES[name]
    except KeyError:
        raise ValueError(f"no seccomp system call table for {name!r} (known: {sorted(ARCHES)})") from None


def denied_numbers(machine: str | None = None) -> dict[str, int]:
    """The calls refused outright on this architecture, by name."""
    a = arch(machine)
    return {name: a.numbers[name] for name in DENIED if name in a.numbers}


class _Program:
    """A tiny assembler: instructions with symbolic jump targets, resolved into forward offsets."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((_LD_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: int | str, false: int | str) -> None:
        """``true``/``false``: a label, or 0 for the next instruction."""
        self.code.append((op, true, false, k))

    def ret(self, value: int) -> None:
        self.code.append((_RET, 0, 0, value))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (op, jt, jf, k) in enumerate(self.code):
            offsets = [self.labels[t] - i - 1 if isinstance(t, str) else t for t in (jt, jf)]
            assert all(0 <= o <= 255 for o in offsets), f"instruction {i}: jump out of reach {offsets}"
            out += struct.pack("=HBBI", op, offsets[0], offsets[1], k)
        return bytes(out)


def _one_of(p: _Program, values: Sequence[int], match: str, otherwise: str) -> None:
    """Jump to ``match`` when A is one of ``values``, else to ``otherwise``."""
    for v in values[:-1]:
        p.jump(_JEQ, v, match, 0)
    p.jump(_JEQ, values[-1], match, otherwise)


@functools.cache
def program(machine: str | None = None) -> bytes:
    """The filter for this machine's architecture, as an array of ``struct sock_filter`` (8 bytes each)."""
    assert sys.byteorder == "little", "argument offsets assume a little-endian seccomp_data"
    a = arch(machine)
    n = a.numbers
    p = _Program()
    p.load(_ARCH)
    p.jump(_JEQ, a.audit, 0, "eperm")  # another ABI's numbers mean other calls: refuse them all
    p.load(_NR)
    if a.x32:
        p.jump(_JSET, _X32_BIT, "eperm", 0)
    for nr in sorted(set(denied_numbers(machine).values())):
        p.jump(_JEQ, nr, "eperm", 0)
    p.jump(_JEQ, n["clone3"], "enosys", 0)
    for name in ("clone", "personality", "socket", "fcntl", "setsockopt"):
        p.jump(_JEQ, n[name], name, 0)
    p.ret(_ALLOW)

    p.label("clone")  # clone(flags, ...): no namespace flag
    p.load(_arg(0))
    p.jump(_JSET, CLONE_NAMESPACES, "eperm", "allow")
    p.label("personality")
    p.load(_arg(0))
    _one_of(p, PERSONALITIES, "allow", "eperm")
    p.label("socket")  # socket(family, ...)
    p.load(_arg(0))
    _one_of(p, FAMILIES, "allow", "eperm")
    p.label("fcntl")  # fcntl(fd, cmd, ...)
    p.load(_arg(1))
    _one_of(p, FCNTL_REFUSED, "eperm", "allow")
    p.label("setsockopt")  # setsockopt(fd, level, optname, ...)
    p.load(_arg(1))
    p.jump(_JEQ, SOL_SOCKET, 0, "allow")
    p.load(_arg(2))
    _one_of(p, SOCKOPT_REFUSED, "eperm", "allow")

    p.label("allow")
    p.ret(_ALLOW)
    p.label("eperm")
    p.ret(_ERRNO | errno.EPERM)
    p.label("enosys")
    p.ret(_ERRNO | errno.ENOSYS)
    return p.assemble()
