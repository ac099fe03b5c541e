"""Confined execution of agent code: containment, measurement and clear errors.

Every hostile case must be contained, measured, reported with a clear error code, leave nothing
running, and leave the calling process healthy (each is followed by a trivial invocation).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from runtime.host import cgroups
from tests import sandbox_attacks
from tests.crash import descendants_of_uid
from tests.harness import ROOT
from workers.sandbox import STEPS, Confined, Limits, isolation_available, run_confined

NOBODY = 65534
#: The unprivileged user of the "unprivileged" runs (not the image's 10001: containers that other tests
#: start on this host run as that uid, and their processes would count as leftovers).
UNPRIVILEGED = 10077
FAST = Limits(cpu_seconds=2.0, memory_bytes=128 << 20, wall_seconds=10.0)


class World:
    """A fake supervisor behind ``handle``: records requests, serves artifacts, refuses on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.artifacts = {"a1": b"\x00artifact bytes\xff"}

    def handle(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, params))
        if op == "read_artifact":
            if params["id"] == "boom":
                raise RuntimeError("store exploded")
            if params["id"] not in self.artifacts:
                return {"ok": False, "error": f"no artifact {params['id']}"}
            return {"ok": True, "value": self.artifacts[params["id"]]}
        if params["amount"] > 100:
            return {"ok": False, "error": "insufficient scrip"}
        return {"ok": True}


@pytest.fixture(scope="module")
def parents() -> Iterator[dict[str, str]]:
    """Worker-like cgroups (memory, cpuacct, pids) for this test process, as the pool makes them."""
    info = cgroups.discover()
    name = cgroups.child_name(os.getpid(), 99, 0)
    made: dict[str, str] = {}
    for c in ("memory", "cpuacct", "pids"):
        parent = info.dir(c)
        if parent is None:
            continue
        with contextlib.suppress(OSError):
            (parent / name).mkdir()
            made[c] = str(parent / name)
    if "memory" not in made or "cpuacct" not in made:
        for d in made.values():
            os.rmdir(d)
        pytest.skip("no writable v1 memory and cpuacct cgroups on this host")
    yield made
    for d in made.values():
        os.rmdir(d)


