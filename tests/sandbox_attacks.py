"""Attacks on confined code through the real path: an agent writes a code artifact, another invokes it.

``run(data_dir, params)`` builds a world in miniature (``runtime.node.Node``: an LMDB ledger, a Git
store, a worker pool whose workers run agent code confined) and plays every attack in ``ATTACKS`` through
``World.invoke_artifact``: mallory writes the artifact, bob (who owns a private diary and has a
128 MiB memory quota) invokes it, or mallory invokes it herself. After each attack bob invokes a
trivial artifact (the pool must serve it), the driver checks that nothing of the sandbox is left
under the workers, and it records what the invocation returned, what the ledger charged for it and
each worker's tally of tasks begun against the tasks it answered (``runtime.host.tally``).
At the end it checks the ledger's invariants (``runtime.ledger.check``); the caller runs
``git fsck --strict`` on the store and asserts on the report (``verify``).

The same file runs three ways: in the test process (a root worker with cgroups), as a script run by
another user (a non-root worker without cgroups), and inside the image (``tests/container``, copied
there: it needs only the runtime and the standard library)::

    python sandbox_attacks.py DATA_DIR PARAMS_JSON > report.json

``PARAMS_JSON`` holds the system call numbers to try (``syscall_params``), read by the host from the
kernel's own headers: a number the sandbox's table got wrong is then a failure, not a blind spot.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.ledger import Ledger
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.node import Node
from runtime.pool import WorkerPool
from runtime.world.world import InvokeError, World

QUOTA_MB = 128
MiB = 1 << 20
#: The diary bob owns (readable by him only): what a thief would carry across invocations.
DIARY = b"bob's diary: the combination is 4-8-15-16-23-42"

# --- the attacks -----------------------------------------------------------------------------------

SYSCALLS = r"""
import ctypes, errno, mmap, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
me = os.getpid()
p = world.args

def call(nr, *args):
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if ret == 0 and os.getpid() != me:  # a clone that went through: its child leaves at once
        os._exit(0)
    e = ctypes.get_errno()
    return [ret, errno.errorcode.get(e, str(e)) if ret < 0 else ""]

