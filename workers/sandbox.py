"""Running agent-written Python confined, from inside a worker process.

``run_confined(code, args, limits, handle)`` forks a confined child from this process's zygote: a
``python -I -S`` (no site-packages, no environment-driven configuration) running
``workers/sandbox_boot.py``, started once (``_Zygote``); the child confines itself and then runs the
code with a ``world`` object in its globals. The worker talks to it over a socketpair (the child's
fd 3) and serves the code's requests (``world.read_artifact``, ``world.transfer``) through
``handle``, which forwards them to the supervisor. Limits are enforced and usage is measured by the
kernel, not by the child: the child's word is only taken for what happened inside the code (its
result, its exception), never for what it cost; and a result is accepted only as strict JSON
(``result_error``).

Isolation steps, in the order they are applied, and what happens when the host refuses one
(``Confined.isolation`` lists the steps that were applied, so a fallback is always visible;
``isolation_available()`` says what this host allows; ``skip`` may leave out those in ``STEPS``):

``userns``     (not root, or root without CAP_SYS_ADMIN, which first becomes nobody) the namespaces
               below are made inside a user namespace in which the bootstrap is root (its own uid
               outside), which lets it mount. Without one an unprivileged worker refuses to run code
               with a non-empty ``hide`` (it would run as the worker's own user): ``sandbox_error``.
``mountns``    a private mount namespace (propagation private).
``rofs``       the new root read-only, nosuid, nodev (``mount_setattr``; a remount per mount before 5.12).
``minroot``    a minimal root (``workers.rootfs``): a tmpfs holding read-only binds of the interpreter,
               its loader, libraries and standard library (nothing else of the host: no data
               directory, no sockets, no ``/sys``, no ``/etc`` but the loader cache, no runtime source),
               ``/dev/{null,zero,urandom}``, a private ``/tmp`` sized ``memory_bytes`` (``/dev/shm``
               leads there; the working directory ``/tmp/work``), moved into with ``pivot_root`` and
               the host's root detached. A path in ``hide`` inside one of the binds is covered.
               Fallback (no mount namespace): the host's file system, guarded by file permissions only.
``netns``      a network namespace with only a loopback, which is down: no network, no abstract unix
               sockets of the host. Fallback: the host's network.
``ipcns``      SysV IPC and POSIX message queues of its own. ``utsns``: a host name of its own
               (``sandbox``; a container engine that refuses ``sethostname`` leaves the container's).
``cgroupns``   ``/proc/self/cgroup`` rooted at the invocation's own cgroup: no host cgroup paths.
``pidns``      a PID namespace whose init is the trusted bootstrap: the code sees only its own
               processes, cannot signal anything outside, and everything it forked dies with it.
``proc``       a ``/proc`` of that namespace (``subset=pid``: processes only, no ``sys``, ``keys``,
               ``meminfo``...); none where the kernel refuses one (a container's masked ``/proc``).
``rlimits``    ``RLIMIT_AS`` (``memory_bytes`` over the interpreter's own baseline), ``RLIMIT_NPROC``,
               ``RLIMIT_NOFILE`` (which also bounds socket and pipe buffers), ``RLIMIT_FSIZE``,
               ``RLIMIT_CORE`` 0, ``RLIMIT_CPU`` as a backstop (see ``sandbox_boot._set_rlimits``).
``uid``        (root workers) ``setgroups([])`` and uid/gid nobody (65534).
``nonewprivs`` ``PR_SET_NO_NEW_PRIVS``: no privilege back through setuid binaries.
``keyring``    the code runs in a user namespace of its own as nobody, every capability dropped (its
               mounts locked: ``MNT_LOCKED``), with a fresh, empty session keyring: no keyring (the
               worker's session keyring, uid 65534's user keyrings) is shared with anything else.
``seccomp``    the filter of ``workers.seccomp``, installed last: keyrings, mounts, namespaces, bpf,
               userfaultfd, perf, io_uring, ptrace, memfd, SysV shm, file locks ... refused with EPERM.
               Where it cannot be installed the invocation fails (``sandbox_error``): it never runs
               without it unless ``skip`` says so.
``cgroup``     (when ``cgroup_parents`` is given and writable) a child cgroup per invocation, joined by
               the bootstrap first thing: the memory limit for the whole tree, its CPU and peak, the
               total CPU enforced every ``_CPU_TICK``, an OOM kill inside it ends the invocation
               (``memory_exceeded``), ``pids.max`` with a ``pids`` parent, everything killed at the end.
``memwatch``   (no memory cgroup) the bootstrap's outer process samples the tree every 10 ms — the
               anonymous and shared memory of its processes plus the bytes in its ``/tmp``, and its
               CPU — kills it over the quota (``memory_exceeded``) or the CPU limit, and reports the
               peak and CPU it saw, never below what the kernel reported (``sandbox_boot._Watch``).

What is left (said plainly in the README's threat model): socket and pipe buffers are bounded by
``RLIMIT_NOFILE`` and the default buffer sizes, not measured without a cgroup; ``RLIMIT_NPROC`` is
per uid, so concurrent sandboxes share ``max_processes`` unless a ``pids`` cgroup parent is given; the
code can read the files of the interpreter and its libraries, and concurrent invocations can signal
each other through timing (CPU contention, the page cache); invocations of one process share the
zygote's address-space layout.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import marshal
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from runtime.host.cgroups import CgroupSet, discover
from runtime.protocol import InvokeEnding
from workers import rootfs, seccomp
from workers.sandbox_boot import EXIT_RECORD, MAX_FRAME

log = logging.getLogger("workers.sandbox")

#: How confined code ended; the wire's own vocabulary, so a report needs no translation.
ErrorCode = InvokeEnding
#: The requests agent code can make, and the parameters ``handle`` receives for each.
Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
#: Isolation steps that ``skip`` may name (for tests, and for hosts where a step misbehaves).
STEPS = ("mountns", "netns", "ipcns", "utsns", "cgroupns", "pidns", "seccomp")

_BOOT = str(Path(__file__).with_name("sandbox_boot.py"))
#: What the child's interpreter runs (``-c``): the bootstrap's code object arrives as the first frame
#: on the channel, compiled once by this worker (``_boot_code``). Run as a script, the bootstrap would
#: be compiled from source in every invocation (scripts get no bytecode cache; nor does an image
#: whose code directory its user cannot write): most of a bare interpreter's start-up again.
_LOADER = """import marshal, os, sys
def read(n):
    b = b''
    while len(b) < n:
        c = os.read(int(sys.argv[1]), n - len(b))
        if not c:
            os._exit(1)
        b += c
    return b