@pytest.fixture(params=["cgroup", "plain"])
def mode(request: pytest.FixtureRequest, parents: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments for run_confined: with per-invocation cgroups, and without (the fallback)."""
    return {"cgroup_parents": parents} if request.param == "cgroup" else {}


def run(code: str, args: object = None, limits: Limits = FAST, **kw: Any) -> Confined:
    world = kw.pop("world", None) or World()
    return run_confined(code, args, limits, world.handle, **kw)


def assert_contained(r: Confined | None, parents: dict[str, str] | None = None) -> None:
    """Nothing of the sandbox is left, its cgroups are gone, a trivial invocation still works, and
    the failed invocation ``r`` (if given) was measured."""
    assert descendants_of_uid(NOBODY) == [], descendants_of_uid(NOBODY)
    assert descendants_of_uid(UNPRIVILEGED) == [], descendants_of_uid(UNPRIVILEGED)
    if parents:
        for d in parents.values():
            assert [p.name for p in Path(d).iterdir() if p.is_dir()] == [], f"cgroup left under {d}"
    after = run("result = 1 + 1")
    assert after.ok and after.value == b"2", after
    if r is not None:
        assert r.wall_seconds > 0 and r.cpu_seconds > 0 and r.peak_memory_bytes > 0, r


def value(r: Confined) -> Any:
    assert r.ok, r
    return json.loads(r.value)


#: ``run_confined`` in a process of another user (as a worker in the image runs): the job on stdin,
#: the ``Confined`` on stdout. Its requests to the world are refused.
_AS_USER = """
import sys, msgspec
from workers.sandbox import Limits, run_confined, shutdown
job = msgspec.json.decode(sys.stdin.buffer.read())
r = run_confined(job["code"], job["args"], msgspec.convert(job["limits"], Limits),
                 lambda op, params: {"ok": False, "error": "no world here"}, hide=job["hide"], skip=job["skip"])
shutdown()  # the zygote is reaped before this process (of the test's other user) ends
sys.stdout.buffer.write(msgspec.json.encode(r))
"""
#: How each kind of worker is started: as root (in this process), as an unprivileged user (the
#: image), and as root without CAP_SYS_ADMIN (a root container without privileges).
USERS: dict[str, list[str] | None] = {
    "root": None,
    "unprivileged": ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"],
    "root-without-sys-admin": ["setpriv", "--bounding-set=-sys_admin"],
}
Confine = Callable[..., Confined]


def _python_for_others() -> str:
    """This Python version at a path other users can execute (the venv's may sit under a 0700 /root)."""
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/local/bin/python{v}", f"/usr/bin/python{v}"):
        real = Path(os.path.realpath(candidate))
        if real.exists() and all(os.stat(d).st_mode & 0o001 for d in (real, *real.parents)):
            return str(real)
    pytest.skip(f"no python{v} that other users may execute")


@pytest.fixture(params=list(USERS))
def confine(request: pytest.FixtureRequest) -> Confine:
    """``run`` as each kind of worker (see ``USERS``)."""
    prefix = USERS[request.param]
    if prefix is None:
        return run
    python = _python_for_others()
    path = [str(ROOT), str(Path(msgspec.__file__).parents[1])]

    def as_user(code: str, args: object = None, limits: Limits = FAST, hide: Any = (), skip: Any = ()) -> Confined:
        job = msgspec.json.encode({"code": code, "args": args, "limits": limits, "hide": hide, "skip": skip})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # the worker's secrets included
        p = subprocess.run(
            [*prefix, python, "-c", _AS_USER], input=job, capture_output=True, cwd="/", env=env, timeout=300
        )
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        return msgspec.json.decode(p.stdout, type=Confined)

    return as_user


def stdlib_of(confine: Confine) -> str:
    """The standard library directory of the interpreter a ``confine`` worker runs (the root binds it)."""
    python = sys.executable if confine is run else _python_for_others()
    cmd = [python, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


# --- the protocol ------------------------------------------------------------------------------------


def test_args_result_and_stdout_round_trip(parents: dict[str, str]) -> None:
    args = {"n": 3, "name": "ünïcode", "xs": [1.5, None, True]}
    r = run("print('hello', world.args['n'])\nresult = {'echo': world.args, 'sum': sum(range(10))}", args)
    assert value(r) == {"echo": args, "sum": 45}
    assert r.stdout == b"hello 3\n"
    r = run("world.result([1, 2])\nresult = 'ignored'", cgroup_parents=parents)
    assert value(r) == [1, 2]
    assert "cgroup" in r.isolation
    assert value(run("x = 1")) is None  # no result set: null
    assert value(run("import sys\nsys.exit(0)")) is None


def test_world_requests_reach_handle_and_get_its_answer() -> None:
    world = World()
    r = run("data = world.read_artifact('a1')\nworld.transfer('bob', 7)\nresult = list(data)", world=world)
    assert bytes(value(r)) == world.artifacts["a1"]
    assert world.calls == [("read_artifact", {"id": "a1"}), ("transfer", {"to": "bob", "amount": 7, "asset": "scrip"})]
    # Requests written back to back (not through world) are still answered one by one, in order
    # (answers are marshal: see sandbox_boot).
    pipelined = """
import json, marshal, os
m = json.dumps({"op": "transfer", "params": {"to": "x", "amount": 1}}).encode()
os.write(3, 2 * (len(m).to_bytes(4, "big") + m))
def answer():
    return marshal.loads(os.read(3, int.from_bytes(os.read(3, 4), "big")))
result = [answer(), answer()]
"""
    assert value(run(pipelined, limits=Limits(wall_seconds=3.0))) == [{"ok": True, "value": None}] * 2


def test_refusals_and_handler_exceptions_are_exceptions_in_the_code() -> None:
    code = """
out = []
for call in (lambda: world.read_artifact('nope'), lambda: world.read_artifact('boom'),
             lambda: world.transfer('bob', 1000)):
    try:
        call()
        out.append('no error')
    except world.Error as exc:
        out.append(str(exc))
try:
    world.transfer('bob', '5')
except TypeError as exc:
    out.append('TypeError')
result = out
"""
    assert value(run(code)) == [
        "no artifact nope",
        "RuntimeError: store exploded",
        "insufficient scrip",
        "TypeError",
    ]
    r = run("world.transfer('bob', 1000)")
    assert r.error_code == "code_error" and "WorldError: insufficient scrip" in r.error, r
    assert_contained(r)


def test_syntax_error_names_the_line() -> None:
    r = run("x = 1\ny = 2\nz = (3 +\n")
    assert r.error_code == "code_error" and not r.ok
    assert 'File "<agent>", line 3' in r.error and "SyntaxError" in r.error, r.error
    assert_contained(r)


def test_exception_traceback_shows_only_the_agents_frames() -> None:
    r = run("def f(x):\n    return 1 / x\n\nf(0)\n")
    assert r.error_code == "code_error"
    assert "ZeroDivisionError" in r.error and "line 2, in f" in r.error and "line 4" in r.error, r.error
    assert "sandbox_boot" not in r.error, r.error
    assert_contained(r)


def test_output_over_the_limit_is_output_too_large() -> None:
    small = Limits(cpu_seconds=5.0, wall_seconds=10.0, max_output_bytes=10_000)
    r = run("while True:\n    print('x' * 100)", limits=small)
    assert r.error_code == "output_too_large" and len(r.stdout) == 10_000, r.error
    assert_contained(r)
    r = run("result = 'y' * 20_000", limits=small)
    assert r.error_code == "output_too_large", r
    r = run("import os\nos.write(1, b'z' * 20_000)\nimport time\ntime.sleep(5)", limits=small)
    assert r.error_code == "output_too_large" and r.wall_seconds < 4, r
    assert_contained(r)


def test_a_malformed_frame_from_the_code_is_its_code_error() -> None:
    """Only the code writes on the channel after "ready": a breach of the protocol is its fault."""
    for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x05notjs", b'\x00\x00\x00\x0c{"op":"ls"}!'):
        r = run(f"import os, time\nos.write(3, {junk!r})\ntime.sleep(5)")
        assert r.error_code == "code_error" and "protocol" in r.error, r
        assert r.wall_seconds < 4
        assert_contained(r)
    # A forged "ready" after the real one is a protocol breach too.
    forged = 'import os\nm = b\'{"op":"ready","isolation":[]}\'\nos.write(3, len(m).to_bytes(4, \'big\') + m)'
    r = run(forged)
    assert r.error_code == "code_error" and "second 'ready'" in r.error, r


def test_exiting_without_finishing_is_a_code_error() -> None:
    r = run("import os\nprint('bye', flush=True)\nos._exit(3)")
    assert r.error_code == "code_error" and "status 3" in r.error and r.stdout == b"bye\n", r
    assert_contained(r)
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert r.error_code == "killed" and "SIGSEGV" in r.error, r


# --- resource limits -----------------------------------------------------------------------------------


def test_infinite_loop_is_stopped_and_charged_its_cpu(mode: dict[str, Any], parents: dict[str, str]) -> None:
    lim = Limits(cpu_seconds=1.0, wall_seconds=10.0)
    r = run("while True:\n    pass", limits=lim, **mode)
    assert r.error_code == "cpu_exceeded", r
    assert 0.95 <= r.cpu_seconds <= 1.6, r  # RLIMIT_CPU is whole seconds; the cgroup check is finer
    assert_contained(r, parents)


def test_v2_cgroup_measures_and_stops_cpu() -> None:
    """With the v2 tree as the parent (cpu.stat always exists there; cgroup.kill cleans up)."""
    parent = cgroups.discover().dir("unified")
    if parent is None or not (parent / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 tree")
    d = parent / cgroups.child_name(os.getpid(), 97, 0)
    try:
        d.mkdir()
    except OSError as exc:
        pytest.skip(f"cgroup v2 tree not writable: {exc}")
    try:
        lim = Limits(cpu_seconds=0.5, wall_seconds=10.0)
        code = "import os\nos.fork()\nwhile True:\n    pass"  # two processes: per-process RLIMIT_CPU is not enough
        r = run(code, limits=lim, cgroup_parents={"unified": str(d)})
        assert r.error_code == "cpu_exceeded" and 0.5 <= r.cpu_seconds <= 0.8 and "cgroup" in r.isolation, r
        assert_contained(r, {"unified": str(d)})
    finally:
        d.rmdir()


def test_wall_clock_deadline(mode: dict[str, Any], parents: dict[str, str]) -> None:
    r = run("import time\ntime.sleep(60)", limits=Limits(cpu_seconds=5.0, wall_seconds=0.5), **mode)
    assert r.error_code == "deadline_exceeded" and 0.5 <= r.wall_seconds < 2.5, r
    assert r.cpu_seconds < 0.3, r
    assert_contained(r, parents)


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(10 << 30)",
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))",
        "import os\nchunks = []\nwhile True:\n    chunks.append(os.urandom(1 << 20))",
    ],
    ids=["10GB", "touch-progressively", "urandom-pages"],
)
def test_memory_over_the_limit(code: str, mode: dict[str, Any], parents: dict[str, str]) -> None:
    lim = Limits(cpu_seconds=10.0, memory_bytes=64 << 20, wall_seconds=20.0)
    r = run(code, limits=lim, **mode)
    assert r.error_code == "memory_exceeded", r
    # The peak is the tree's: the cgroup's (held at the limit), else the watch's (the limit, plus what
    # one sample period let it grow, or the largest process's own high-water mark).
    assert r.peak_memory_bytes <= (64 << 20) + (80 << 20), r
    assert_contained(r, parents)


