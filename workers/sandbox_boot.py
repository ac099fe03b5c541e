"""The trusted bootstrap of a confined child (``workers.sandbox``): confine, then run agent code.

Started once per worker by ``workers.sandbox`` as ``python -I -S -c <loader> <control fd>`` (the
loader execs this file's code object, which the worker sends first), as root or as the worker's own
user, with a minimal environment, stdin on ``/dev/null`` and every other fd closed. It imports only
the standard library (no site-packages are on its path), and of it only what starts in well under a
millisecond: ``marshal`` rather than ``json``, ``_signal`` rather than ``signal``, ``_ctypes`` rather
than ``ctypes`` (their pure-Python layers cost more start-up than the rest of the sandbox together).
Four processes:

``zygote`` (the worker's child, for the worker's life: ``serve``): forks one outer per invocation,
           handing it the invocation's channel, report pipe, stdout and stderr, reaps it and tells
           the worker its ``wait4``: the CPU of the whole tree. A fork of it is a fresh bootstrap
           without a fresh interpreter's start-up.
``outer``  (``main``): reads the job, dies with the zygote, joins the invocation's cgroups, becomes a
           child subreaper, unshares the mount namespace (inside a user namespace when not root) and
           builds the minimal root under ``STAGE``, unshares the network, IPC, UTS, cgroup and PID
           namespaces and forks; afterwards it waits, watches the tree's memory and CPU when no
           cgroup does (``_Watch``), cleans up what is left under it, reports on the report fd and
           exits with the status of what it forked (``128 + n`` for a death by signal ``n``).
``init``   (pid 1 of the new PID namespace; only when that namespace was made): mounts a ``/proc``
           that shows only the sandbox's processes, moves everyone into the new root (``pivot_root``,
           the host's root detached), forks the runner and reaps orphans. When it exits, the kernel
           kills everything left in the namespace: a fork bomb dies with it.
``runner`` sets the rlimits, drops root, enters a user namespace of its own with no capabilities,
           joins a fresh session keyring, closes stray fds, clears the environment, installs the
           seccomp filter (last: nothing after it needs a refused call), says ``ready`` (with the
           isolation applied) and only then compiles and runs the agent's code with ``world`` in its
           globals.

Everything before ``ready`` is trusted: the parent believes the ``isolation`` list of that frame and
accepts a ``sandbox_error`` from this file only before it. Frames on the channel (fd 3) are a 4-byte
big-endian length and a payload: the worker writes ``marshal`` (the job, the answers to requests;
read only here, where the worker is trusted), the child writes UTF-8 JSON (which the worker decodes
strictly, as it comes from the code's process). The code's ``print`` output goes to fd 1 (a pipe the
parent reads and bounds), never to the channel; fd 2 is pointed at fd 1 before the code runs.
"""

from __future__ import annotations

import _ctypes
import _json
import _signal  # type: ignore[import-not-found]  # no stubs; `signal` costs ms of enum imports
import errno
import marshal
import os
import sys

TYPE_CHECKING = False  # typing costs milliseconds to import, and this file's start-up is per invocation
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

CHANNEL_FD = 3
REPORT_FD = 4
#: Largest frame either side accepts (bytes); a bigger one is a protocol violation.
MAX_FRAME = 16 << 20
#: The file name agent code is compiled under: tracebacks keep only frames from it.
AGENT_FILE = "<agent>"
NOBODY = 65534
#: Where the new root is assembled: a tmpfs mounted over the host's /tmp in the private mount namespace.
STAGE = "/tmp"
#: Where the code runs (inside the private tmpfs mounted on the new root's /tmp); also its HOME.
WORKDIR = "/tmp/work"
#: How often the outer samples the tree's memory and CPU when no cgroup counts them: a sample costs
#: tens of microseconds per process; between two, a tree can outgrow its quota by what it allocates
#: in that time (each process stays bounded by RLIMIT_AS all the same).
WATCH_PERIOD_S = 0.01

# Linux constants (x86_64 and the generic syscall table agree on these).
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
_CLONE_NEWUSER, _CLONE_NEWUTS, _CLONE_NEWCGROUP = 0x10000000, 0x04000000, 0x02000000
#: The host's name is not the code's business either.
HOSTNAME = b"sandbox"
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_KEYCTL_JOIN_SESSION_KEYRING = 1
_RLIMIT_CPU, _RLIMIT_FSIZE, _RLIMIT_CORE, _RLIMIT_NPROC, _RLIMIT_NOFILE = 0, 1, 4, 6, 7
_RLIMIT_MEMLOCK, _RLIMIT_AS, _RLIMIT_MSGQUEUE = 8, 9, 12
_RUSAGE_CHILDREN = -1
_SIGKILL, _SIGTERM, _SIGCHLD = 9, 15, 17
_SIGNALLED = 128  # exit status 128 + n reports "the runner died of signal n"

# --- the C calls, on _ctypes directly -------------------------------------------------------------------

if TYPE_CHECKING:
    _Number = _ctypes._SimpleCData[int]
    _Bytes = _ctypes._SimpleCData[bytes]
else:  # not subscriptable at run time
    _Number = _Bytes = _ctypes._SimpleCData


class _Int(_Number):
    _type_ = "i"


class _UInt(_Number):
    _type_ = "I"


class _Long(_Number):
    _type_ = "l"