exec(marshal.loads(read(int.from_bytes(read(4), 'big'))), {'__name__': '__main__'})
"""
#: The bootstrap's whole environment: nothing of the worker's (secrets included) reaches the child.
_CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_STDERR_KEEP = 16 << 10  # the bootstrap's own diagnostics: only used in sandbox_error messages
_CPU_TICK = 0.05  # how often total CPU is checked against the limit when a cgroup measures it
_GRACE = 1.0  # how long the bootstrap gets to exit (or clean up when asked) before it is killed
_MAX_ERROR = 64 << 10
_seq = itertools.count()


class Limits(msgspec.Struct, frozen=True):
    """What one confined invocation may use. Per invocation, not per process."""

    cpu_seconds: float = 5.0
    memory_bytes: int = 256 << 20
    wall_seconds: float = 10.0
    max_processes: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not (self.cpu_seconds > 0 and self.wall_seconds > 0 and self.memory_bytes > 0):
            raise ValueError(f"limits must be positive: {self}")
        if self.max_processes < 1 or self.max_open_files < 8:
            raise ValueError(f"max_processes must be >= 1 and max_open_files >= 8: {self}")
        if not 0 < self.max_output_bytes <= MAX_FRAME - (64 << 10):
            raise ValueError(f"max_output_bytes must be in 1..{MAX_FRAME - (64 << 10)}: {self}")


class Confined(msgspec.Struct, frozen=True):
    """How a confined invocation ended, and what it used (to be charged to the caller)."""

    ok: bool
    value: bytes  # JSON of the code's result ("null" when it set none); b"" when not ok
    error: str
    error_code: ErrorCode
    cpu_seconds: float  # all processes of the invocation, bootstrap included
    peak_memory_bytes: int  # the whole tree with a memory cgroup, else the largest process
    wall_seconds: float
    stdout: bytes  # what the code wrote to stdout and stderr, at most max_output_bytes
    isolation: tuple[str, ...]


# --- frames from the child ---------------------------------------------------------------------------


class _ReadArtifactParams(msgspec.Struct, forbid_unknown_fields=True):
    id: str


class _TransferParams(msgspec.Struct, forbid_unknown_fields=True):
    to: str
    amount: int
    asset: str = "scrip"


class _Ready(msgspec.Struct, tag="ready", tag_field="op", forbid_unknown_fields=True):
    isolation: list[str]


class _ReadArtifact(msgspec.Struct, tag="read_artifact", tag_field="op", forbid_unknown_fields=True):
    params: _ReadArtifactParams


class _Transfer(msgspec.Struct, tag="transfer", tag_field="op", forbid_unknown_fields=True):
    params: _TransferParams


class _Done(msgspec.Struct, tag="done", tag_field="op", forbid_unknown_fields=True):
    ok: bool
    value: msgspec.Raw = msgspec.Raw(b"null")
    error: str = ""
    error_code: str = ""


class _Report(msgspec.Struct, forbid_unknown_fields=True):
    """What the bootstrap's outer process measured of the whole tree when no cgroup did (``_Watch``
    in ``sandbox_boot``), on a pipe only it holds."""

    peak: int
    cpu: float
    samples: int
    over: Literal["", "memory", "cpu"]


_decode = msgspec.json.Decoder(_Ready | _ReadArtifact | _Transfer | _Done).decode
_decode_report = msgspec.json.Decoder(_Report).decode
#: What a ``done`` frame may claim once the code runs (anything else becomes code_error).
_CODE_ENDINGS: frozenset[str] = frozenset({"code_error", "memory_exceeded", "output_too_large"})


def _frame(payload: bytes) -> bytes:
    assert len(payload) <= MAX_FRAME
    return len(payload).to_bytes(4, "big") + payload


@functools.cache
def _boot_code() -> bytes:
    """The bootstrap, compiled (``marshal`` of its code object: the loader runs the same interpreter)."""
    return marshal.dumps(compile(Path(_BOOT).read_text(), _BOOT, "exec", dont_inherit=True))


def _refusal(error: str) -> bytes:
    return marshal.dumps({"ok": False, "error": error[:_MAX_ERROR]})


# --- per-invocation cgroups --------------------------------------------------------------------------


# --- the zygote -------------------------------------------------------------------------------------


class _Zygote:
    """The bootstrap's zygote (``sandbox_boot.serve``): one per process, started at its first
    invocation, forked for each one after that.

    A fresh interpreter per invocation would cost its whole start-up (and the bootstrap's imports)
    every time: more than everything else the sandbox does. The zygote pays it once; each invocation
    is a fork of the same pristine process (it never runs agent code, holds no secret, and keeps no
    state of one invocation into the next). What it spends forking and reaping an outer is added to
    that invocation's CPU; its own start-up is this process's (it is its child, reaped by
    ``shutdown``). It dies with the thread that started it (the parent-death signal), so
    ``run_confined`` must be called from a thread that lives as long as the process sandboxes code
    (a worker's main thread); one invocation runs at a time (``lock``).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The interpreter itself, not the worker's virtual-environment link to it: that path is not
        # in the root (and the code can read its command line in /proc).
        argv = [os.path.realpath(sys.executable), "-I", "-S", "-c", _LOADER, str(theirs.fileno())]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                env=_CHILD_ENV,
                cwd="/",  # a cwd inside a hidden directory would be a way around the mount
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.sendall(_frame(_boot_code()))
        self.sock = ours
        return ours

    def spawn(self, fds: Sequence[int]) -> tuple[int, int]:
        """Fork an outer process with ``fds`` (channel, report, stdout, stderr); its pid and a pidfd.
        A zygote that died (its thread ended, it was killed) is started again, once."""
        for attempt in (1, 2):
            sock = self.sock or self._start()
            try:
                socket.send_fds(sock, [b"S"], list(fds))
                msg, got, _, _ = socket.recv_fds(sock, 4, 1)
            except OSError:
                msg, got = b"", []
            if len(msg) == 4 and len(got) == 1:
                return int.from_bytes(msg, "big", signed=True), got[0]
            for fd in got:
                os.close(fd)
            self.close()
            if attempt == 2:
                raise OSError("the sandbox's zygote does not answer")
        raise AssertionError("unreachable")

    def reaped(self, pid: int) -> tuple[int, float, int] | None:
        """Once outer ``pid`` has exited: its wait status, the CPU of its tree and of its fork, the
        tree's largest high-water mark (bytes); None when the zygote is gone."""
        size = struct.calcsize(EXIT_RECORD)
        data = b""
        if self.sock is not None:
            self.sock.settimeout(_GRACE + 10.0)
            with contextlib.suppress(OSError):
                while len(data) < size and (chunk := self.sock.recv(size - len(data))):
                    data += chunk
            self.sock.settimeout(None)
        if len(data) < size:
            self.close()
            return None
        got, status, cpu, spent, maxrss = struct.unpack(EXIT_RECORD, data)
        assert got == pid, f"the zygote reaped {got}, not {pid}"
        return status, cpu + spent, maxrss * 1024

    def close(self) -> None:
        """Let the zygote go (it exits at the end of its socket) and reap it."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


_ZYGOTE = _Zygote()


def shutdown() -> None:
    """Stop this process's zygote, if it has one, and reap it (a worker does before it exits, so that
    the zygote's own CPU is in what the kernel counts for the worker)."""
    with _ZYGOTE.lock:
        _ZYGOTE.close()


# --- one invocation ----------------------------------------------------------------------------------

_End = Literal["done", "exit", "deadline", "cpu", "memory", "output", "protocol", "internal", "cancelled"]


class _Invocation:
    """One running confined child, the worker's end of its channel and pipes, and how it ended."""

    def __init__(
        self,
        pid: int,
        pidfd: int,
        sock: socket.socket,
        fds: tuple[int, int, int],
        cg: CgroupSet | None,
        limits: Limits,
        handle: Handler,
        job: bytes,
        started: float,
        stop_fd: int | None = None,
    ) -> None:
        self.pid, self.pidfd, self.sock, self.cg, self.limits, self.handle = pid, pidfd, sock, cg, limits, handle
        self.out_fd, self.err_fd, self.report_fd = fds
        self.report: _Report | None = None
        self.deadline = started + limits.wall_seconds
        self.inbuf = bytearray()
        self.outbuf = bytearray(_frame(job))  # the first thing the outer reads
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.ready: tuple[str, ...] | None = None
        self.done: _Done | None = None
        self.ended: _End | None = None
        self.detail = ""
        self.exited = False
        self.status = 0
        self.rusage_cpu = 0.0
        self.rusage_peak = 0
        self.stop_fd = stop_fd

    def end(self, why: _End, detail: str = "") -> None:
        if self.ended is None:
            self.ended, self.detail = why, detail

    def running(self) -> bool:
        """Not ended yet (a method: attribute narrowing would not see ``end`` called by a helper)."""
        return self.ended is None

    # -- the watch loop

    def watch(self) -> None:
        """Serve the child until it is done, exits, breaks a limit or breaks the protocol."""
        self.sock.setblocking(False)
        chan = self.sock.fileno()
        poller = select.poll()
        for fd in (self.out_fd, self.err_fd, self.pidfd):
            poller.register(fd, select.POLLIN)
        if self.stop_fd is not None:
            poller.register(self.stop_fd, select.POLLIN)
        open_fds = {chan, self.out_fd, self.err_fd}
        cpu_watch = self.cg is not None and self.cg.cpu_seconds() is not None
        oom_watch = self.cg is not None and self.cg.measures_memory()
        while self.running():
            if chan in open_fds:
                # One request at a time: nothing more is read until the last answer has been sent.
                poller.register(chan, select.POLLOUT if self.outbuf else select.POLLIN)
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.end("deadline")
                break
            wait = min(left, _CPU_TICK) if cpu_watch or oom_watch else left
            events = poller.poll(math.ceil(wait * 1000))
            # The pidfd last: a "done" that arrived with the exit must be seen first.
            for fd, ev in sorted(events, key=lambda e: e[0] == self.pidfd):
                if fd == chan:
                    if not self._on_channel(ev):
                        open_fds.discard(fd)
                        poller.unregister(fd)
                elif fd in (self.out_fd, self.err_fd):
                    if not self._on_output(fd):
                        open_fds.discard(fd)
                        poller.unregister(fd)
                elif fd == self.pidfd:
                    self.end("exit")
                elif fd == self.stop_fd:
                    self.end("cancelled")
                if not self.running():
                    break
            if cpu_watch and self.running():
                assert self.cg is not None
                used = self.cg.cpu_seconds()
                if used is not None and used > self.limits.cpu_seconds:
                    self.end("cpu")
            # The kernel killed a process of the tree for going over the memory limit: the
            # invocation is over its quota, whatever the survivors do (as the no-cgroup watch has it).
            if oom_watch and self.running():
                assert self.cg is not None
                if self.cg.oom_kills() > 0:
                    self.end("memory")

    def _on_channel(self, ev: int) -> bool:
        """Move bytes on the channel; False once it is closed."""
        try:
            if self.outbuf and ev & select.POLLOUT:
                del self.outbuf[: self.sock.send(self.outbuf)]
                if not self.outbuf:
                    self._frames()  # a request that arrived while we were answering
                return True
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                data = self.sock.recv(1 << 16)
                if not data:
                    return False
                self.inbuf += data
                self._frames()
        except BlockingIOError:
            return True
        except OSError:  # the child's end is gone
            return False
        return True

    def _frames(self, serve: bool = True) -> None:
        """Handle every complete frame in ``inbuf`` (stopping while an answer is pending)."""
        while self.ended is None and not self.outbuf and len(self.inbuf) >= 4:
            n = int.from_bytes(self.inbuf[:4], "big")
            if not 0 < n <= MAX_FRAME:
                self.end("protocol", f"a frame of {n} bytes (the limit is {MAX_FRAME})")
                return
            if len(self.inbuf) < 4 + n:
                return
            payload = bytes(self.inbuf[4 : 4 + n])
            del self.inbuf[: 4 + n]
            try:
                msg = _decode(payload)
            except (msgspec.MsgspecError, ValueError, RecursionError) as exc:  # bad UTF-8, nesting too deep
                self.end("protocol", f"a malformed frame ({type(exc).__name__}: {exc})")
                return
            self._on_message(msg, serve)

    def _on_message(self, msg: _Ready | _ReadArtifact | _Transfer | _Done, serve: bool) -> None:
        if isinstance(msg, _Ready):
            if self.ready is not None:
                self.end("protocol", "a second 'ready' frame")
            else:
                self.ready = tuple(msg.isolation)
        elif isinstance(msg, _Done):
            if self.ready is None and msg.ok:
                self.end("protocol", "'done' before 'ready'")
            else:
                self.done = msg
                self.end("done")
        elif self.ready is None:
            self.end("protocol", "a request before 'ready'")
        elif serve:
            op, params = (
                ("read_artifact", msgspec.structs.asdict(msg.params))
                if isinstance(msg, _ReadArtifact)
                else ("transfer", msgspec.structs.asdict(msg.params))
            )
            self.outbuf += _frame(self._serve(op, params))

    def _serve(self, op: str, params: dict[str, Any]) -> bytes:
        """Ask ``handle`` and encode its answer (``marshal``: see ``sandbox_boot``); a failing handler
        is a refusal, not a crash."""
        try:
            answer = self.handle(op, params)
        except Exception as exc:
            log.debug("sandbox request %s failed", op, exc_info=True)
            return _refusal(f"{type(exc).__name__}: {exc}")
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            err = answer.get("error") if isinstance(answer, dict) else None
            return _refusal(str(err or f"{op} refused"))
        value = answer.get("value")
        if op == "read_artifact":
            if not isinstance(value, bytes | bytearray | memoryview):
                return _refusal(f"{op}: the handler returned no bytes")
            reply = marshal.dumps({"ok": True, "value": bytes(value)})
            if len(reply) > MAX_FRAME:
                return _refusal(f"{op}: {len(value)} bytes is over the channel limit")
            return reply
        return marshal.dumps({"ok": True, "value": None})

    def _on_output(self, fd: int) -> bool:
        """Read the child's stdout or stderr (bounded); False at EOF."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        if fd == self.out_fd:
            self.stdout += data
            if len(self.stdout) > self.limits.max_output_bytes:
                self.end("output")
        elif len(self.stderr) < _STDERR_KEEP:
            self.stderr += data[: _STDERR_KEEP - len(self.stderr)]
        return True

    # -- the end

    def _wait_exit(self, timeout: float) -> bool:
        if self.exited:
            return True
        self.exited = bool(select.select([self.pidfd], [], [], max(0.0, timeout))[0])
        return self.exited

    def stop(self) -> None:
        """Make sure nothing of the sandbox runs any more, and reap the bootstrap.

        The bootstrap is asked first (SIGTERM: it kills its child, reaps and kills whatever is
        left under it, and exits, so its ``wait4`` carries the CPU of the whole tree); the cgroup
        is emptied alongside; SIGKILL when it does not exit within the grace period.
        """
        if self.ended == "exit":
            self.exited = True
        if not self.exited and self.ended == "done":
            self._wait_exit(_GRACE)  # the runner exits right after "done"
        if not self.exited:
            if self.cg is not None:
                self.cg.kill(spare=self.pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)
            if not self._wait_exit(_GRACE):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                if self.cg is not None:
                    self.cg.kill()
                if not self._wait_exit(10.0):
                    log.error("sandbox bootstrap %d does not die; leaving it", self.pid)
                    _ZYGOTE.close()  # its wait for this one would never end
                    return
        reaped = _ZYGOTE.reaped(self.pid)
        if reaped is None:  # the zygote died with it: nothing measured the tree but the cgroup
            self.status = signal.SIGKILL
        else:
            # The outer's tree as wait4 counts it (the zygote reaped it), and the zygote's fork of it.
            self.status, self.rusage_cpu, self.rusage_peak = reaped
        self.report = self._read_report()

    def _read_report(self) -> _Report | None:
        """The outer's report, if it wrote one before it exited (it is gone: the read cannot block)."""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.report_fd, 4096):
                data += chunk
        if not data:
            return None
        try:
            return _decode_report(data)
        except msgspec.MsgspecError:
            log.error("sandbox bootstrap %d wrote a malformed report: %r", self.pid, data[:200])
            return None

    def drain(self) -> None:
        """Collect what the dead child left in its channel and pipes (bounded in time and size)."""
        if self.ended == "exit":
            with contextlib.suppress(OSError):
                while data := self.sock.recv(1 << 16):
                    self.inbuf += data
                    if len(self.inbuf) > MAX_FRAME + 4:
                        break
            self.outbuf.clear()  # nobody is left to read an answer
            self.ended = None
            self._frames(serve=False)
            if self.ended is None:
                self.ended = "exit"
        until = time.monotonic() + 0.5
        fds = [self.out_fd, self.err_fd]
        while fds and time.monotonic() < until and len(self.stdout) <= self.limits.max_output_bytes:
            ready, _, _ = select.select(fds, [], [], max(0.0, until - time.monotonic()))
            for fd in ready:
                if not self._on_output(fd):
                    fds.remove(fd)
        if self.ended != "output" and len(self.stdout) > self.limits.max_output_bytes:
            self.ended = "output"

    def close(self) -> None:
        for fd in (self.pidfd, self.report_fd, self.out_fd, self.err_fd):
            os.close(fd)
        self.sock.close()


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _classify(inv: _Invocation, cpu: float, oom: int) -> tuple[ErrorCode, str]:
    """The error code and message of an invocation that did not end in a successful ``done``."""
    lim = inv.limits
    if inv.ended == "cancelled":
        return "cancelled", "the invocation was cancelled by its invoker"
    if inv.ended == "protocol":
        if inv.ready is not None:  # only the code writes on the channel after "ready"
            return "code_error", f"the code broke the channel protocol: {inv.detail}"
        return "sandbox_error", f"the sandbox broke the channel protocol: {inv.detail}"
    if inv.ended == "internal":
        return "sandbox_error", f"internal error while watching the sandbox: {inv.detail}"
    if inv.ended == "output":
        return "output_too_large", f"the code wrote more than {lim.max_output_bytes} bytes of output"
    if inv.ended == "cpu":
        return "cpu_exceeded", f"the code used {cpu:.3f} s of CPU, over its {lim.cpu_seconds} s limit"
    if inv.ended == "memory" or (oom > 0 and inv.ended != "done"):
        return "memory_exceeded", f"killed by the kernel for going over its {lim.memory_bytes} byte memory limit"
    if inv.ended == "deadline":
        return "deadline_exceeded", f"the code ran past its {lim.wall_seconds} s wall-clock limit"
    if inv.report is not None and inv.report.over == "memory":
        held = inv.report.peak
        return "memory_exceeded", f"the invocation's processes and /tmp held {held} bytes, over its {lim.memory_bytes}"
    if inv.report is not None and inv.report.over == "cpu":
        return "cpu_exceeded", f"the code used {cpu:.3f} s of CPU, over its {lim.cpu_seconds} s limit"
    if inv.done is not None:
        d = inv.done
        if inv.ready is None:
            return "sandbox_error", d.error or "the sandbox could not be set up"
        code: ErrorCode = "code_error"
        if d.error_code == "memory_exceeded":
            code = "memory_exceeded"
        elif d.error_code == "output_too_large":
            code = "output_too_large"
        return code, d.error[:_MAX_ERROR] or "the code failed"
    # It exited without a word: read its death from the kernel.
    if os.WIFSIGNALED(inv.status):
        sig = os.WTERMSIG(inv.status)
    else:
        code_ = os.WEXITSTATUS(inv.status)
        sig = code_ - 128 if code_ > 128 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= lim.cpu_seconds):
        return "cpu_exceeded", f"the code used {cpu:.3f} s of CPU, over its {lim.cpu_seconds} s limit"
    stderr = inv.stderr.decode(errors="replace").strip()
    if inv.ready is None:
        return "sandbox_error", "the sandbox failed to start" + (f": {stderr[-2000:]}" if stderr else "")
    if sig:
        return "killed", f"the code was killed by {_signal_name(sig)}"
    return "code_error", f"the code exited (status {os.WEXITSTATUS(inv.status)}) without finishing"


#: The integers a result may hold: 64 bits (signed or not), what msgpack, PostgreSQL and most JSON
#: readers can represent. Floats are finite doubles (JSON has no NaN or Infinity; the strict decoder
#: refuses ``1e999``).
RESULT_INT_RANGE = (-(1 << 63), (1 << 64) - 1)


def result_error(value: bytes) -> str:
    """Why ``value`` (a result as the child sent it) is not acceptable JSON, or "" when it is.

    The bootstrap encodes results strictly, but the code can write its own ``done`` frame: this is
    the check that counts. UTF-8, RFC 8259 syntax, finite numbers, integers in ``RESULT_INT_RANGE``.
    """
    try:
        decoded = msgspec.json.decode(value)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return f"the result is not valid JSON: {type(exc).__name__}: {exc}"
    lo, hi = RESULT_INT_RANGE
    todo = [decoded]
    while todo:
        v = todo.pop()
        if isinstance(v, list):
            todo += v
        elif isinstance(v, dict):
            todo += v.values()
        elif isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:
            text = str(v)
            return f"the result holds an integer outside 64 bits ({text[:24]}{'…' if len(text) > 24 else ''})"
    return ""


def _job(
    code: str, args: object, limits: Limits, hide: Sequence[str], skip: Collection[str], cg: CgroupSet | None
) -> bytes:
    """The first frame the bootstrap reads (``marshal``: see ``sandbox_boot``). Raises ``OSError`` or
    ``ValueError`` when this host has no root plan or no seccomp table the sandbox could use."""
    hidden = [os.path.abspath(h) for h in hide]
    numbers = seccomp.arch().numbers
    job = {
        "code": code,
        "args": args,
        "limits": msgspec.structs.asdict(limits),
        "hide": hidden,
        "skip": list(skip),
        "root": [] if "mountns" in skip else list(rootfs.plan(tuple(hidden))),
        "python": os.path.realpath(sys.executable),
        "seccomp": b"" if "seccomp" in skip else seccomp.program(),
        "nr": {name: numbers[name] for name in ("pivot_root", "keyctl", "mount_setattr")},
        # Without a memory cgroup around the tree, the bootstrap watches it (sandbox_boot._Watch).
        "watch": cg is None or not cg.measures_memory(),
        # Joined by the bootstrap first thing (its interpreter's start-up is outside: see sandbox_boot.main).
        "cgroups": cg.procs_files() if cg is not None else [],
    }
    return marshal.dumps(job)


def _failure(code: ErrorCode, error: str, started: float) -> Confined:
    return Confined(False, b"", error, code, 0.0, 0, time.monotonic() - started, b"", ())


def run_confined(
    code: str,
    args: object,
    limits: Limits,
    handle: Handler,
    *,
    hide: Sequence[str] = (),
    cgroup_parents: Mapping[str, str] | None = None,
    skip: Collection[str] = (),
    stop_fd: int | None = None,
) -> Confined:
    """Run agent ``code`` confined and measured; never raises for anything the code does.

    ``args`` (JSON-able) is ``world.args``; ``handle(op, params)`` serves the code's requests:
    ``("read_artifact", {"id": str})`` must answer ``{"ok": True, "value": bytes}``,
    ``("transfer", {"to": str, "amount": int, "asset": str})`` ``{"ok": True}``; ``{"ok": False, "error": str}``
    (or an exception) is raised in the code as ``world.Error``. ``hide`` are paths the code must not
    see; ``cgroup_parents`` maps controller names (``memory``, ``cpuacct``, ``pids``, ...) to the
    directory of the calling worker's own cgroup; ``skip`` names isolation steps (``STEPS``) not to
    attempt; ``stop_fd``, once readable, cancels the invocation (its tree is killed; ``cancelled``).
    Must be called from a thread that outlives the call (the child dies with that thread).
    Raises ``TypeError`` when ``args`` are not JSON-able (a caller's bug).
    """
    started = time.monotonic()
    unknown = set(skip) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown isolation steps {sorted(unknown)}; known: {STEPS}")
    # JSON types only (TypeError otherwise), as the code will see them.
    args = msgspec.json.decode(msgspec.json.encode(args))
    cg: CgroupSet | None = None
    if cgroup_parents:
        try:
            cg = CgroupSet.create(
                cgroup_parents,
                f"sbx-{os.getpid()}-{next(_seq)}",
                memory_bytes=limits.memory_bytes,
                pids_max=limits.max_processes + 2,  # + the bootstrap and the PID namespace's init
            )
        except OSError as exc:
            log.warning("sandbox without cgroups: %s", exc)
    try:
        job = _job(code, args, limits, hide, skip, cg)
    except (OSError, ValueError) as exc:  # no root or filter for this host: refuse rather than run unconfined
        if cg is not None:
            cg.remove(deadline=time.monotonic() + 1.0)
        return _failure("sandbox_error", f"cannot prepare the sandbox: {exc}", started)
    if len(job) > MAX_FRAME:
        if cg is not None:
            cg.remove(deadline=time.monotonic() + 1.0)
        return _failure("sandbox_error", f"code and arguments are {len(job)} bytes, over {MAX_FRAME}", started)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Pipes block on the child's side (a full stdout must hold the code back, not fail its print);
    # this side reads without blocking.
    (report_r, report_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
    for fd in (report_r, out_r, err_r):
        os.set_blocking(fd, False)
    ours = (parent_sock.fileno(), report_r, out_r, err_r)
    with _ZYGOTE.lock:
        try:
            pid, pidfd = _ZYGOTE.spawn([child_sock.fileno(), report_w, out_w, err_w])
        except OSError as exc:
            parent_sock.close()
            for fd in ours[1:]:
                os.close(fd)
            if cg is not None:
                cg.remove(deadline=time.monotonic() + 1.0)
            return _failure("sandbox_error", f"cannot start the sandbox: {exc}", started)
        finally:
            child_sock.close()
            for fd in (report_w, out_w, err_w):
                os.close(fd)
        fds = (out_r, err_r, report_r)
        inv = _Invocation(pid, pidfd, parent_sock, fds, cg, limits, handle, job, started, stop_fd)
        return _run(inv, cg, limits, started)


def _run(inv: _Invocation, cg: CgroupSet | None, limits: Limits, started: float) -> Confined:
    """Serve, watch and end one started invocation; measure it; say how it ended."""
    try:
        try:
            inv.watch()
        except Exception as exc:  # a bug here must not take the worker down with it
            log.exception("watching a sandbox failed")
            inv.end("internal", f"{type(exc).__name__}: {exc}")
        finally:
            inv.stop()  # whatever happened above (even KeyboardInterrupt), nothing is left running
        inv.drain()
        cpu, peak, oom = inv.rusage_cpu, inv.rusage_peak, 0
        if cg is not None:
            # Each figure is a lower bound of the truth (wait4 misses descendants nobody reaped,
            # the cgroup anything before the join), so the larger is the better.
            cpu = max(cpu, cg.cpu_seconds() or 0.0)
            # Not the larger here: wait4's maxrss of an exec'd child starts at its spawner's RSS
            # (the kernel keeps the pre-exec high-water mark), so in a big worker it says nothing
            # about the sandbox; the cgroup's peak is the tree's own.
            peak = cg.peak_bytes() or peak
            oom = cg.oom_kills()
        if inv.report is not None:
            # What the outer saw of the tree (never below what the kernel reported, see _Watch),
            # rather than wait4's maxrss of the outer, which starts at this worker's own high-water
            # mark (the kernel keeps it across exec). The cgroup's peak, when there is one, counts too.
            peak = max(inv.report.peak, cg.peak_bytes() or 0) if cg is not None else inv.report.peak
            cpu = max(cpu, inv.report.cpu)  # processes killed with the tree and autoreaped are lost to wait4
    finally:
        inv.close()
        if cg is not None:
            cg.remove(deadline=time.monotonic() + 2.0)
    isolation = (inv.ready or ()) + (("cgroup",) if cg is not None else ())
    if inv.report is not None and inv.ready is not None:
        isolation += ("memwatch",)
    stdout = bytes(inv.stdout[: limits.max_output_bytes])
    wall = time.monotonic() - started
    over = inv.report is not None and inv.report.over != ""
    if inv.ended == "done" and inv.done is not None and inv.done.ok and inv.ready is not None and not over:
        value = bytes(inv.done.value)
        if len(value) > limits.max_output_bytes:
            msg = f"the result is {len(value)} bytes of JSON, over the {limits.max_output_bytes} byte limit"
            return Confined(False, b"", msg, "output_too_large", cpu, peak, wall, stdout, isolation)
        if reason := result_error(value):
            return Confined(False, b"", reason, "code_error", cpu, peak, wall, stdout, isolation)
        return Confined(True, value, "", "", cpu, peak, wall, stdout, isolation)
    err_code, error = _classify(inv, cpu, oom)
    return Confined(False, b"", error, err_code, cpu, peak, wall, stdout, isolation)


def _refuse(op: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": False, "error": "no world here"}


@functools.cache
def isolation_available() -> tuple[str, ...]:
    """What this host allows (for status output): a trivial invocation's isolation, plus
    ``cgroup`` when this process's memory cgroup is writable. Measured once per process."""
    out = run_confined("pass", None, Limits(cpu_seconds=2.0, wall_seconds=10.0), _refuse).isolation
    mem = discover().dir("memory")
    if mem is not None and os.access(mem, os.W_OK):
        out += ("cgroup",)
    return out


__all__ = ["STEPS", "Confined", "ErrorCode", "Handler", "Limits", "isolation_available", "run_confined", "shutdown"]
