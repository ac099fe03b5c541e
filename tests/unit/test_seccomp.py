"""The seccomp program as data: its table against the kernel's headers, its shape, its decisions.

The decisions are checked by running the program in a small classic-BPF interpreter written here
(the instructions the builder emits: loads, equality and bit tests, returns), so that every denied
number, every argument rule and the architecture check are exercised without installing anything.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from pathlib import Path

import pytest

from workers import seccomp

ALLOW, ERRNO = 0x7FFF0000, 0x00050000
HEADERS = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "aarch64": "/usr/include/asm-generic/unistd.h"}


def run(program: bytes, nr: int, arch: int, *args: int) -> int:
    """What the filter returns for one call (a classic-BPF interpreter for what ``program`` uses)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = insns[pc]
        if op == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif op == 0x15:
            pc += jt if acc == k else jf
        elif op == 0x45:
            pc += jt if acc & k else jf
        elif op == 0x06:
            return int(k)
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        pc += 1


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHES))
def test_the_table_matches_the_kernel_headers(machine: str) -> None:
    header = Path(HEADERS[machine])
    if not header.exists():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    kernel = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text())}
    ours = seccomp.ARCHES[machine].numbers
    wrong = {n: (nr, kernel.get(n)) for n, nr in ours.items() if n in kernel and kernel[n] != nr}
    assert not wrong, wrong
    # A name the architecture has must be in our table (else the filter silently skips it there).
    assert not [n for n in seccomp.DENIED if n in kernel and n not in ours]


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHES))
def test_every_decision(machine: str) -> None:
    a = seccomp.ARCHES[machine]
    prog = seccomp.program(machine)
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
    n = a.numbers
    eperm, enosys = ERRNO | errno.EPERM, ERRNO | errno.ENOSYS
    for name, nr in seccomp.denied_numbers(machine).items():
        assert run(prog, nr, a.audit) == eperm, name
    assert run(prog, n["clone3"], a.audit) == enosys
    assert run(prog, n["clone"], a.audit, 17) == ALLOW  # fork
    assert run(prog, n["clone"], a.audit, 0x3D0F00) == ALLOW  # a thread (CLONE_VM|FS|FILES|SIGHAND|THREAD|...)
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert run(prog, n["clone"], a.audit, flag | 17) == eperm, hex(flag)
    for family, verdict in ((1, ALLOW), (2, ALLOW), (10, ALLOW), (16, eperm), (17, eperm), (38, eperm), (40, eperm)):
        assert run(prog, n["socket"], a.audit, family, 1) == verdict, family
    for persona, verdict in ((0, ALLOW), (0xFFFFFFFF, ALLOW), (0x20000, ALLOW), (0x0400000, eperm)):
        assert run(prog, n["personality"], a.audit, persona) == verdict, persona
    for cmd, verdict in ((1, ALLOW), (3, ALLOW), (5, ALLOW), (6, eperm), (7, eperm), (37, eperm), (1031, eperm)):
        assert run(prog, n["fcntl"], a.audit, 3, cmd) == verdict, cmd
    assert run(prog, n["setsockopt"], a.audit, 3, 1, 7) == eperm  # SOL_SOCKET, SO_SNDBUF
    assert run(prog, n["setsockopt"], a.audit, 3, 1, 2) == ALLOW  # SO_REUSEADDR
    assert run(prog, n["setsockopt"], a.audit, 3, 6, 7) == ALLOW  # IPPROTO_TCP, option 7
    allowed = {"read": 0 if machine == "x86_64" else 63, "getpid": 39 if machine == "x86_64" else 172}
    for name, nr in allowed.items():
        assert run(prog, nr, a.audit) == ALLOW, name
    other = 0x40000003 if machine == "x86_64" else 0xC000003E  # i386 on x86_64; x86_64 elsewhere
    assert run(prog, allowed["getpid"], other) == eperm  # another ABI's numbers: refused whatever they are
    if a.x32:
        assert run(prog, 39 | 0x40000000, a.audit) == eperm


def test_an_unknown_architecture_has_no_filter() -> None:
    with pytest.raises(ValueError, match="no seccomp system call table for 'riscv64'"):
        seccomp.program("riscv64")
    assert os.uname().machine in seccomp.ARCHES  # this host's is known