def test_memory_peak_is_measured(mode: dict[str, Any]) -> None:
    r = run("x = b'x' * (100 << 20)\nresult = len(x)", limits=Limits(memory_bytes=256 << 20), **mode)
    assert value(r) == 100 << 20
    # The tree's own (not this spawning process's high-water mark, which wait4 of an exec'd child
    # starts from): the cgroup's, else the bootstrap's watch (see sandbox_boot._Watch).
    assert (100 << 20) <= r.peak_memory_bytes <= (200 << 20), r
    assert ("memwatch" in r.isolation) != bool(mode.get("cgroup_parents")), r.isolation


def test_several_processes_share_one_cpu_limit(mode: dict[str, Any], parents: dict[str, str]) -> None:
    """Four spinning processes: the limit is the tree's, not each one's (RLIMIT_CPU is per process)."""
    code = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True:\n    pass"
    r = run(code, limits=Limits(cpu_seconds=1.0, wall_seconds=20.0), **mode)
    assert r.error_code == "cpu_exceeded" and 1.0 <= r.cpu_seconds <= 1.5, r
    assert_contained(r, parents)


FORK_COUNT = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as exc:
    result = [n, type(exc).__name__]
"""


@pytest.mark.parametrize("pidns", [True, False], ids=["pidns", "no-pidns"])
def test_fork_bomb_is_contained(pidns: bool, mode: dict[str, Any], parents: dict[str, str]) -> None:
    skip = () if pidns else ("pidns",)
    lim = Limits(cpu_seconds=5.0, wall_seconds=3.0, max_processes=8)
    n, err = value(run(FORK_COUNT, limits=lim, skip=skip, **mode))
    assert n <= lim.max_processes - 1 and err == "BlockingIOError", (n, err)
    assert_contained(None, parents)
    r = run("import os\nwhile True:\n    os.fork()", limits=lim, skip=skip, **mode)
    assert r.error_code in ("code_error", "deadline_exceeded", "cpu_exceeded"), r
    assert_contained(r, parents)
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(60)']"  # the root holds the interpreter, no `sleep`
    spam = f"import subprocess, sys\nps = [subprocess.Popen({sleeper}) for _ in range(100)]"
    r = run(spam, limits=lim, skip=skip, **mode)
    assert r.error_code == "code_error" and "BlockingIOError" in r.error, r
    assert_contained(r, parents)


def test_a_daemon_left_behind_is_killed(mode: dict[str, Any], parents: dict[str, str]) -> None:
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "result = 'left one'"
    )
    for skip in ((), ("pidns",)):
        assert value(run(code, skip=skip, **mode)) == "left one"
        assert_contained(None, parents)


# --- isolation -----------------------------------------------------------------------------------------


@pytest.fixture
def secret_dir() -> Iterator[Path]:
    """A world-readable directory outside /tmp (which the sandbox replaces anyway) with a secret."""
    base = next(d for d in ("/run", "/srv", "/opt", "/var/lib") if os.access(d, os.W_OK))
    d = Path(tempfile.mkdtemp(prefix="aeco-sandbox-test-", dir=base))
    d.chmod(0o755)
    (d / "secret.txt").write_text("the secret")
    (d / "secret.txt").chmod(0o644)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def test_only_the_minimal_root_is_reachable(secret_dir: Path, confine: Confine) -> None:
    """A path outside the root is simply not there (hidden or not); a hidden path inside a bind is covered."""
    code = """
