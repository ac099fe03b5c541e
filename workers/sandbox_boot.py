"""The trusted bootstrap of a confined child (``workers.sandbox``): confine, then run agent code.

Started by ``workers.sandbox.run_confined`` as ``python -I -S sandbox_boot.py <channel fd> <worker pid>``,
as root, with a minimal environment, stdin on ``/dev/null``, stdout and stderr on pipes, and every other
fd closed. It imports only the standard library (no site-packages are on its path). Three processes:

``outer``  (root, the worker's child): reads the job, dies with the worker, becomes a child subreaper,
           unshares the mount, network, IPC and PID namespaces, sets up the mounts and forks;
           afterwards it only waits, cleans up what is left under it and exits with the status of
           what it forked (``128 + n`` for a death by signal ``n``), so that the worker's ``wait4`` of
           it is charged the CPU of the whole tree.
``init``   (root, pid 1 of the new PID namespace; only when that namespace was made): mounts a
           ``/proc`` that shows only the sandbox, forks the runner and reaps orphans. When it exits,
           the kernel kills everything left in the namespace: a fork bomb dies with it.
``runner`` (becomes ``nobody``): sets the rlimits, drops privileges, closes stray fds, clears the
           environment, says ``ready`` (with the isolation applied) and only then compiles and runs
           the agent's code with ``world`` in its globals.

Everything before ``ready`` is trusted: the parent believes the ``isolation`` list of that frame and
accepts a ``sandbox_error`` from this file only before it. Frames on the channel (fd 3) are a 4-byte
big-endian length and a UTF-8 JSON object. The code's ``print`` output goes to fd 1 (a pipe the
parent reads and bounds), never to the channel; fd 2 is pointed at fd 1 before the code runs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys

TYPE_CHECKING = False  # typing costs milliseconds to import, and this file's start-up is per invocation
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

CHANNEL_FD = 3
#: Largest frame either side accepts (bytes of JSON); a bigger one is a protocol violation.
MAX_FRAME = 16 << 20
#: The file name agent code is compiled under: tracebacks keep only frames from it.
AGENT_FILE = "<agent>"
NOBODY = 65534
#: Where the code runs (inside the private tmpfs mounted over /tmp); also its HOME.
WORKDIR = "/tmp/work"

# Linux constants (x86_64 and the generic syscall table agree on these).
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_SIGNALLED = 128  # exit status 128 + n reports "the runner died of signal n"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def _prctl(option: int, arg: int) -> None:
    zero = ctypes.c_ulong(0)  # some options (NO_NEW_PRIVS) insist that the unused arguments are 0
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero), f"prctl({option})")


def _read_only_mounts(path: str, writable: bool = False) -> None:
    """Make every mount at and under ``path`` read-only and nosuid (one recursive ``mount_setattr``);
    ``writable``: make the mount at ``path`` alone writable again."""
    attr = (ctypes.c_uint64 * 4)(
        *((0, _MOUNT_ATTR_RDONLY) if writable else (_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0)), 0, 0
    )
    ret = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        path.encode(),
        ctypes.c_uint(0 if writable else _AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, "mount_setattr")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --- the channel -------------------------------------------------------------------------------------


def _write_raw(data: bytes) -> None:
    if len(data) > MAX_FRAME:
        raise ValueError(f"a {len(data)} byte message is over the {MAX_FRAME} byte channel limit")
    buf = memoryview(len(data).to_bytes(4, "big") + data)
    while buf:
        buf = buf[os.write(CHANNEL_FD, buf) :]


def _write_frame(obj: dict[str, Any]) -> None:
    _write_raw(json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())


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
    return json.loads(_read_exact(n))


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
        reply = _read_frame()
        if not isinstance(reply, dict):
            raise WorldError("malformed reply")
        if reply.get("ok") is not True:
            raise WorldError(str(reply.get("error") or f"{op} refused"))
        return reply.get("value")

    def read_artifact(self, artifact_id: str) -> bytes:
        """The bytes of an artifact (as the invoker may read it)."""
        if not isinstance(artifact_id, str):
            raise TypeError(f"artifact id must be a str, not {type(artifact_id).__name__}")
        import binascii

        value = self._call("read_artifact", {"id": artifact_id})
        if not isinstance(value, str):
            raise WorldError("malformed reply")
        return binascii.a2b_base64(value)

    def transfer(self, to: str, amount: int) -> None:
        """Pay ``amount`` scrip from the invoker to ``to``."""
        if not isinstance(to, str):
            raise TypeError(f"recipient must be a str, not {type(to).__name__}")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"amount must be an int, not {type(amount).__name__}")
        self._call("transfer", {"to": to, "amount": amount})

    def result(self, value: Any) -> None:
        """Set the code's result (JSON-able); takes precedence over a global ``result``."""
        self._result, self._has_result = value, True