# Arguments that fail harmlessly (null pointers, bad fds, no-op flags) should a call get through.
out = {"denied": {n: call(nr, *p["args"].get(n, [0] * 6)) for n, nr in p["denied"].items()}}
nr = p["numbers"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
big = struct.pack("i", 1 << 20)
buf = ctypes.create_string_buffer(big)
out["filtered"] = {
    **{f"clone {flag:#x}": call(nr["clone"], flag | 17, 0, 0, 0, 0) for flag in p["clone_flags"]},
    "clone3": call(nr["clone3"], 0, 0),
    **{f"socket {fam}": call(nr["socket"], fam, kind, 0) for fam, kind in p["families"]},
    "personality READ_IMPLIES_EXEC": call(nr["personality"], 0x0400000),
    **{f"fcntl {cmd}": call(nr["fcntl"], s.fileno(), cmd, 0) for cmd in p["fcntl"]},
    **{f"setsockopt {o}": call(nr["setsockopt"], s.fileno(), 1, o, ctypes.addressof(buf), 4) for o in p["sockopts"]},
}
if p["x32"]:
    out["filtered"]["x32 getpid"] = call(nr["getpid"] | 0x40000000)
out["allowed"] = {
    "getpid": call(nr["getpid"]),
    "socket AF_UNIX": call(nr["socket"], 1, 1, 0),
    "personality query": call(nr["personality"], 0xFFFFFFFF),
    "fcntl F_GETFD": call(nr["fcntl"], s.fileno(), 1, 0),
    "setsockopt SO_REUSEADDR": call(nr["setsockopt"], s.fileno(), 1, 2, ctypes.addressof(buf), 4),
}
pid = os.fork()  # clone without namespace flags
if pid == 0:
    os._exit(7)
out["allowed"]["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
import threading  # glibc makes threads with clone3 first: ENOSYS sends it to clone
t = threading.Thread(target=lambda: None)
t.start()
t.join()
out["allowed"]["thread"] = "ok"
if p["x32"]:
    # The i386 ABI through int 0x80: getpid is 20 there. The filter's architecture check answers
    # -EPERM (-1 in eax); without a filter the pid comes back; without IA-32 emulation it faults.
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(w, str(fn()).encode())
        os._exit(0)
    os.close(w)
    got = os.read(r, 64)
    status = os.waitpid(child, 0)[1]
    out["i386 getpid"] = int(got) if got else f"died: {os.waitstatus_to_exitcode(status)}"
status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
out["seccomp_status"] = [l.split()[1] for l in status.splitlines() if l.startswith("Seccomp:")]
result = out
"""

KEYRINGS = r"""
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
nr = world.args
KEYRINGS = {"thread": -1, "process": -2, "session": -3, "user": -4, "user-session": -5}

def call(n, *args):
    ret = libc.syscall(ctypes.c_long(n), *args)
    return [ret, errno.errorcode.get(ctypes.get_errno(), "") if ret < 0 else ""]

out = {}
if nr["steal"]:
    diary = nr["secret"].encode() if "secret" in nr else world.read_artifact("diary")
    out["read"] = len(diary)
    for name, ring in KEYRINGS.items():
        out[f"add_key {name}"] = call(nr["add_key"], b"user", f"loot-{name}".encode(), diary,
                                      ctypes.c_size_t(len(diary)), ctypes.c_long(ring))
    out["join loot-ring"] = call(nr["keyctl"], ctypes.c_long(1), b"loot-ring")  # KEYCTL_JOIN_SESSION_KEYRING
    out["add_key loot-ring"] = call(nr["add_key"], b"user", b"loot", diary, ctypes.c_size_t(len(diary)),
                                    ctypes.c_long(-3))
else:
    found = {}
    buf = ctypes.create_string_buffer(4096)
    for name, ring in KEYRINGS.items():
        for desc in (f"loot-{name}", "loot"):
            key = call(nr["keyctl"], ctypes.c_long(10), ctypes.c_long(ring), b"user", desc.encode(), ctypes.c_long(0))
            found[f"search {name} {desc}"] = key
            if key[0] > 0:  # KEYCTL_READ
                n = libc.syscall(ctypes.c_long(nr["keyctl"]), ctypes.c_long(11), ctypes.c_long(key[0]), buf,
                                 ctypes.c_long(4096))
                found[f"read {name} {desc}"] = buf.raw[: max(n, 0)].decode("latin1")
    found["request_key"] = call(nr["request_key"], b"user", b"loot-user", None, ctypes.c_long(0))
    found["join loot-ring"] = call(nr["keyctl"], ctypes.c_long(1), b"loot-ring")  # finds a named one left behind
    try:
        found["/proc/keys"] = open("/proc/keys").read()
    except OSError as exc:
        found["/proc/keys"] = type(exc).__name__
    out = found
result = out
"""

SCAN = r"""
import fcntl, os, struct, sys
a = world.args
out = {"root": sorted(os.listdir("/")), "sys": os.path.exists("/sys"), "dev": sorted(os.listdir("/dev")),
       "proc": sorted(os.listdir("/proc")) if os.path.isdir("/proc") else None, "hostname": os.uname().nodename}
texts = {}

def grab(path):
    try:
        with open(path, "rb") as f:
            texts[path] = f.read(1 << 20).decode("latin1")
    except OSError as exc:
        texts[path] = type(exc).__name__

pids = [p for p in out["proc"] or [] if p.isdigit()]
for pid in [*pids, "self", "thread-self"]:
    for name in ("cmdline", "environ", "mountinfo", "mounts", "cgroup", "status", "maps", "stat", "cpuset",
                 "net/unix", "net/tcp", "net/dev", "sched", "attr/current", "task"):
        grab(f"/proc/{pid}/{name}")
for top, dirs, files in os.walk("/", topdown=True):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in a["skip_walk"]]
    texts[top + " (listing)"] = "\n".join(dirs + files)
out["hits"] = {n: sorted(p for p, t in texts.items() if n in t) for n in a["needles"]}
out["mountinfo"] = texts.get("/proc/self/mountinfo", "")
out["cgroup"] = texts.get("/proc/self/cgroup", "")
locks = {}
for path in a["lock"]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        locks[path] = [type(exc).__name__]
        continue
    got = []
    for what, how in (("flock", lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)),
                      ("lockf", lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)),
                      ("ofd", lambda: fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0) + bytes(4)))):
        try:
            how()
            got.append(f"{what}: locked")
        except OSError as exc:
            got.append(f"{what}: {type(exc).__name__}")
    locks[path] = got