import os
out = {}
for path in world.args:
    try:
        out[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()
    except OSError as exc:
        out[path] = type(exc).__name__
result = out
"""
    secret = str(secret_dir / "secret.txt")
    # Control: without a mount namespace, nobody can read it (so the root is what stops it below).
    assert value(confine(code, [secret], skip=("mountns",)))[secret] == "the secret"
    r = confine(code, [secret, str(secret_dir)])
    assert value(r) == {secret: "FileNotFoundError", str(secret_dir): "FileNotFoundError"}
    assert {"mountns", "minroot", "rofs"} <= set(r.isolation), r.isolation
    stdlib = stdlib_of(confine)  # inside a bind: hiding covers it
    hidden = [f"{stdlib}/xmlrpc", f"{stdlib}/this.py"]
    assert value(confine(code, hidden))[hidden[0]] != []  # control: there without hiding
    r = confine(code, hidden, hide=hidden)
    # An empty read-only directory; /dev/null on a nodev mount: unopenable.
    assert value(r) == {hidden[0]: [], hidden[1]: "PermissionError"}, r
    assert_contained(r)


def test_no_network(secret_dir: Path, confine: Confine) -> None:
    with socket.socket() as server, socket.socket(socket.AF_UNIX) as usrv:
        server.bind(("127.0.0.1", 0))
        server.listen()
        path = str(secret_dir / "sock")
        usrv.bind(path)
        usrv.listen()
        os.chmod(path, 0o777)
        code = """
import socket
out = []
for family, addr in ((socket.AF_INET, ('127.0.0.1', world.args[0])), (socket.AF_UNIX, world.args[1])):
    s = socket.socket(family)
    s.settimeout(2)
    try:
        s.connect(addr)
        out.append('connected')
    except OSError as exc:
        out.append(type(exc).__name__)
result = out
"""
        args = [server.getsockname()[1], path]
        control = confine(code, args, skip=("netns", "mountns"))  # the socket's path is outside the root
        assert value(control) == ["connected", "connected"]
        server.accept()[0].close()
        usrv.accept()[0].close()
        r = confine(code, args, hide=[str(secret_dir)])
        tcp, unix = value(r)
        assert tcp != "connected" and unix != "connected", (tcp, unix)
        assert "netns" in r.isolation
        for srv in (server, usrv):
            srv.settimeout(0.1)
            with pytest.raises(TimeoutError):
                srv.accept()
    assert_contained(r)


def test_writes_outside_its_directory_do_not_reach_the_host(confine: Confine) -> None:
    tag = uuid.uuid4().hex
    targets = [f"/tmp/escape-{tag}", f"/var/tmp/escape-{tag}", f"/dev/shm/escape-{tag}", f"{ROOT}/escape-{tag}"]
    targets += [f"/root/escape-{tag}", f"/etc/escape-{tag}"]
    code = """
out = {}
for path in world.args:
    try:
        with open(path, 'w') as f:
            f.write('escaped')
        out[path] = 'written'
    except OSError as exc:
        out[path] = type(exc).__name__
result = out
"""
    r = confine(code, targets)
    outcome = value(r)
    assert outcome[f"/tmp/escape-{tag}"] == "written"  # into the private tmpfs
    for path in targets:
        assert not os.path.exists(path), f"{path} reached the host ({outcome[path]})"
    assert_contained(r)


def test_cannot_signal_the_caller(confine: Confine) -> None:
    code = """
import os, signal
out = []
for pid in (os.getppid(), world.args, -1):
    try:
        os.kill(pid, signal.SIGKILL)
        out.append('sent')
    except OSError as exc:
        out.append(type(exc).__name__)
result = out
"""
    r = confine(code, os.getpid())
    # Its parent is the PID namespace's init (root); nothing outside the namespace has a pid in it.
    # In a user namespace init has the code's uid outside, so a signal to it is permitted, and
    # dropped by the kernel (an init ignores what it has no handler for): the code carries on.
    first = "sent" if "userns" in r.isolation else "PermissionError"
    assert value(r) == [first, "ProcessLookupError", "ProcessLookupError"], r
    os.kill(os.getpid(), 0)  # we are alive
    assert_contained(r)


def test_no_secrets_in_the_environment(confine: Confine) -> None:
    os.environ["AECO_TEST_SECRET"] = "hunter2-" + uuid.uuid4().hex
    try:
        code = """
import os
out = {'env': dict(os.environ)}
for pid in (os.getppid(), world.args, 'self', 1):
    try:
        out[str(pid)] = open(f'/proc/{pid}/environ', 'rb').read().decode('latin1')
    except OSError as exc:
        out[str(pid)] = type(exc).__name__
result = out
"""
        r = confine(code, os.getpid())
        text = r.value.decode()
        assert r.ok and os.environ["AECO_TEST_SECRET"] not in text and "AECO" not in text, text
        assert set(value(r)["env"]) == {"PATH", "HOME", "LANG"}
    finally:
        del os.environ["AECO_TEST_SECRET"]
    assert_contained(r)


UNDO_THE_ROOT = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
covered = world.args  # a directory of the standard library, hidden: an empty read-only directory over it
MS_REMOUNT, MS_BIND, MS_REC, MNT_DETACH = 32, 4096, 16384, 2

def err(ret):
    return "ok" if ret == 0 else errno.errorcode[ctypes.get_errno()]

def listing(path):
    try:
        return os.listdir(path)
    except OSError as exc:
        return type(exc).__name__

def attempts():
    status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
    out = {"caps": [l.split()[1] for l in status.splitlines() if l.startswith(("CapEff", "CapBnd"))]}
    out["umount"] = err(libc.umount2(covered.encode(), 0))
    out["umount_detach"] = err(libc.umount2(covered.encode(), MNT_DETACH))
    out["mount"] = err(libc.mount(b"tmpfs", b"/tmp/work", b"tmpfs", 0, None))
    out["remount_rw"] = err(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None))
    os.makedirs("/tmp/b", exist_ok=True)
    parent = os.path.dirname(covered).encode()
    out["bind_parent"] = err(libc.mount(parent, b"/tmp/b", None, MS_BIND, None))
    rbind = err(libc.mount(parent, b"/tmp/b", None, MS_BIND | MS_REC, None))
    out["seen"] = [listing(covered), listing("/tmp/b/" + os.path.basename(covered)) if rbind == "ok" else []]
    out["ptrace_init"] = err(libc.ptrace(16, 1, None, None))  # PTRACE_ATTACH to the namespace's init
    out["init_root"] = listing("/proc/1/root/etc")
    # The host's root is detached: a chroot break-out (chroot into a subdirectory, climb) finds this root.
    out["chroot"] = err(libc.chroot(b"/tmp"))
    for _ in range(8):
        os.chdir("..")
    out["climbed"] = sorted(os.listdir("."))
    return out

result = {"direct": attempts()}
# Its own user namespace (all capabilities in it, its own ids mapped) and mount namespace: the copies
# of the root's mounts are locked there.
r, w = os.pipe()
if os.fork() == 0:
    uid, gid = os.getuid(), os.getgid()
    libc.prctl(4, 1, 0, 0, 0)  # dumpable: its own /proc/self files must be writable to map ids
    out = {"unshare": err(libc.unshare(0x10000000 | 0x20000))}
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        out["mapped"] = "ok"
    except OSError as exc:
        out["mapped"] = str(exc)
    out.update(attempts())
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
result["nested"] = json.loads(os.read(r, 1 << 20))
os.wait()
"""


@pytest.mark.parametrize("filtered", [False, True], ids=["mounts-alone", "with-seccomp"])
def test_the_code_cannot_undo_its_root(confine: Confine, filtered: bool) -> None:
    """Unmounting, remounting, binding around, chrooting out and re-namespacing to reach past the
    root all fail, whether the sandbox was made as root or in a user namespace (where the code's uid
    outside is the worker's own): by the locked mounts alone, and by seccomp on top of them."""
    covered = os.path.join(stdlib_of(confine), "xmlrpc")
    r = confine(UNDO_THE_ROOT, covered, hide=[covered], skip=() if filtered else ("seccomp",))
    out = value(r)
    print(f"\nisolation {r.isolation}:\n{json.dumps(out, indent=1)}")
    direct, nested = out["direct"], out["nested"]
    assert direct["mount"] == "EPERM", direct  # no capability at all (in its own namespace it may mount)
    for attempt in (direct, nested):
        for op in ("umount", "umount_detach", "remount_rw", "bind_parent", "ptrace_init"):
            assert attempt[op] in ("EPERM", "EINVAL", "EACCES", "ESRCH"), (op, attempt)
        assert attempt["seen"] == [[], []] and attempt["init_root"] in ("PermissionError", "FileNotFoundError")
        # Climbing out of a chroot (where one was allowed) ends at the sandbox's root, not the host's.
        assert "tmp" in attempt["climbed"] and not {"sys", "var", "home", "run"} & set(attempt["climbed"]), attempt
    if filtered:
        assert nested["unshare"] == "EPERM" and "seccomp" in r.isolation, nested
        assert all(direct[op] == "EPERM" for op in ("umount", "mount", "remount_rw", "bind_parent", "ptrace_init"))
    else:
        assert nested["unshare"] == "ok" and nested["mapped"] == "ok", nested  # the attack itself worked
        assert "seccomp" not in r.isolation
    if direct["caps"]:  # effective, bounding: nothing, and nothing to regain in a user namespace
        assert direct["caps"] == ["0" * 16, "0" * 16], direct
    assert_contained(r)


def test_limits_hold_for_every_kind_of_worker(confine: Confine) -> None:
    r = confine("while True:\n    pass", limits=Limits(cpu_seconds=1.0, wall_seconds=10.0))
    assert r.error_code == "cpu_exceeded" and r.cpu_seconds > 0.5, r  # charged (wait4 only: no cgroup)
    r = confine("x = bytearray(10 << 30)", limits=Limits(memory_bytes=64 << 20))
    assert r.error_code == "memory_exceeded", r
    lim = Limits(cpu_seconds=5.0, wall_seconds=3.0, max_processes=8)
    n, err = value(confine(FORK_COUNT, limits=lim))
    assert n <= lim.max_processes - 1 and err == "BlockingIOError", (n, err)
    r = confine("import os\nwhile True:\n    os.fork()", limits=lim)
    assert r.error_code in ("code_error", "deadline_exceeded", "cpu_exceeded"), r
    assert_contained(r)


def test_unhideable_paths_refuse_to_run_rather_than_expose_them(secret_dir: Path) -> None:
    """Unprivileged without a mount namespace the code would run as the worker's own user: refused."""
    as_user = USERS["unprivileged"]
    assert as_user is not None
    job: dict[str, Any] = {"code": "result = open(world.args).read()", "args": str(secret_dir / "secret.txt")}
    job.update(limits=FAST, hide=[str(secret_dir)], skip=["mountns"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(msgspec.__file__).parents[1])]))
    p = subprocess.run(
        [*as_user, _python_for_others(), "-c", _AS_USER],
        input=msgspec.json.encode(job),
        capture_output=True,
        cwd="/",
        env=env,
        timeout=300,
    )
    r = msgspec.json.decode(p.stdout, type=Confined)
    assert r.error_code == "sandbox_error" and "cannot hide" in r.error and "the secret" not in r.error, r