def _agent_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` with only the agent's frames (the bootstrap's are noise to it)."""
    import traceback

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
    return json.dumps({"op": "done", "ok": False, "error_code": code, "error": error}).encode()


def _run_code(code: str, world: World, max_value: int) -> bytes:
    """Compile and run the agent code; return the ``done`` frame describing how it ended."""
    import builtins
    import linecache

    linecache.cache[AGENT_FILE] = (len(code), None, code.splitlines(True), AGENT_FILE)
    glb: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, "world": world}
    try:
        try:
            exec(compile(code, AGENT_FILE, "exec", dont_inherit=True), glb)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
    except MemoryError as exc:
        _only_the_runner(world, 1)
        return _failed("memory_exceeded", _agent_traceback(exc))
    except BaseException as exc:
        _only_the_runner(world, 1)
        return _failed("code_error", _agent_traceback(exc))
    _only_the_runner(world, 0)
    value = world._result if world._has_result else glb.get("result")
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
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


# --- confinement ---------------------------------------------------------------------------------------


def _blocked_ancestor(path: str) -> str | None:
    """The topmost ancestor of ``path`` that others may not traverse (e.g. a 0700 ``/root``)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _drop_root() -> None:
    """Root becomes nobody for good: no groups, uid/gid nobody."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    assert os.getuid() == os.geteuid() == NOBODY and os.getgid() == NOBODY


def _map_ids(inside: int, outside_uid: int, outside_gid: int) -> None:
    """Map ``inside`` in the user namespace just entered to one uid and gid of its parent (one id is
    all an unprivileged process may map). setgroups must be denied first: the kernel refuses an
    unprivileged ``gid_map`` otherwise."""
    _prctl(_PR_SET_DUMPABLE, 1)  # a non-dumpable process's /proc/self files belong to root: unwritable
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", f"{inside} {outside_uid} 1")
    _write_file("/proc/self/gid_map", f"{inside} {outside_gid} 1")
    # Keeps the processes that hold this namespace's capabilities (this one, the PID namespace's init)
    # out of reach of the code: it runs as the same uid outside, and ptrace (or /proc/<pid>/root,
    # /proc/<pid>/mem) between same-uid processes is refused only for a non-dumpable target.
    _prctl(_PR_SET_DUMPABLE, 0)


def _new_mount_namespace(applied: list[str]) -> bool:
    """Enter a new mount namespace: as root directly, else together with a new user namespace.

    Unprivileged (the image's user), the mount namespace is made with a user namespace in which this
    process is root (uid 0 mapped to its own uid, ``userns`` in the list): that gives it the
    capabilities to mount, in this mount namespace only. The code must never hold them: see
    ``_nested_user_namespace``. Root that may not unshare (no CAP_SYS_ADMIN) first becomes nobody, so
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
    _map_ids(0, uid, gid)
    applied.append("userns")
    return True


def _setup_mounts(hide: list[str], tmp_bytes: int, applied: list[str]) -> None:
    """A private mount namespace: read-only host, private temp dirs, hidden paths, stdlib readable."""
    if not _new_mount_namespace(applied):
        return  # refused by the host: the code sees the host's mounts (with nobody's permissions)
    # Without private propagation our mounts would appear on the host: never mount anything then.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    applied.append("mountns")
    # The interpreter's own library must stay importable by nobody after the masking below.
    libs = sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)})
    libs = [p for p in libs if not any(q != p and _under(p, q) for q in libs)]
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in libs}
    try:
        _read_only_mounts("/")
        applied.append("rofs")
        if "userns" in applied:
            # The runner writes its nested namespace's id maps under /proc; where no /proc of the
            # sandbox's own can be mounted over it (see _init), that is this one. Its read-only
            # submounts (/proc/sys ...) stay read-only, and the code never sees it (_nested_user_namespace).
            _read_only_mounts("/proc", writable=True)
    except OSError:
        pass  # old kernel: writes outside the tmpfs below are then stopped by file permissions only
    for path in hide:
        p = os.path.realpath(path)
        if not os.path.lexists(p):
            continue
        if os.path.isdir(p):
            _hide_dir(p)
        else:
            _mount("/dev/null", p, None, _MS_BIND)
            _mount(None, p, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # One tmpfs (one size bound) serves /tmp, /var/tmp and /dev/shm: staged on /tmp, then its
    # subdirectories are bound into place and the staging root is covered by its own "tmp".
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmp_bytes},nr_inodes=16384,mode=755")
    for sub, target in (("var-tmp", "/var/tmp"), ("shm", "/dev/shm"), ("tmp", "/tmp")):
        os.mkdir(f"/tmp/{sub}", 0o1777)
        os.chmod(f"/tmp/{sub}", 0o1777)  # mkdir is subject to the umask
        if os.path.isdir(target):
            _mount(f"/tmp/{sub}", target, None, _MS_BIND)
    os.mkdir(WORKDIR, 0o700)
    if "userns" not in applied:  # in a user namespace the code's uid (see _nested_user_namespace) owns it
        os.chown(WORKDIR, NOBODY, NOBODY)
    # Libraries behind a directory nobody may not traverse (pyenv's /root) or under a tmpfs we just
    # mounted: mask the blocking directory with a tmpfs and bind the library back, read-only.
    masks = {a for p in libs if (a := _blocked_ancestor(p)) is not None and not any(_under(a, h) for h in hide)}
    for a in masks:
        _mount("tmpfs", a, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,nr_inodes=256,mode=755")
    for p, fd in keep.items():
        st, here = os.fstat(fd), os.stat(p) if os.path.exists(p) else None
        if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            continue
        if any(_under(p, h) for h in hide):
            continue  # the caller hid it: hiding wins
        os.makedirs(p, 0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", p, None, _MS_BIND | _MS_REC)
        _mount(None, p, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for a in masks:
        _mount(None, a, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for fd in keep.values():
        os.close(fd)


def _hide_dir(path: str) -> None:
    """An empty, read-only tmpfs over ``path``."""
    _mount("tmpfs", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,nr_inodes=2,mode=555")


def _mount_proc(own_pidns: bool) -> None:
    """A /proc that shows only the sandbox's processes (its own PID namespace), or hides the host's
    processes of other users (``hidepid=2``) when there is no PID namespace."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None if own_pidns else "hidepid=2")


def _set_rlimits(limits: dict[str, Any]) -> None:
    """Per-process limits, lowered while still root so that nobody cannot raise them again.

    ``RLIMIT_AS`` is the process's address space at this point (the interpreter, its libraries and
    what the bootstrap imported: a baseline of some tens of MB, read from ``VmSize``) plus
    ``memory_bytes``: the code gets ``memory_bytes`` of its own. ``RLIMIT_CPU`` has whole-second
    granularity (soft ``ceil(cpu_seconds)``, SIGXCPU; hard one more, SIGKILL); the parent enforces the
    exact figure over the whole tree from the cgroup when it has one. ``RLIMIT_NPROC`` counts all
    processes and threads of uid nobody on the host. ``RLIMIT_FSIZE`` is ``memory_bytes``: a file
    lives in the private tmpfs, which is memory.
    """
    import resource

    baseline = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmSize:"):
                baseline = int(line.split()[1]) * 1024
                break
    cpu = max(1, -int(-float(limits["cpu_seconds"]) // 1))
    mem = int(limits["memory_bytes"])
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (baseline + mem, baseline + mem)),
        (resource.RLIMIT_NPROC, (int(limits["max_processes"]),) * 2),
        (resource.RLIMIT_NOFILE, (int(limits["max_open_files"]),) * 2),
        (resource.RLIMIT_FSIZE, (mem, mem)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),
    ):
        resource.setrlimit(res, value)


#: Imported before dropping root when there is no mount namespace: the standard library may then be
#: out of nobody's reach (pyenv keeps it under a 0700 /root). The bootstrap's own needs come first.
_PRELOAD = (
    "binascii linecache traceback json math re random collections itertools functools string datetime time "
    "hashlib base64 statistics heapq bisect textwrap struct decimal fractions operator copy dataclasses typing enum"
)


def _preload() -> None:
    for name in _PRELOAD.split():
        try:
            __import__(name)
        except ImportError:
            continue


#: Set by the PID namespace's init when it mounted a /proc of that namespace (inherited by the runner).
_proc_private = False


def _nested_user_namespace() -> None:
    """Give up, for good, the capabilities that the sandbox's user namespace (``userns``) gave.

    The code runs as the same uid outside as the worker (an unprivileged process can map no other),
    so what keeps it from the hidden paths is the hiding mounts alone, and with CAP_SYS_ADMIN over
    their mount namespace it could simply unmount them. Two independent locks, both needed:

    * a nested user namespace with a mount namespace of its own, where the code is uid and gid
      nobody (mapped to the outer namespace's root, i.e. the same uid outside). Every mount copied
      into a mount namespace owned by a less privileged user namespace is locked by the kernel
      (``MNT_LOCKED``, and its read-only/nosuid/nodev/noexec flags): no capability in the nested
      namespace can unmount, move or loosen it, or bind its parent without it. Dropping
      capabilities alone would leave the code in the namespace where the hiding mounts are *not*
      locked, one regained capability away from undoing them; and whatever user namespace the
      code makes itself is again less privileged, so its copies are locked as well.
    * every capability dropped (bounding set, ambient, then effective/permitted/inheritable; and
      ``no_new_privs`` in ``_become_nobody``): the creator of a user namespace holds all capabilities
      in it, which would still let the code mount over paths in its own view or configure
      namespaces it owns. Without them it cannot mount at all.

    When the PID namespace's init could not mount a /proc of its own (a container engine's masked
    /proc makes the kernel refuse), the host's /proc is covered instead: its same-uid processes (the
    worker) are otherwise reachable through /proc/<pid>/root.
    """
    _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
    _map_ids(NOBODY, 0, 0)
    if not _proc_private:
        _hide_dir("/proc")
    for cap in range(64):
        try:
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError:
            break  # EINVAL: past the last capability this kernel knows
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def _become_nobody(parent: int) -> bool:
    """Drop root for good: no groups, uid/gid nobody, no way back through setuid binaries.

    Started by an unprivileged worker there is no root to drop (False is returned, and ``uid`` is
    missing from the isolation list): the code then runs as the worker's user, confined by the
    user namespaces of ``_nested_user_namespace`` when the host allows them."""
    dropped = os.geteuid() == 0
    if dropped:
        _drop_root()
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_DUMPABLE, 0)  # same-uid processes (other sandboxes) cannot ptrace this one
    # A credential change clears the parent-death signal: set it (again) now.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    return dropped


def _runner(job: dict[str, Any], applied: list[str]) -> NoReturn:
    """Confine this process for good and run the code. Never returns."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the outer's and init's mask must not reach the code
    parent = os.getppid()
    limits = job["limits"]
    if "mountns" not in applied:
        _preload()
    _set_rlimits(limits)  # before the nested user namespace, which records RLIMIT_NPROC as its maximum
    applied.append("rlimits")
    if "userns" in applied:
        _nested_user_namespace()
    applied += ["uid", "nonewprivs"] if _become_nobody(parent) else ["nonewprivs"]
    os.closerange(CHANNEL_FD + 1, 1 << 16)
    home = WORKDIR if "mountns" in applied else "/"
    os.chdir(home)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"})
    world = World(job["args"], os.getpid())
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


def _exit_status(status: int, encoded: bool = False) -> int:
    """Encode a wait status for our own exit: the code's exit code (below 128), or 128 + the signal.

    ``encoded``: the status is an init's, whose exit code already is such an encoding."""
    if os.WIFSIGNALED(status):
        return _SIGNALLED + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if encoded else os.WEXITSTATUS(status) & 0x7F


def _init(job: dict[str, Any], applied: list[str], outer: int) -> NoReturn:
    """Pid 1 of the sandbox's PID namespace: fork the runner, reap everything, exit with the runner.

    ``outer`` is a pidfd of the outer process: its parent is outside the namespace, so ``getppid``
    says 0 whether it is alive or not, and the pidfd is how to tell that it did not die before the
    parent-death signal was armed.
    """
    import select

    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([outer], [], [], 0)[0]:
        os._exit(1)
    os.close(outer)
    global _proc_private
    try:
        if "mountns" in applied:
            _mount_proc(own_pidns=True)
            _proc_private = True
    except OSError as exc:
        if "userns" not in applied:
            _fail(f"sandbox setup failed: {exc}")
        # A container's masked /proc (mount_too_revealing): the runner covers /proc instead.
    pid = os.fork()
    if pid == 0:
        _runner(job, applied)
    os.close(CHANNEL_FD)  # only the runner may talk; its end of the channel closing means it is gone
    # Everything is killed and reaped here, while this process still reaps normally: when an init
    # exits, the kernel autoreaps what is left in its namespace, and their CPU is lost to wait4.
    status = _wait_for(pid, _kill_namespace)
    _reap_all(_kill_namespace)
    os._exit(_exit_status(status))


def _kill_namespace() -> None:
    try:
        os.kill(-1, signal.SIGKILL)  # from a PID namespace's init: everything in it but itself
    except ProcessLookupError:
        return  # nothing left


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _kill_children() -> None:
    """SIGKILL our direct children: unreaped, so their pids cannot have been reused. A killed
    child's own children are reparented to us (a subreaper) and killed on a later call."""
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


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


def _child(job: dict[str, Any], applied: list[str], outer: int) -> NoReturn:
    """What the outer process forks: the PID namespace's init, or the runner directly.

    ``outer`` is a pidfd of the outer process (see ``_init``)."""
    try:
        if "pidns" in applied:
            assert os.getpid() == 1, "the first child in a new PID namespace is its init"
            _init(job, applied, outer)
        os.close(outer)
        _runner(job, applied)
    except BaseException as exc:  # never fall back into the outer process's code
        _fail(f"sandbox setup failed: {type(exc).__name__}: {exc}")


def _wait_for(pid: int, on_term: Callable[[], None]) -> int:
    """Wait for our child ``pid``, reaping orphans meanwhile, calling ``on_term`` on SIGTERM; return
    its wait status. SIGTERM and SIGCHLD must be blocked.

    Signals are taken synchronously (``sigwaitinfo``), not by a handler, so ``pid`` is only ever
    signalled while it is still unreaped: it cannot have been reused by then.
    """
    while True:
        if signal.sigwaitinfo({signal.SIGTERM, signal.SIGCHLD}).si_signo == signal.SIGTERM:
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


def main() -> NoReturn:
    """The outer process: confine what can be confined, fork, wait, clean up, exit."""
    # SIGTERM (the worker stopping us) and SIGCHLD are taken by sigwaitinfo once the child runs.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    fd, worker = int(sys.argv[1]), int(sys.argv[2])
    if fd != CHANNEL_FD:
        os.dup2(fd, CHANNEL_FD)
        os.close(fd)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker:
        os._exit(1)  # the worker died before we could tie our life to it
    try:
        job = _read_frame()
    except (OSError, ValueError, EOFError) as exc:
        _fail(f"bad job: {exc}")
    skip = set(job.get("skip", ()))
    applied: list[str] = []
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans stay ours to kill and to be charged for
        if "mountns" not in skip:
            _setup_mounts(list(job["hide"]), int(job["limits"]["memory_bytes"]), applied)
        for name, flag in (("netns", _CLONE_NEWNET), ("ipcns", _CLONE_NEWIPC), ("pidns", _CLONE_NEWPID)):
            if name in skip:
                continue
            try:
                _unshare(flag)  # a new netns has only a loopback, and it is down: no network at all
            except OSError:
                continue  # refused by the host: recorded by its absence from the list
            applied.append(name)
        if "pidns" not in applied and "mountns" in applied and "userns" not in applied:
            _mount_proc(own_pidns=False)  # in a user namespace the runner covers /proc instead
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
        _child(job, applied, outer)
    os.close(outer)
    os.close(CHANNEL_FD)
    # Let go of the output pipe: the worker then sees EOF as soon as the sandbox side is gone.
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    if "pidns" in applied:
        # The init cleans up (and reaps, so that the CPU is charged) when asked to stop.
        status = _wait_for(pid, lambda: os.kill(pid, signal.SIGTERM))
    else:
        status = _wait_for(pid, lambda: os.kill(pid, signal.SIGKILL))
    _reap_all(_kill_children)
    os._exit(_exit_status(status, encoded="pidns" in applied))


if __name__ == "__main__":
    main()