out["locks"] = locks
result = out
"""

MEMFD = r"""
import os
held, stop = 0, ""
try:
    for i in range(4):  # 4 x 96 MiB: three quotas
        fd = os.memfd_create(f"hoard{i}")
        for _ in range(96):
            held += os.write(fd, b"m" * (1 << 20))
except OSError as exc:
    stop = f"{type(exc).__name__}: {exc}"
result = {"held": held, "stop": stop}
"""

SHM = r"""
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
held, stop = 0, ""
for i in range(4):
    sid = libc.shmget(0, ctypes.c_size_t(96 << 20), 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if sid < 0:
        stop = errno.errorcode[ctypes.get_errno()]
        break
    addr = libc.shmat(sid, None, 0)
    ctypes.memset(addr, 1, 96 << 20)
    held += 96 << 20
result = {"held": held, "stop": stop}
"""

TMPFS = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
held, stop = 0, ""
if libc.unshare(0x10000000 | 0x20000) != 0:  # a user and mount namespace of its own, to mount in
    stop = "unshare: " + errno.errorcode[ctypes.get_errno()]
elif libc.mount(b"tmpfs", b"/tmp/work", b"tmpfs", 0, b"size=1g") != 0:
    stop = "mount: " + errno.errorcode[ctypes.get_errno()]
else:
    with open("/tmp/work/hoard", "wb") as f:
        for _ in range(384):
            held += f.write(b"t" * (1 << 20))
result = {"held": held, "stop": stop}
"""

TMP_FILES = r"""
import os
held, stop = 0, ""
try:
    for i in range(24):  # 24 x 16 MiB = 384 MiB: three quotas, in the sandbox's own /tmp
        with open(f"/tmp/work/hoard{i}", "wb") as f:
            for _ in range(16):
                held += f.write(b"f" * (1 << 20))
except OSError as exc:
    stop = f"{type(exc).__name__}: {exc}"
result = {"held": held, "stop": stop}
"""

SOCKET_BUFFERS = r"""
import array, socket
held, stop, pairs, flying = 0, "", [], 0

def fill(sock):
    n = 0
    sock.setblocking(False)
    try:
        while True:
            n += sock.send(b"s" * 65536)
    except OSError:
        return n

try:
    carrier = socket.socketpair()
    while held < 384 << 20:  # three quotas
        a, b = socket.socketpair()
        held += fill(a)
        try:  # put both ends in flight (closed here, alive in the carrier's queue) to make room
            fds = array.array("i", [a.fileno(), b.fileno()])
            carrier[0].sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            a.close()
            b.close()
            flying += 2
        except OSError:
            pairs.append((a, b))
except OSError as exc:
    stop = f"{type(exc).__name__}: {exc}"
result = {"held": held, "stop": stop, "open_pairs": len(pairs), "in_flight": flying}
"""

PIPES = r"""
import fcntl, os
held, stop, pipes = 0, "", []
try:
    while held < 384 << 20:
        r, w = os.pipe()
        pipes.append((r, w))
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: a megabyte per pipe
        except OSError as exc:
            stop = f"F_SETPIPE_SZ: {type(exc).__name__}"
        os.set_blocking(w, False)
        try:
            while True:
                held += os.write(w, b"p" * 65536)
        except BlockingIOError:
            pass
except OSError as exc:
    stop += f"; {type(exc).__name__}: {exc}"
result = {"held": held, "stop": stop, "pipes": len(pipes)}
"""

PROCESSES = r"""
import os, time
kids = []
for i in range(4):  # 4 x 96 MiB of touched memory, each process well within its RLIMIT_AS
    pid = os.fork()
    if pid == 0:
        hoard = bytearray(96 << 20)
        hoard[::4096] = b"x" * len(hoard[::4096])
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
result = "all held"
"""

ALLOCATE_100 = r"""
hoard = bytearray(100 << 20)
hoard[::4096] = b"x" * len(hoard[::4096])
result = len(hoard)
"""


TALLY = r"""
import os
# The worker counts the tasks it begins in a shared page (a memfd named aeco-tally): look for it, or
# any memory file, wherever /proc shows one (open files, mapped files, maps), and forge its count if
# found. Only the tally is written: were this ever to run unconfined, other processes' memory files
# (an Erlang VM keeps its heap in some) must not be scribbled on.
found, written = [], []
pids = [p for p in os.listdir("/proc") if p.isdigit()] + ["self"] if os.path.isdir("/proc") else []
for pid in pids:
    for d in ("fd", "map_files"):
        try:
            names = os.listdir(f"/proc/{pid}/{d}")
        except OSError:
            continue
        for n in names:
            path = f"/proc/{pid}/{d}/{n}"
            try:
                target = os.readlink(path)
            except OSError:
                continue
            if "memfd:" in target:
                found.append(f"{path} -> {target}")
            if "aeco-tally" in target:
                try:
                    fd = os.open(path, os.O_RDWR)
                    os.pwrite(fd, (1 << 40).to_bytes(8, "little"), 0)
                    written.append(path)
                except OSError:
                    pass
    try:
        with open(f"/proc/{pid}/maps") as f:
            found += [f"/proc/{pid}/maps: {line}" for line in f if "memfd:" in line]
    except OSError:
        pass
result = {"pids": len(pids), "found": found, "written": written}
"""


def _forged(value: bytes) -> str:
    """Code that writes its own ``done`` frame with ``value`` as the result, then leaves."""
    frame = b'{"op":"done","ok":true,"value":' + value + b"}"
    return f"import os\nframe = {frame!r}\nos.write(3, len(frame).to_bytes(4, 'big') + frame)\nos._exit(0)\n"


#: Malformed results: each must be the code's ``code_error``, saying why.
RESULTS = {
    "invalid UTF-8": _forged(b'"\xff\xfe"'),
    "1e999": _forged(b"1e999"),
    "NaN": _forged(b"NaN"),
    "int 2**70 forged": _forged(str(1 << 70).encode()),
    "int 2**70": "world.result(2 ** 70)",
    "inf": "world.result(float('inf'))",
    "deep nesting": _forged(b"[" * 100_000 + b"]" * 100_000),
}

#: name -> (code, who invokes it, arguments: a key of the session's ``args``)
ATTACKS: dict[str, tuple[str, str, str]] = {
    "syscalls": (SYSCALLS, "bob", "syscalls"),
    "keyring stash": (KEYRINGS, "bob", "steal"),
    "keyring fetch": (KEYRINGS, "mallory", "fetch"),
    "scan": (SCAN, "bob", "scan"),
    "memfd": (MEMFD, "bob", ""),
    "sysv shm": (SHM, "bob", ""),
    "tmpfs": (TMPFS, "bob", ""),
    "tmp files": (TMP_FILES, "bob", ""),
    "socket buffers": (SOCKET_BUFFERS, "bob", ""),
    "pipes": (PIPES, "bob", ""),
    "processes": (PROCESSES, "bob", ""),
    "task tally": (TALLY, "mallory", ""),
    "allocate 100 MiB": (ALLOCATE_100, "bob", ""),
    **{f"result {name}": (code, "bob", "") for name, code in RESULTS.items()},
}

# --- the session -----------------------------------------------------------------------------------


def _agent(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "workload": [{"kind": "echo"}], "cpu_rate": 300, **kw}, AgentConfig)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def _sandbox_cgroups(pid: int) -> list[str]:
    """Per-invocation cgroups (``sbx-*``) left under a worker's own v1 cgroups."""
    left: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                d = Path("/sys/fs/cgroup") / (c or "unified") / path.lstrip("/")
                with contextlib.suppress(OSError):
                    left += [str(x) for x in d.iterdir() if x.name.startswith("sbx-")]
    return left