class _ULong(_Number):  # also size_t: LP64 is all this file runs on (see workers.seccomp)
    _type_ = "L"


class _U16(_Number):
    _type_ = "H"


class _U64(_Number):
    _type_ = "Q"


class _Ptr(_Number):
    _type_ = "P"


class _Char(_Bytes):
    _type_ = "c"


class _IntFunc(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _LongFunc(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Long


class _Libc:
    """The C library of this process (what ``ctypes.CDLL(None, use_errno=True)`` gives): a function
    returning ``int``, or ``long`` for ``syscall``, by attribute."""

    def __init__(self) -> None:
        self._handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # None: this process, as dlopen(3) has it

    def __getattr__(self, name: str) -> Any:
        fn = (_LongFunc if name == "syscall" else _IntFunc)((name, self))  # type: ignore[arg-type]  # a CDLL-like
        setattr(self, name, fn)
        return fn


_libc = _Libc()
#: System call numbers the C library has no wrapper for (``pivot_root``, ``keyctl``, ``mount_setattr``),
#: from the job: the worker's ``workers.seccomp`` tables are their one source.
_nr: dict[str, int] = {}


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _syscall(name: str, *args: Any) -> int:
    return int(_libc.syscall(_Long(_nr[name]), *args))


def _unshare(flags: int) -> None:
    _check(_libc.unshare(_Int(flags)), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            _ULong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def _prctl(option: int, arg: int, arg2: Any = 0) -> None:
    zero = _ULong(0)  # some options (NO_NEW_PRIVS) insist that the unused arguments are 0
    second = arg2 if arg2 else zero
    _check(_libc.prctl(_Int(option), _ULong(arg), second, zero, zero), f"prctl({option})")


def _seal(path: str) -> None:
    """Make the mount at ``path`` and every mount under it read-only, nosuid and nodev: one
    ``mount_setattr`` (Linux >= 5.12), else a bind remount per mount."""
    attr = (_U64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
    ret = _syscall(
        "mount_setattr",
        _Int(_AT_FDCWD),
        path.encode(),
        _UInt(_AT_RECURSIVE),
        _ctypes.byref(attr),
        _ULong(_ctypes.sizeof(attr)),
    )
    if ret == 0:
        return
    if _ctypes.get_errno() != errno.ENOSYS:
        _check(ret, f"mount_setattr {path}")
    for mnt in _mounts_under(path):
        # The flags a user namespace locked on the source (noexec, the atime mode) must be kept.
        kept = os.statvfs(mnt).f_flag & (_MS_NOEXEC | 1024 | 2048)  # ST_NOEXEC, ST_NOATIME, ST_NODIRATIME
        _mount(None, mnt, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept)


def _mounts_under(path: str) -> list[str]:
    """Mount points at and under ``path`` in this mount namespace, parents first."""
    top = path.rstrip("/") or "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == top or point.startswith(top.rstrip("/") + "/"):
                out.append(point)
    return out


def _write_file(path: str, text: str, dir_fd: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --- the channel -------------------------------------------------------------------------------------


def _not_json(o: object) -> NoReturn:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _dumps(value: Any) -> str:
    """Strict JSON of ``value`` (as ``json.dumps(value, allow_nan=False)``), with the C encoder ``json``
    itself uses, without importing ``json`` (whose regular expressions cost milliseconds to compile)."""
    encode = _json.make_encoder({}, _not_json, _json.encode_basestring_ascii, None, ":", ",", False, False, False)
    return "".join(encode(value, 0))


def _write_raw(data: bytes) -> None:
    if len(data) > MAX_FRAME:
        raise ValueError(f"a {len(data)} byte message is over the {MAX_FRAME} byte channel limit")
    buf = memoryview(len(data).to_bytes(4, "big") + data)
    while buf:
        buf = buf[os.write(CHANNEL_FD, buf) :]


def _write_frame(obj: dict[str, Any]) -> None:
    _write_raw(_dumps(obj).encode())


def _clip(text: str, limit: int = 64 << 10) -> str:
    """Error texts are bounded: an exception message can be as large as the code likes."""
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def _read_exact(n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(CHANNEL_FD, min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError("the worker closed the channel")
        out += chunk
    return bytes(out)


def _read_frame() -> Any:
    n = int.from_bytes(_read_exact(4), "big")
    if not 0 < n <= MAX_FRAME:
        raise ValueError(f"bad frame length {n}")
    return marshal.loads(_read_exact(n))


# --- what agent code sees ----------------------------------------------------------------------------


class WorldError(Exception):
    """A request to the world was refused (the message says why)."""


class World:
    """The agent code's view of the world: its arguments, artifacts, payments, and its result.

    Usable from the process that runs the code only: a forked child would share (and garble) the
    channel, so its calls raise ``RuntimeError``.
    """

    Error = WorldError

    def __init__(self, args: Any, pid: int) -> None:
        self.args = args
        self._pid = pid
        self._result: Any = None
        self._has_result = False

    def _call(self, op: str, params: dict[str, Any]) -> Any:
        if os.getpid() != self._pid:
            raise RuntimeError("world can only be used by the process the code started in")
        _write_frame({"op": op, "params": params})
        try:
            reply = _read_frame()
        except (ValueError, EOFError, TypeError) as exc:
            raise WorldError(f"malformed reply ({exc})") from None
        if not isinstance(reply, dict):
            raise WorldError("malformed reply")
        if reply.get("ok") is not True:
            raise WorldError(str(reply.get("error") or f"{op} refused"))
        return reply.get("value")

    def read_artifact(self, artifact_id: str) -> bytes:
        """The bytes of an artifact (as the invoker may read it)."""
        if not isinstance(artifact_id, str):
            raise TypeError(f"artifact id must be a str, not {type(artifact_id).__name__}")
        value = self._call("read_artifact", {"id": artifact_id})
        if not isinstance(value, bytes):
            raise WorldError("malformed reply")
        return value

    def transfer(self, to: str, amount: int, asset: str = "scrip") -> None:
        """Move ``amount`` of ``asset`` (scrip by default) from the invoker to ``to``."""
        if not isinstance(to, str):
            raise TypeError(f"recipient must be a str, not {type(to).__name__}")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"amount must be an int, not {type(amount).__name__}")
        if not isinstance(asset, str):
            raise TypeError(f"asset must be a str, not {type(asset).__name__}")
        self._call("transfer", {"to": to, "amount": amount, "asset": asset})

    def result(self, value: Any) -> None:
        """Set the code's result (JSON-able, finite numbers only); takes precedence over a global ``result``."""
        self._result, self._has_result = value, True


def _agent_traceback(exc: BaseException, code: str) -> str:
    """The traceback of ``exc`` with only the agent's frames (the bootstrap's are noise to it), its
    lines quoted from ``code``."""
    import linecache  # only now: with tokenize and re it costs more than the rest of the sandbox
    import traceback

    linecache.cache[AGENT_FILE] = (len(code), None, code.splitlines(True), AGENT_FILE)
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if f.filename == AGENT_FILE])
        todo += [c for c in (t.__cause__, t.__context__) if c is not None]
        todo += t.exceptions or []
    return _clip("".join(te.format()).rstrip())


def _failed(code: str, error: str) -> bytes:
    return _dumps({"op": "done", "ok": False, "error_code": code, "error": error}).encode()


def _run_code(code: str, world: World, max_value: int) -> bytes:
    """Compile and run the agent code; return the ``done`` frame describing how it ended."""
    import builtins

    glb: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, "world": world}
    try:
        try:
            exec(compile(code, AGENT_FILE, "exec", dont_inherit=True), glb)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
    except MemoryError as exc:
        _only_the_runner(world, 1)
        return _failed("memory_exceeded", _agent_traceback(exc, code))
    except BaseException as exc:
        _only_the_runner(world, 1)
        return _failed("code_error", _agent_traceback(exc, code))
    _only_the_runner(world, 0)
    value = world._result if world._has_result else glb.get("result")
    try:
        text = _dumps(value)
    except MemoryError:
        return _failed("memory_exceeded", "MemoryError while encoding the result")
    except (TypeError, ValueError, RecursionError) as exc:
        return _failed("code_error", _clip(f"the result is not JSON-able: {type(exc).__name__}: {exc}"))
    if len(text) > max_value:
        return _failed("output_too_large", f"the result is {len(text)} bytes of JSON, over the {max_value} byte limit")
    # The value is embedded as already-encoded JSON: it is not encoded twice.
    return b'{"op":"done","ok":true,"value":' + text.encode() + b"}"


def _only_the_runner(world: World, status: int) -> None:
    """A child the code forked that falls off the end of the code exits quietly: only the runner
    reports, or two ``done`` frames would interleave on the shared channel."""
    if os.getpid() != world._pid:
        os._exit(status)


# --- the minimal root ----------------------------------------------------------------------------------


def _drop_root() -> None:
    """Root becomes nobody for good: no groups, uid/gid nobody."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    assert os.getuid() == os.geteuid() == NOBODY and os.getgid() == NOBODY


def _map_ids(inside: int, outside_uid: int, outside_gid: int, proc: int) -> None:
    """Map ``inside`` in the user namespace just entered to one uid and gid of its parent (one id is
    all an unprivileged process may map), through the host's ``/proc`` (dir fd ``proc``: the sandbox
    may have none of its own). setgroups must be denied first: the kernel refuses an unprivileged
    ``gid_map`` otherwise."""
    _prctl(_PR_SET_DUMPABLE, 1)  # a non-dumpable process's /proc/self files belong to root: unwritable
    _write_file("self/setgroups", "deny", proc)
    _write_file("self/uid_map", f"{inside} {outside_uid} 1", proc)
    _write_file("self/gid_map", f"{inside} {outside_gid} 1", proc)
    # Keeps the processes that hold this namespace's capabilities (this one, the PID namespace's init)
    # out of reach of the code: it runs as the same uid outside, and ptrace (or /proc/<pid>/root,
    # /proc/<pid>/mem) between same-uid processes is refused only for a non-dumpable target.
    _prctl(_PR_SET_DUMPABLE, 0)


def _new_mount_namespace(applied: list[str], proc: int) -> bool:
    """Enter a new mount namespace: as root directly, else together with a new user namespace.

    Unprivileged (the image's user), the mount namespace is made with a user namespace in which this
    process is root (uid 0 mapped to its own uid, ``userns`` in the list): that gives it the
    capabilities to mount, in this mount namespace only. The code never holds them: see
    ``_own_user_namespace``. Root that may not unshare (no CAP_SYS_ADMIN) first becomes nobody, so
    that the user namespace maps nobody and not root (who owns most files). False: the host refused.
    """
    if os.geteuid() == 0:
        try:
            _unshare(_CLONE_NEWNS)
            return True
        except OSError as exc:
            if exc.errno != errno.EPERM:
                return False
        try:
            _drop_root()
        except OSError:
            return False
        applied.append("uid")
    uid, gid = os.geteuid(), os.getegid()
    try:
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
    except OSError:
        return False  # user namespaces disabled (user.max_user_namespaces = 0, a seccomp filter ...)
    _map_ids(0, uid, gid, proc)
    applied.append("userns")
    return True


def _bind(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    _mount(source, target, None, _MS_BIND | _MS_REC)


def _build_root(steps: list[tuple[str, ...]], tmp_bytes: int, applied: list[str]) -> int:
    """Assemble the minimal root under ``STAGE`` (see ``workers.rootfs`` for ``steps``): a small tmpfs,
    read-only binds of what the interpreter needs, ``/dev`` with ``null``, ``zero`` and ``urandom``, a
    private ``/tmp`` of ``tmp_bytes`` (``/dev/shm`` leads there), an empty ``/proc`` to mount on.
    Returns an fd of the private ``/tmp`` (for the watch's ``fstatvfs``).

    Mount propagation is private first: without it our mounts would appear on the host.
    """
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    applied.append("mountns")
    _mount("tmpfs", STAGE, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for step in steps:
        kind, path = step[0], step[1]
        here = STAGE + path
        if kind == "dir":
            os.mkdir(here, 0o755)
        elif kind == "link":
            os.symlink(step[2], here)
        elif kind == "bind":
            _bind(path, here)
        elif kind == "cover":
            if os.path.isdir(here):
                _mount("tmpfs", here, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k,nr_inodes=2,mode=555")
            else:
                _mount("/dev/null", here, None, _MS_BIND)
        else:
            raise ValueError(f"unknown root step {step!r}")
    for d in ("/dev", "/proc", "/tmp"):
        os.makedirs(STAGE + d, 0o755, exist_ok=True)
    for node in ("null", "zero", "urandom"):
        os.close(os.open(f"{STAGE}/dev/{node}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
        os.symlink(target, f"{STAGE}/dev/{name}")
    os.symlink("/proc/self/fd/2", f"{STAGE}/dev/stderr")
    os.symlink("/tmp", f"{STAGE}/dev/shm")  # POSIX shared memory and semaphores: the private /tmp
    _seal(STAGE)
    applied.append("rofs")
    for node in ("null", "zero", "urandom"):
        # Device binds stay writable (writing /dev/null is what it is for); a file's inode is the
        # host's, but the code owns none of them and cannot chmod or lock them (see workers.seccomp).
        _mount(f"/dev/{node}", f"{STAGE}/dev/{node}", None, _MS_BIND)
    _mount("tmpfs", STAGE + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmp_bytes},nr_inodes=16384,mode=1777")
    os.mkdir(STAGE + WORKDIR, 0o700)
    if "userns" not in applied:  # in a user namespace the code's uid outside (this one's) owns it already
        os.chown(STAGE + WORKDIR, NOBODY, NOBODY)
    applied.append("minroot")
    return os.open(STAGE + "/tmp", os.O_PATH | os.O_DIRECTORY)


def _enter_root(with_proc: bool, applied: list[str]) -> None:
    """Move every process of the mount namespace into the new root and detach the host's.

    Called by the first process of the sandbox's PID namespace (or the runner, without one), which
    alone can mount a ``/proc`` of that namespace; it does so while the host's ``/proc`` is still in
    the namespace (inside a user namespace the kernel allows a new ``/proc`` only where a full one is
    visible). ``subset=pid`` leaves out everything that is not a process (``/proc/sys``, ``keys``,
    ``meminfo``, ``kcore`` ...). A container engine's masked ``/proc`` refuses it: then the code has
    no ``/proc`` at all.
    """
    if with_proc:
        for options in ("subset=pid", None):
            try:
                _mount("proc", STAGE + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options)
                applied.append("proc")
                break
            except OSError:
                continue
    os.chdir(STAGE)
    _check(_syscall("pivot_root", b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _Int(_MNT_DETACH)), "umount of the host's root")
    os.chdir("/")


# --- the runner's own confinement ----------------------------------------------------------------------


def _set_rlimits(limits: dict[str, Any], proc: int) -> None:
    """Per-process limits, lowered while still root so that nobody cannot raise them again.

    ``RLIMIT_AS`` is the process's address space at this point (the interpreter, its libraries and
    what the bootstrap imported: a baseline of some tens of MB, read from ``VmSize``) plus
    ``memory_bytes``: the code gets ``memory_bytes`` of its own. ``RLIMIT_CPU`` has whole-second
    granularity and is only a backstop, one second above the limit (soft, SIGXCPU; hard one more,
    SIGKILL): the kernel checks it against tick-sampled CPU, which on a busy machine runs a quarter
    ahead of the process's real run time. The exact figure is enforced over the whole tree by the
    parent (from the cgroup) or by the outer's watch, from the scheduler's own count. ``RLIMIT_NPROC``
    counts all processes and threads of the uid. ``RLIMIT_FSIZE`` is ``memory_bytes``: a file lives in
    the private tmpfs, which is memory. ``RLIMIT_NOFILE`` also bounds what sockets and pipes can hold
    in kernel buffers (each keeps its default size: see ``workers.seccomp``).
    """
    baseline = 0
    for line in _read(proc, "self/status").split(b"\n"):
        if line.startswith(b"VmSize:"):
            baseline = int(line.split()[1]) * 1024
            break
    cpu = -int(-float(limits["cpu_seconds"]) // 1) + 1
    mem = int(limits["memory_bytes"])
    for res, value in (
        (_RLIMIT_CPU, (cpu, cpu + 1)),
        (_RLIMIT_AS, (baseline + mem, baseline + mem)),
        (_RLIMIT_NPROC, (int(limits["max_processes"]),) * 2),
        (_RLIMIT_NOFILE, (int(limits["max_open_files"]),) * 2),
        (_RLIMIT_FSIZE, (mem, mem)),
        (_RLIMIT_CORE, (0, 0)),
        (_RLIMIT_MEMLOCK, (0, 0)),
        (_RLIMIT_MSGQUEUE, (0, 0)),
    ):
        limit = (_U64 * 2)(*value)
        _check(_libc.setrlimit(_Int(res), _ctypes.byref(limit)), f"setrlimit({res})")


#: Imported before dropping root when there is no mount namespace: the standard library may then be
#: out of nobody's reach (pyenv keeps it under a 0700 /root). The bootstrap's own needs come first.
_PRELOAD = (
    "linecache traceback signal socket select json math re random collections itertools functools string datetime time "
    "hashlib base64 statistics heapq bisect textwrap struct decimal fractions operator copy dataclasses typing enum"
)


def _preload() -> None:
    for name in _PRELOAD.split():
        try:
            __import__(name)
        except ImportError:
            continue


def _own_user_namespace(proc: int) -> None:
    """Enter a user namespace (and mount namespace) of the invocation's own, as nobody, and give up
    every capability, for good.

    * Keyrings: the user and user-session keyrings of a uid belong to its user namespace, so code in
      a namespace of its own finds them empty and leaves nothing in them for the next invocation
      (uid 65534's keyrings in the host's namespace are shared by every process of that uid). With
      the fresh session keyring (``_join_fresh_keyring``) no keyring is shared, even without seccomp.
    * Mounts: every mount copied into a mount namespace owned by a less privileged user namespace is
      locked by the kernel (``MNT_LOCKED``, with its read-only/nosuid/nodev/noexec flags): no
      capability in the nested namespace can unmount, move or loosen it. Unprivileged, the code runs
      as the worker's uid outside and the sandbox's own user namespace holds the capabilities that
      built the root: without this nesting the code would be one regained capability away from them.
    * Capabilities: the creator of a user namespace holds all of them in it; the bounding set, the
      ambient set and effective/permitted/inheritable are emptied (and ``no_new_privs`` is set in
      ``_become_nobody``), so the code cannot mount, configure namespaces or regain any.

    The code is nobody inside, mapped to the uid this process has outside (nobody when the worker is
    root, the worker's own uid in the sandbox's user namespace when it is not).
    """
    uid, gid = os.geteuid(), os.getegid()
    _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
    _map_ids(NOBODY, uid, gid, proc)
    for cap in range(64):
        try:
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError:
            break  # EINVAL: past the last capability this kernel knows
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = (_UInt * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_UInt * 6)()  # two {effective, permitted, inheritable} words, all zero
    _check(_libc.capset(_ctypes.byref(header), _ctypes.byref(data)), "capset")


def _join_fresh_keyring() -> bool:
    """Replace the session keyring inherited from the worker (and the supervisor, and whoever started
    it) with a new, empty, anonymous one: keys the code could find or add there do not cross
    invocations. False when the kernel has no keyrings (nothing to share then)."""
    ret = _syscall("keyctl", _Long(_KEYCTL_JOIN_SESSION_KEYRING), None)
    if ret < 0:
        err = _ctypes.get_errno()
        if err == errno.ENOSYS:
            return False
        raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")
    return True


def _install_seccomp(program: bytes) -> None:
    """Install the filter built by ``workers.seccomp`` (``struct sock_filter`` array) on this process;
    inherited by everything it forks, and never removable."""

    class _Fprog(_ctypes.Structure):
        _fields_ = [("len", _U16), ("filter", _Ptr)]

    assert program and len(program) % 8 == 0, "a seccomp program is an array of 8-byte instructions"
    buf = (_Char * len(program)).from_buffer_copy(program)
    prog = _Fprog(len(program) // 8, _ctypes.addressof(buf))
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _ctypes.byref(prog))


def _become_nobody(parent: int) -> None:
    """No way back through setuid binaries, no ptrace from same-uid processes, death with the parent."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_DUMPABLE, 0)  # same-uid processes (other sandboxes) cannot ptrace this one
    # A credential change clears the parent-death signal: set it (again) now.
    _prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _runner(job: dict[str, Any], applied: list[str], proc: int) -> NoReturn:
    """Confine this process for good and run the code. Never returns."""
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())  # the outer's and init's mask must not reach the code
    parent = os.getppid()
    limits = job["limits"]
    skip = job["skip"]
    if "minroot" in applied and "pidns" not in applied:
        _enter_root(False, applied)  # no init to do it
    if "mountns" not in applied:
        _preload()
    _set_rlimits(limits, proc)  # before the user namespace, which records RLIMIT_NPROC as its maximum
    applied.append("rlimits")
    if os.geteuid() == 0 and "userns" not in applied:
        _drop_root()
        applied.append("uid")
    try:
        _own_user_namespace(proc)
        keyring_ns = True
    except OSError:
        if "userns" in applied:
            raise  # unprivileged, the code must not keep the sandbox's user namespace: fail closed
        keyring_ns = False  # root on a host without user namespaces: seccomp keeps keyrings out of reach
    os.close(proc)
    _become_nobody(parent)
    applied.append("nonewprivs")
    if _join_fresh_keyring() and keyring_ns:
        applied.append("keyring")
    os.closerange(CHANNEL_FD + 1, 1 << 16)
    home = WORKDIR if "minroot" in applied else "/"
    os.chdir(home)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"})
    if "minroot" in applied:
        # The interpreter as the root holds it (a virtual environment's link to it is not there).
        sys.executable = sys._base_executable = job["python"]  # type: ignore[attr-defined]
    world = World(job["args"], os.getpid())
    if "seccomp" not in skip:
        _install_seccomp(job["seccomp"])  # last: every step above may use a call it refuses
        applied.append("seccomp")
    _write_frame({"op": "ready", "isolation": applied})
    sys.stderr.flush()
    os.dup2(1, 2)  # from here on the code's stderr is part of its captured output
    done = _run_code(job["code"], world, int(limits["max_output_bytes"]))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the code may have closed or replaced it
            continue
    _write_raw(done)
    os._exit(0)


# --- the processes around it ---------------------------------------------------------------------------


def _exit_status(status: int, encoded: bool = False) -> int:
    """Encode a wait status for our own exit: the code's exit code (below 128), or 128 + the signal.

    ``encoded``: the status is an init's, whose exit code already is such an encoding."""
    if os.WIFSIGNALED(status):
        return _SIGNALLED + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if encoded else os.WEXITSTATUS(status) & 0x7F


def _init(job: dict[str, Any], applied: list[str], outer: int, proc: int) -> NoReturn:
    """Pid 1 of the sandbox's PID namespace: enter the root, fork the runner, reap everything, exit
    with the runner.

    ``outer`` is a pidfd of the outer process: its parent is outside the namespace, so ``getppid``
    says 0 whether it is alive or not, and the pidfd is how to tell that it did not die before the
    parent-death signal was armed.
    """
    import select

    _prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    if select.select([outer], [], [], 0)[0]:  # a pidfd is readable once its process has exited
        os._exit(1)
    os.close(outer)
    if "minroot" in applied:
        _enter_root(True, applied)
    pid = os.fork()
    if pid == 0:
        _runner(job, applied, proc)
    os.close(proc)
    os.close(CHANNEL_FD)  # only the runner may talk; its end of the channel closing means it is gone
    # Everything is killed and reaped here, while this process still reaps normally: when an init
    # exits, the kernel autoreaps what is left in its namespace, and their CPU is lost to wait4.
    status = _wait_for(pid, _kill_namespace)
    _reap_all(_kill_namespace)
    os._exit(_exit_status(status))


def _kill_namespace() -> None:
    try:
        os.kill(-1, _SIGKILL)  # from a PID namespace's init: everything in it but itself
    except ProcessLookupError:
        return  # nothing left


def _children(proc: int, pid: int) -> list[int]:
    """Children of every thread of ``pid``, through the host's ``/proc`` (dir fd ``proc``)."""
    out: list[int] = []
    try:
        tids = _listdir(proc, f"{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(x) for x in _read(proc, f"{pid}/task/{tid}/children").split()]
        except OSError:
            continue
    return out


def _listdir(dirfd: int, path: str) -> list[str]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirfd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def _read(dirfd: int, path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY, dir_fd=dirfd)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _kill_children(proc: int) -> None:
    """SIGKILL our direct children (seen through the host's ``/proc``, dir fd ``proc``): unreaped, so
    their pids cannot have been reused. A killed child's own children are reparented to us (a child
    subreaper) and killed on a later call."""
    for pid in _children(proc, os.getpid()):
        try:
            os.kill(pid, _SIGKILL)
        except ProcessLookupError:
            continue


class _Watch:
    """The outer's measure of the whole invocation when no cgroup counts it, and its limit.

    Every ``WATCH_PERIOD_S`` it walks the tree under it (the children of every thread, through the
    host's ``/proc``) and adds up what the kernel says each process holds — its own memory
    (``RssAnon + RssShmem`` of ``/proc/<pid>/status``: anonymous and shared-memory pages, not the
    interpreter's and libraries' file pages, which the page cache shares with every other process, as
    a cgroup does not charge them either) and CPU (``utime + stime`` of ``/proc/<pid>/stat`` and the
    same of the children each has reaped) — plus the bytes in use in the private ``/tmp``
    (``fstatvfs``: files hold memory there, mapped or not, open or deleted). A total over the quota, or
    CPU over the limit, kills the tree: ``over`` says which.

    ``peak`` is never below what the kernel reported: the largest sampled total, and (at the end) the
    largest single process's own high-water mark (``ru_maxrss`` of the reaped tree, file pages
    included), which catches a spike between two samples. Pages two processes share after a fork, and
    a ``/tmp`` file a process maps, count twice: an over-count, never an under-count.
    """

    def __init__(self, proc: int, tmp: int, limits: dict[str, Any]) -> None:
        self.proc, self.tmp = proc, tmp
        self.memory_limit = int(limits["memory_bytes"])
        self.cpu_limit = float(limits["cpu_seconds"])
        self.tick = os.sysconf("SC_CLK_TCK")
        self.peak = 0
        self.cpu = 0.0
        self.samples = 0
        self.over = ""

    def sample(self) -> bool:
        """Take one sample; True when the tree is over a limit (the first time)."""
        kib = ticks = 0
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                stat = _read(self.proc, f"{pid}/stat")
                status = _read(self.proc, f"{pid}/status")
            except OSError:
                continue  # gone meanwhile
            ticks += sum(int(x) for x in stat.rsplit(b")", 1)[1].split()[11:15])  # utime, stime, cutime, cstime
            for line in status.split(b"\n"):
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    kib += int(line.split()[1])
            todo += _children(self.proc, pid)
        used = 0
        if self.tmp >= 0:
            st = os.fstatvfs(self.tmp)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
        total = kib * 1024 + used
        self.peak = max(self.peak, total)
        self.cpu = max(self.cpu, ticks / self.tick)
        self.samples += 1
        if not self.over:
            if total > self.memory_limit:
                self.over = "memory"
            elif self.cpu > self.cpu_limit:
                self.over = "cpu"
            return bool(self.over)
        return False

    def report(self) -> bytes:
        usage = (_Long * 18)()  # struct rusage: two timevals, then ru_maxrss (KiB)
        _check(_libc.getrusage(_Int(_RUSAGE_CHILDREN), _ctypes.byref(usage)), "getrusage")
        largest = usage[4] * 1024  # the children's own high-water marks: forked after exec, not the worker's
        report = {"peak": max(self.peak, largest), "cpu": self.cpu, "samples": self.samples, "over": self.over}
        return _dumps(report).encode()


def _reap_all(kill: Callable[[], None]) -> None:
    """Kill (with ``kill``) and reap until no child is left; reaping is what charges their CPU."""
    import time

    while True:
        kill()
        try:
            p, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if p == 0:
            time.sleep(0.001)


def _fail(message: str) -> NoReturn:
    """Report a setup failure (before any agent code ran) and exit."""
    try:
        _write_raw(_failed("sandbox_error", _clip(message)))
    finally:
        os._exit(1)


def _child(job: dict[str, Any], applied: list[str], outer: int, proc: int) -> NoReturn:
    """What the outer process forks: the PID namespace's init, or the runner directly.

    ``outer`` is a pidfd of the outer process (see ``_init``)."""
    try:
        os.close(REPORT_FD)  # the outer's alone
        if "pidns" in applied:
            assert os.getpid() == 1, "the first child in a new PID namespace is its init"
            _init(job, applied, outer, proc)
        os.close(outer)
        _runner(job, applied, proc)
    except BaseException as exc:  # never fall back into the outer process's code
        _fail(f"sandbox setup failed: {type(exc).__name__}: {exc}")


def _wait_for(
    pid: int, on_term: Callable[[], None], watch: _Watch | None = None, on_over: Callable[[], None] | None = None
) -> int:
    """Wait for our child ``pid``, reaping orphans meanwhile, calling ``on_term`` on SIGTERM (and,
    with a ``watch``, sampling the tree every ``WATCH_PERIOD_S`` and calling ``on_over`` once it goes
    over a limit); return its wait status. SIGTERM and SIGCHLD must be blocked.

    Signals are taken synchronously (``sigwaitinfo``), not by a handler, so ``pid`` is only ever
    signalled while it is still unreaped: it cannot have been reused by then.
    """
    signals = {_SIGTERM, _SIGCHLD}
    while True:
        if watch is None:
            got = _signal.sigwaitinfo(signals).si_signo
        else:
            info = _signal.sigtimedwait(signals, WATCH_PERIOD_S)
            got = info.si_signo if info is not None else 0
            if watch.sample() and on_over is not None:
                on_over()
        if got == _SIGTERM:
            on_term()
        while True:
            try:
                p, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                raise AssertionError("our child vanished without being reaped") from None
            if p == 0:
                break
            if p == pid:
                return status


#: Namespaces the outer unshares after the root is built (its children are made in them). A new network
#: namespace has only a loopback, and it is down: no network at all, no abstract unix socket of the
#: host. The cgroup namespace is rooted at the invocation's own cgroup (joined before the interpreter
#: started): ``/proc/self/cgroup`` names no host cgroup (nor the pids in their names).
_NAMESPACES = (
    ("netns", _CLONE_NEWNET),
    ("ipcns", _CLONE_NEWIPC),
    ("utsns", _CLONE_NEWUTS),
    ("cgroupns", _CLONE_NEWCGROUP),
    ("pidns", _CLONE_NEWPID),
)


def _adopt_fds(fds: list[int]) -> None:
    """Put the channel, the report pipe, stdout and stderr on fds 3, 4, 1 and 2, whatever numbers they
    came with (stdin stays the zygote's ``/dev/null``)."""
    targets = (CHANNEL_FD, REPORT_FD, 1, 2)
    assert len(fds) == len(targets), fds
    high = [os.dup2(fd, 100 + i) for i, fd in enumerate(fds)]  # out of the way of every target first
    for fd in set(fds) - set(targets):
        os.close(fd)
    for fd, target in zip(high, targets, strict=True):
        os.dup2(fd, target)
        os.close(fd)


def serve() -> NoReturn:
    """The zygote: a bootstrap started once per worker (``workers.sandbox._Zygote``), already through
    the interpreter's start-up and this file's imports, that forks one outer process per invocation.

    On its control socket (``sys.argv[1]``, a stream socket to the worker; nothing else is open) it
    takes a request — one byte with the invocation's channel, report pipe, stdout and stderr as
    ``SCM_RIGHTS`` — forks the outer with them, answers with the outer's pid and a pidfd of it, waits
    for it and answers with its wait status, the CPU of its whole tree (``wait4``), the CPU this
    process spent on it, and the tree's largest ``ru_maxrss``. One invocation at a time. It holds no
    secret and no state of one invocation into the next: every outer is a copy of the same pristine
    process. It dies with the worker (the end of the socket, or the parent-death signal).
    """
    import resource
    import socket
    import struct

    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_SIGTERM, _SIGCHLD})  # inherited: the outer takes them
    _prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    ctl = socket.socket(fileno=int(sys.argv[1]))

    def own_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    while True:
        msg, fds, _, _ = socket.recv_fds(ctl, 1, 4)
        if not msg or len(fds) != 4:
            os._exit(0)  # the worker is gone (or spoke nonsense: it is trusted, so it is gone)
        before = own_cpu()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            _adopt_fds(fds)
            main(me)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)  # before any wait: the pid cannot have been reused
        socket.send_fds(ctl, [struct.pack("!i", pid)], [pidfd])
        os.close(pidfd)
        _, status, ru = os.wait4(pid, 0)
        spent = own_cpu() - before
        ctl.sendall(struct.pack(EXIT_RECORD, pid, status, ru.ru_utime + ru.ru_stime, spent, ru.ru_maxrss))