def test_without_namespaces_the_fallback_is_visible_and_still_contains(parents: dict[str, str]) -> None:
    kw: dict[str, Any] = {"skip": STEPS, "cgroup_parents": parents}
    r = run("result = 1", **kw)
    assert value(r) == 1
    assert not set(STEPS) & set(r.isolation) and {"uid", "rlimits", "cgroup"} <= set(r.isolation), r.isolation
    r = run("while True:\n    pass", limits=Limits(cpu_seconds=0.5), **kw)
    assert r.error_code == "cpu_exceeded" and r.cpu_seconds < 1.0, r
    r = run("chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))", limits=Limits(memory_bytes=64 << 20), **kw)
    assert r.error_code == "memory_exceeded", r
    n, err = value(run(FORK_COUNT, limits=Limits(wall_seconds=3.0, max_processes=8), **kw))
    assert n <= 7 and err == "BlockingIOError"
    assert_contained(r, parents)
    os.environ["AECO_TEST_SECRET"] = secret = "hunter2-" + uuid.uuid4().hex
    try:
        code = """
import os, signal
out = [dict(os.environ)]
for pid in (os.getppid(), world.args):
    try:
        os.kill(pid, signal.SIGKILL)
        out.append('sent')
    except OSError as exc:
        out.append(type(exc).__name__)
    try:
        out.append(open(f'/proc/{pid}/environ', 'rb').read().decode('latin1'))
    except OSError as exc:
        out.append(type(exc).__name__)
result = out
"""
        r = run(code, os.getpid(), **kw)
        assert value(r)[1:] == ["PermissionError"] * 4 and secret not in r.value.decode(), r
    finally:
        del os.environ["AECO_TEST_SECRET"]
    assert_contained(r, parents)