async def _leftovers(workers: list[int]) -> list[str]:
    """What is left of the sandbox under the workers (processes, cgroups) after a short grace."""
    left: list[str] = []
    for _ in range(50):
        # A worker's only child is the sandbox's zygote; what the zygote forks must be gone.
        left = [f"process {o} under worker {w}" for w in workers for z in _children(w) for o in _children(z)]
        left += [f"worker {w} has {len(_children(w))} children" for w in workers if len(_children(w)) > 1]
        left += [f"cgroup {d}" for w in workers for d in _sandbox_cgroups(w)]
        if not left:
            return []
        await asyncio.sleep(0.05)
    return left


def _libc_path() -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if re.search(r"/libc\.so\.6$", path):
            return path
    raise RuntimeError("no libc in this process's maps")


def _hold_locks(paths: list[str]) -> list[int]:
    """Exclusive locks on host files (a host process holding them, as the issue's victim did)."""
    fds = []
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fds.append(fd)
    return fds


async def _session(data: Path, params: dict[str, Any]) -> dict[str, Any]:
    cfg = Config(
        data_dir=str(data),
        pool=PoolConfig(workers=2),
        economy=EconomyConfig(burst_seconds=600),
        agents=[_agent("bob", scrip=100, memory_quota_mb=QUOTA_MB), _agent("mallory", memory_quota_mb=QUOTA_MB)],
    )
    report: dict[str, Any] = {"attacks": {}}
    async with Node(cfg) as node:
        world, pool, ledger = node.world, node.pool, node.backends.ledger
        await world.write_artifact("bob", "diary", DIARY, readable="owner")
        await world.write_artifact("bob", "ok", b"world.result(1)", kind="code")
        workers = [int(w["pid"]) for w in pool.status().workers]
        report["cgroups"] = pool.status().cgroups  # how the pool's workers are measured
        report["hostname"] = os.uname().nodename  # the workers' own (a container's, in the image)
        lock = [os.path.realpath(sys.executable), os.__file__, "/dev/null", "/etc/ld.so.cache", _libc_path()]
        lock.append("/etc/os-release")  # the victim: not in the root at all
        # Host paths the code must find nowhere: the data directory, the pool's socket directory,
        # the tests' own directory (the repository, or /config in the image), this process's cwd.
        sock_dir = os.path.dirname(pool.endpoint.removeprefix("ipc://"))
        needles = [str(data), sock_dir, str(Path(__file__).resolve().parent), os.getcwd()]
        needles = [n for n in needles if n not in ("", "/")]
        args: dict[str, Any] = {
            "": None,
            "syscalls": params,
            "steal": {**params["numbers"], "steal": True},
            "fetch": {**params["numbers"], "steal": False},
            "scan": {"needles": needles, "lock": lock, "skip_walk": params["skip_walk"]},
        }
        for name, (code, invoker, arg) in ATTACKS.items():
            report["attacks"][name] = await _attack(world, ledger, pool, workers, name, code, invoker, args[arg], lock)
        report["workers_after"] = [int(w["pid"]) for w in pool.status().workers]
        report["workers_before"] = workers
        report["pool_failed"] = str(pool.failed) if pool.failed else ""
    with LmdbLedger(data / "ledger") as closed:
        result = check(closed)
        report["check"] = {"ok": result.ok, "problems": result.problems, "usage_records": result.usage_records}
    return report