#: What the zygote says when an outer has exited: pid, wait status, CPU of the outer's tree, CPU the
#: zygote spent on it (the fork), the tree's largest ``ru_maxrss`` (KiB).
EXIT_RECORD = "!iiddq"


def main(zygote: int) -> NoReturn:
    """The outer process (forked by the ``zygote``, its fds in place): confine what can be confined,
    fork, wait and watch, clean up, report, exit. SIGTERM (the worker stopping us) and SIGCHLD are
    blocked, and taken by sigwaitinfo once the child runs."""
    _prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    if os.getppid() != zygote:
        os._exit(1)  # the zygote died before we could tie our life to it
    try:
        job = _read_frame()  # the end of the channel if the worker is gone
    except (OSError, ValueError, EOFError, TypeError) as exc:
        _fail(f"bad job: {exc}")
    # The invocation's cgroups, joined before anything else runs: everything forked from here on is
    # limited and counted there. The interpreter's start-up before this point (its first few
    # milliseconds and megabytes) is in the worker's cgroup, and in the wait4 the worker charges.
    for procs in job["cgroups"]:
        try:
            _write_file(procs, str(os.getpid()))
        except OSError as exc:
            _fail(f"cannot join the invocation's cgroup {procs}: {exc}")
    _nr.update(job["nr"])
    skip = set(job["skip"])
    applied: list[str] = []
    tmp = -1
    # The host's /proc, kept open: the sandbox's own root may have none, yet the outer watches the
    # tree through it and the runner writes its user namespace's id maps there.
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans stay ours to kill and to be charged for
        if "mountns" not in skip and _new_mount_namespace(applied, proc):
            tmp = _build_root(job["root"], int(job["limits"]["memory_bytes"]), applied)
        for name, flag in _NAMESPACES:
            if name in skip:
                continue
            try:
                _unshare(flag)
            except OSError:
                continue  # refused by the host: recorded by its absence from the list
            if flag == _CLONE_NEWUTS and _libc.sethostname(HOSTNAME, _ULong(len(HOSTNAME))) != 0:
                continue  # a container engine's seccomp profile may refuse it: the code sees the container's
            applied.append(name)
    except OSError as exc:
        _fail(f"sandbox setup failed: {exc}")
    if job["hide"] and "mountns" not in applied and os.geteuid() != 0 and "uid" not in applied:
        # The code would run as this process's own user, which can read what it was asked to hide.
        _fail(
            f"cannot hide {job['hide']}: no mount namespace could be made (are unprivileged user "
            f"namespaces disabled?) and the code would run as uid {os.geteuid()}, which can read them"
        )
    outer = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        _child(job, applied, outer, proc)
    os.close(outer)
    os.close(CHANNEL_FD)
    # Let go of the output pipe: the worker then sees EOF as soon as the sandbox side is gone.
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)

    def kill_children() -> None:
        _kill_children(proc)

    watch = _Watch(proc, tmp, job["limits"]) if job["watch"] else None
    if "pidns" in applied:
        # The init cleans up (and reaps, so that the CPU is charged) when asked to stop, or when the
        # tree goes over a limit: a killed init's namespace would be autoreaped, its CPU lost to wait4.
        status = _wait_for(pid, lambda: os.kill(pid, _SIGTERM), watch, lambda: os.kill(pid, _SIGTERM))
    else:
        status = _wait_for(pid, lambda: os.kill(pid, _SIGKILL), watch, kill_children)
    _reap_all(kill_children)
    if watch is not None:
        watch.sample()  # what is left in /tmp
        os.write(REPORT_FD, watch.report())
    os._exit(_exit_status(status, encoded="pidns" in applied))


if __name__ == "__main__":
    serve()