def test_isolation_of_this_host(confine: Confine) -> None:
    r = confine("import os\nresult = [os.getuid(), os.getgid(), os.getgroups(), os.getcwd()]")
    # Unprivileged, the code is nobody inside its user namespace (and the worker's uid outside).
    assert value(r) == [NOBODY, NOBODY, [], "/tmp/work"]
    print(f"\nisolation: {r.isolation}")
    every = ("mountns", "rofs", "minroot", "netns", "ipcns", "utsns", "cgroupns", "pidns", "proc", "rlimits")
    for step in (*every, "nonewprivs", "keyring", "seccomp", "memwatch"):
        assert step in r.isolation, (step, r.isolation)
    if confine is run:
        assert "uid" in r.isolation and "userns" not in r.isolation, r.isolation  # root: unchanged
        assert set(isolation_available()) >= set(r.isolation), isolation_available()
    else:
        assert "userns" in r.isolation, r.isolation


def test_round_trip_overhead(parents: dict[str, str]) -> None:
    """A trivial confined invocation, with and without its own cgroups, costs about what starting a bare
    ``python -c pass`` does: each kind's median wall time within 4x the bare start's (``python -m
    benchmarks sandbox`` measures ~1.0x and ~1.6x of a start with ``-I -S``). Interleaved, a round
    running each once, so that the host's load weighs on all three alike; every confined run answers."""
    kinds: dict[str, Callable[[], object]] = {
        "bare subprocess": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
        "confined": lambda: run("pass"),
        "confined+cgroup": lambda: run("pass", cgroup_parents=parents),
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(10):
        for kind, call in kinds.items():
            t = time.perf_counter()
            out = call()
            times[kind].append(time.perf_counter() - t)
            assert not isinstance(out, Confined) or out.ok, (kind, out)
    median = {kind: statistics.median(ts) for kind, ts in times.items()}
    shown = ", ".join(f"{k} {min(ts) * 1e3:.1f}/{median[k] * 1e3:.1f}" for k, ts in times.items())
    print(f"\ntrivial invocation (min/median ms): {shown}")
    bare = median["bare subprocess"]
    assert median["confined"] < 4 * bare and median["confined+cgroup"] < 4 * bare, median


# --- attacks through the real path ------------------------------------------------------------------


def git_fsck(repo: Path) -> None:
    """``git fsck --strict`` of a store, whoever owns it."""
    cmd = ["git", "-c", "safe.directory=*", "--git-dir", str(repo), "fsck", "--full", "--strict"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def summary(report: dict[str, Any]) -> str:
    """One line per attack, for the test's output."""
    lines = [f"workers measured by: {report['cgroups']}"]
    for name, a in report["attacks"].items():
        outcome = "ok" if a["ok"] else a["code"]
        c = a["charged"][0] if a["charged"] else {}
        lines.append(f"  {name:24} {outcome:18} cpu {c.get('cpu', 0):.3f} s  memory {c.get('memory', 0) >> 20} MiB")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def attack_params() -> dict[str, Any]:
    params = sandbox_attacks.syscall_params()
    print(f"\nsystem call numbers from {params['source']}")
    return params


def test_attacks_through_the_world_as_a_root_worker_with_cgroups(
    tmp_path: Path, attack_params: dict[str, Any], parents: dict[str, str]
) -> None:
    """Every attack of tests/sandbox_attacks.py, mallory's code invoked by bob (or by herself), on a
    pool of root workers that measure and limit with cgroups."""
    report = sandbox_attacks.run(tmp_path / "data", attack_params)
    print("\n" + summary(report))
    assert report["cgroups"] not in ("", "none"), report["cgroups"]
    sandbox_attacks.verify(report, socket.gethostname())
    git_fsck(tmp_path / "data" / "artifacts.git")


def test_attacks_through_the_world_as_a_non_root_worker_without_cgroups(attack_params: dict[str, Any]) -> None:
    """The same attacks on a pool (and supervisor) run by an unprivileged user: user namespaces, no
    cgroups, memory bounded and measured by the sandbox's own watch."""
    as_user = USERS["unprivileged"]
    assert as_user is not None
    home = Path(tempfile.mkdtemp(prefix="aeco-attacks-", dir="/tmp"))
    try:
        (home / "params.json").write_text(json.dumps(attack_params))
        os.chown(home, UNPRIVILEGED, UNPRIVILEGED)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(msgspec.__file__).parents[1])]))
        driver = ROOT / "tests" / "sandbox_attacks.py"
        cmd = [*as_user, _python_for_others(), str(driver), str(home / "data"), str(home / "params.json")]
        p = subprocess.run(cmd, capture_output=True, cwd="/", env=env, timeout=600)
        assert p.returncode == 0, p.stderr.decode(errors="replace")[-4000:]
        report = json.loads(p.stdout)
        print("\n" + summary(report))
        sandbox_attacks.verify(report, socket.gethostname())
        git_fsck(home / "data" / "artifacts.git")
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=True)