async def _attack(
    world: World,
    ledger: Ledger,
    pool: WorkerPool,
    workers: list[int],
    name: str,
    code: str,
    invoker: str,
    args: Any,
    lock: list[str],
) -> dict[str, Any]:
    aid = "attack-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    await world.write_artifact("mallory", aid, code.encode(), kind="code")
    before = {r.task_id for r in ledger.usage_records()}
    held = _hold_locks(lock) if name == "scan" else []
    out: dict[str, Any] = {"invoker": invoker}
    started = time.monotonic()
    try:
        inv = await world.invoke_artifact(invoker, aid, args, cpu_seconds=10, wall_seconds=30)
        out.update(ok=True, code="", error="", value=inv.value)
    except InvokeError as exc:
        out.update(ok=False, code=exc.code, error=str(exc)[:4000], value=None)
    finally:
        for fd in held:
            os.close(fd)
    out["wall"] = time.monotonic() - started
    new = [r for r in ledger.usage_records() if r.task_id not in before]
    out["charged"] = [{"agent": r.agent, "kind": r.kind, "cpu": r.cpu_seconds, "memory": r.memory_bytes} for r in new]
    out["leftovers"] = await _leftovers(workers)
    # Every live worker is idle: each task its tally says it began, it answered (none forged).
    out["tallies"] = [(int(w["begun"]), int(w["answered"])) for w in pool.status().workers]
    try:
        nxt = await world.invoke_artifact("bob", "ok")
        out["next"] = nxt.value == 1
    except InvokeError as exc:
        out["next"] = f"{exc.code}: {exc}"
    return out