# --- each layer on its own ----------------------------------------------------------------------------


def test_the_filter_is_what_refuses_the_calls(attack_params: dict[str, Any]) -> None:
    """The system call probe without the filter: the same calls get the kernel's own answers (success,
    EFAULT, EBADF ...), so the EPERMs of the attack runs are the filter's doing."""
    r = run(sandbox_attacks.SYSCALLS, attack_params, skip=("seccomp",))
    out = value(r)
    assert "seccomp" not in r.isolation and out["seccomp_status"] == ["0"], (r.isolation, out["seccomp_status"])
    denied = out["denied"]
    assert denied["unshare"] == [0, ""] and denied["inotify_init1"][0] >= 0, denied
    for name, err in (("memfd_create", "EFAULT"), ("flock", "EBADF"), ("keyctl", "EINVAL"), ("mount", "EFAULT")):
        assert denied[name] == [-1, err], (name, denied[name])
    not_eperm = [n for n, res in denied.items() if res != [-1, "EPERM"]]
    print(f"\nwithout the filter, {len(not_eperm)} of {len(denied)} calls answer other than EPERM")
    assert len(not_eperm) >= len(denied) // 2, denied
    filtered = out["filtered"]
    assert filtered["clone3"] != [-1, "ENOSYS"] and filtered["socket 16"][0] >= 0, filtered
    assert filtered["personality READ_IMPLIES_EXEC"][0] >= 0 and filtered["setsockopt 7"] == [0, ""], filtered
    if "i386 getpid" in out:  # the same code, no architecture check: the pid (or no IA-32 emulation at all)
        assert isinstance(out["i386 getpid"], str) or out["i386 getpid"] > 0, out["i386 getpid"]
    assert_contained(r)