#: ``clone`` flags, one namespace each (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
CLONE_FLAGS = (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
#: Socket families the filter refuses (AF_NETLINK, AF_PACKET, AF_BLUETOOTH, AF_ALG, AF_VSOCK), with a type.
FAMILIES = ((16, 3), (17, 3), (31, 1), (38, 5), (40, 1))
#: The calls the issue names, every one of which must be refused; ``workers.seccomp.DENIED`` may hold more.
MUST_DENY = [
    *("add_key", "request_key", "keyctl"),
    *("mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick"),
    *("unshare", "setns", "bpf", "userfaultfd", "perf_event_open"),
    *("io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace", "process_vm_readv", "process_vm_writev"),
    *("kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "open_by_handle_at"),
    *("swapon", "swapoff", "reboot", "quotactl", "memfd_create", "shmget", "flock"),
]
#: Arguments for calls whose all-zero arguments would do something should the filter let them through.
HARMLESS = {"ptrace": [-1, 0, 0, 0], "setns": [-1, 0], "flock": [-1, 1], "kcmp": [-1, -1, 0, 0, 0]}
_HEADERS = {
    "x86_64": ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"),
    "aarch64": ("/usr/include/asm-generic/unistd.h",),
}


def syscall_params() -> dict[str, Any]:
    """The system call numbers to try, from this kernel's UAPI headers (``linux-libc-dev``), so that
    they are independent of the table the filter is built from; that table where no header is found
    (``source`` says which)."""
    from workers import seccomp

    machine = os.uname().machine
    names = sorted(set(seccomp.DENIED) | set(MUST_DENY))
    extra = ["clone", "clone3", "socket", "personality", "fcntl", "setsockopt", "getpid"]
    numbers: dict[str, int] = {}
    source = "workers.seccomp"
    for header in _HEADERS.get(machine, ()):
        if os.path.exists(header):
            text = Path(header).read_text()
            numbers = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}
            source = header
            break
    if not numbers:
        numbers = {**seccomp.arch().numbers, "getpid": {"x86_64": 39, "aarch64": 172}[machine]}
    missing = [n for n in MUST_DENY if n not in numbers]
    assert not missing or machine != "x86_64", f"no number for {missing} in {source}"
    return {
        "source": source,
        "denied": {n: numbers[n] for n in names if n in numbers},
        "numbers": {n: numbers[n] for n in [*extra, "add_key", "keyctl", "request_key"]},
        "args": HARMLESS,
        "clone_flags": CLONE_FLAGS,
        "families": FAMILIES,
        "fcntl": list(seccomp.FCNTL_REFUSED),
        "sockopts": list(seccomp.SOCKOPT_REFUSED),
        "x32": machine == "x86_64",
        "skip_walk": [],
    }


def run(data: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Play every attack in a fresh world under ``data``; return the report (see the module's doc)."""
    data.mkdir(mode=0o700, exist_ok=True)
    return asyncio.run(_session(data, params))


if __name__ == "__main__":
    params = json.loads(Path(sys.argv[2]).read_text())
    json.dump(run(Path(sys.argv[1]), params), sys.stdout)


# --- what must hold ---------------------------------------------------------------------------------

#: What the sandbox's root may hold at its top (the interpreter's and libraries' paths start there).
ROOT_TOP = {"dev", "etc", "lib", "lib64", "lib32", "libx32", "proc", "tmp", "usr", "root", "opt", "bin", "sbin"}


def verify(report: dict[str, Any], host_name: str) -> None:
    """Assert everything an attack report must show (each failure names the attack and the evidence).

    ``host_name``: the machine's name, which the code must not learn (in a container the workers
    already see another, which a sandbox refused ``sethostname`` by the engine's profile leaves)."""
    attacks = report["attacks"]
    assert set(attacks) == set(ATTACKS), sorted(set(ATTACKS) ^ set(attacks))
    for name, a in attacks.items():
        # Contained, charged to the invoker (once, CPU and memory measured), and the pool serves on.
        assert a["leftovers"] == [], (name, a["leftovers"])
        assert a["next"] is True, (name, a["next"])
        charged = a["charged"]
        assert len(charged) == 1 and charged[0]["agent"] == a["invoker"] and charged[0]["kind"] == "invoke", (name, a)
        assert charged[0]["cpu"] > 0 and charged[0]["memory"] > 0, (name, charged)
        assert a["tallies"] and all(begun == answered for begun, answered in a["tallies"]), (name, a["tallies"])
    assert report["workers_before"] == report["workers_after"] and not report["pool_failed"], report
    assert report["check"]["ok"], report["check"]
    _verify_syscalls(attacks["syscalls"])
    _verify_keyrings(attacks["keyring stash"], attacks["keyring fetch"])
    _verify_scan(attacks["scan"])
    seen = attacks["scan"]["value"]["hostname"]
    assert seen != host_name and seen in ("sandbox", report["hostname"]), (seen, host_name, report["hostname"])
    _verify_memory(attacks)
    _verify_tally(attacks["task tally"])
    for name in RESULTS:
        a = attacks[f"result {name}"]
        assert not a["ok"] and a["code"] == "code_error", (name, a)
        assert re.search(r"not valid JSON|outside 64 bits|not JSON-able|malformed frame", a["error"]), (name, a)


def _ok(a: dict[str, Any]) -> Any:
    assert a["ok"], a
    return a["value"]


def _verify_syscalls(a: dict[str, Any]) -> None:
    v = _ok(a)
    refused = {n: r for n, r in v["denied"].items() if r != [-1, "EPERM"]}
    assert not refused, f"calls not refused with EPERM (by number): {refused}"
    for name, r in v["filtered"].items():
        assert r == ([-1, "ENOSYS"] if name == "clone3" else [-1, "EPERM"]), (name, r)
    allowed = v["allowed"]
    assert allowed["getpid"][0] > 0 and allowed["socket AF_UNIX"][0] >= 0, allowed
    assert allowed["personality query"][0] >= 0 and allowed["fcntl F_GETFD"][0] >= 0, allowed
    assert allowed["setsockopt SO_REUSEADDR"] == [0, ""] and allowed["fork"] == 7 and allowed["thread"] == "ok"
    if "i386 getpid" in v:  # -EPERM from the architecture check (or no IA-32 emulation at all)
        assert v["i386 getpid"] == -1 or str(v["i386 getpid"]).startswith("died"), v["i386 getpid"]
    assert v["seccomp_status"] in (["2"], []), v["seccomp_status"]


def _verify_keyrings(stash: dict[str, Any], fetch: dict[str, Any]) -> None:
    s = _ok(stash)
    assert s.pop("read") == len(DIARY), s  # bob's code could read his diary: the loot was real
    assert all(r[1] == "EPERM" for r in s.values()), s
    f = _ok(fetch)
    keys = f.pop("/proc/keys")
    assert all(r[1] == "EPERM" for r in f.values()), f
    assert "loot" not in keys and DIARY.decode() not in json.dumps(fetch["value"]), keys


def _verify_scan(a: dict[str, Any]) -> None:
    v = _ok(a)
    assert set(v["root"]) <= ROOT_TOP and "tmp" in v["root"] and not v["sys"], v["root"]
    assert set(v["dev"]) <= {"null", "zero", "urandom", "fd", "stdin", "stdout", "stderr", "shm"}, v["dev"]
    if v["proc"]:  # its own PID namespace only (an empty /proc under a container's masked one)
        pids = [int(p) for p in v["proc"] if p.isdigit()]
        assert set(v["proc"]) - {str(p) for p in pids} <= {"self", "thread-self"} and pids, v["proc"]
        assert 1 in pids and max(pids) < 64 and len(pids) <= 4, pids
    found = {n: where for n, where in v["hits"].items() if where}
    assert not found, f"host paths visible to the code: {found}"
    if v["cgroup"] and v["cgroup"] != "FileNotFoundError":
        assert all(line.endswith(":/") for line in v["cgroup"].splitlines()), v["cgroup"]
    for path, got in v["locks"].items():
        if path == "/etc/os-release":
            assert got == ["FileNotFoundError"], (path, got)
        else:
            assert got == ["flock: PermissionError", "lockf: PermissionError", "ofd: PermissionError"], (path, got)


def _verify_memory(attacks: dict[str, Any]) -> None:
    quota = QUOTA_MB * MiB
    for name, stop in (("memfd", "PermissionError"), ("sysv shm", "EPERM"), ("tmpfs", "unshare: EPERM")):
        v = _ok(attacks[name])
        assert v["held"] == 0 and v["stop"].startswith(stop), (name, v)
    a = attacks["tmp files"]  # its own /tmp is sized by the quota, and counts against it
    if a["ok"]:
        assert a["value"]["held"] <= quota and "No space left" in a["value"]["stop"], a
        assert a["charged"][0]["memory"] >= a["value"]["held"], a
    else:
        assert a["code"] == "memory_exceeded", a
    for name in ("socket buffers", "pipes"):  # bounded by RLIMIT_NOFILE and the default buffer sizes
        v = _ok(attacks[name])
        assert v["held"] < quota // 2, (name, v)
    assert "F_SETPIPE_SZ: PermissionError" in _ok(attacks["pipes"])["stop"]
    a = attacks["processes"]  # several processes, each within RLIMIT_AS, three quotas together
    assert not a["ok"] and a["code"] == "memory_exceeded", a
    assert a["charged"][0]["memory"] >= quota * 0.9, a  # charged what the kernel saw, up to the kill
    a = attacks["allocate 100 MiB"]
    assert _ok(a) == 100 * MiB and a["charged"][0]["memory"] >= 100 * MiB, a


def _verify_tally(a: dict[str, Any]) -> None:
    v = _ok(a)
    assert v["pids"] >= 1, v  # it looked
    assert not any("aeco-tally" in f for f in v["found"]), v["found"]
    assert v["written"] == [], v