def test_keyrings_do_not_cross_invocations_even_without_the_filter(confine: Confine) -> None:
    """With seccomp off, the code can add keys: to a session keyring of its own and user keyrings of
    its own user namespace, which the next invocation does not find."""
    numbers = sandbox_attacks.syscall_params()["numbers"]
    stash = confine(sandbox_attacks.KEYRINGS, {**numbers, "steal": True, "secret": "hunter2"}, skip=("seccomp",))
    added = value(stash)
    assert added["add_key session"][0] > 0 and added["add_key user"][0] > 0, added  # the attack itself works
    fetch = confine(sandbox_attacks.KEYRINGS, {**numbers, "steal": False}, skip=("seccomp",))
    found = value(fetch)
    assert "keyring" in fetch.isolation and "hunter2" not in fetch.value.decode(), found
    searched = {k: v for k, v in found.items() if k.startswith(("search", "request"))}
    assert all(v[0] < 0 and v[1] in ("ENOKEY", "EACCES") for v in searched.values()), searched
    assert_contained(fetch)


LOCKS = """
import fcntl, os
out = {}
for path in world.args:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        out[path] = "locked"
    except OSError as exc:
        out[path] = type(exc).__name__
result = out
"""


@pytest.mark.parametrize("filtered", [False, True], ids=["without-filter", "with-filter"])
def test_host_files_in_the_root_cannot_be_locked(filtered: bool) -> None:
    """The root's files are the host's inodes: a host process's lock on one shows through without
    the filter (the code's attempt would block); with it, the code cannot lock at all."""
    paths = [os.path.realpath(sys.executable), os.__file__, "/dev/null"]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run(LOCKS, paths, skip=() if filtered else ("seccomp",))
    finally:
        for fd in fds:
            os.close(fd)
    assert value(r) == dict.fromkeys(paths, "PermissionError" if filtered else "BlockingIOError"), r
