"""Confined execution of agent code: containment, measurement and clear errors.

Every hostile case must be contained, measured, reported with a clear error code, leave nothing
running, and leave the calling process healthy (each is followed by a trivial invocation).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import cgroups
from workers.sandbox import STEPS, Confined, Limits, isolation_available, run_confined

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
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


def nobody_processes() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = (d / "status").read_text()
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            if int(uid) == NOBODY:
                out.append(f"{d.name}: {(d / 'cmdline').read_bytes()!r}")
    return out


def run(code: str, args: object = None, limits: Limits = FAST, **kw: Any) -> Confined:
    world = kw.pop("world", None) or World()
    return run_confined(code, args, limits, world.handle, **kw)


def assert_contained(r: Confined | None, parents: dict[str, str] | None = None) -> None:
    """Nothing of the sandbox is left, its cgroups are gone, a trivial invocation still works, and
    the failed invocation ``r`` (if given) was measured."""
    assert nobody_processes() == [], nobody_processes()
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
    assert world.calls == [("read_artifact", {"id": "a1"}), ("transfer", {"to": "bob", "amount": 7})]
    # Requests written back to back (not through world) are still answered one by one, in order.
    pipelined = """
import json, os
m = json.dumps({"op": "transfer", "params": {"to": "x", "amount": 1}}).encode()
os.write(3, 2 * (len(m).to_bytes(4, "big") + m))
def answer():
    return json.loads(os.read(3, int.from_bytes(os.read(3, 4), "big")))
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


def test_a_malformed_frame_is_a_sandbox_error() -> None:
    for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x05notjs", b'\x00\x00\x00\x0c{"op":"ls"}!'):
        r = run(f"import os, time\nos.write(3, {junk!r})\ntime.sleep(5)")
        assert r.error_code == "sandbox_error" and "protocol" in r.error, r
        assert r.wall_seconds < 4
        assert_contained(r)
    # A forged "ready" after the real one is a protocol breach too.
    forged = 'import os\nm = b\'{"op":"ready","isolation":[]}\'\nos.write(3, len(m).to_bytes(4, \'big\') + m)'
    r = run(forged)
    assert r.error_code == "sandbox_error", r


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
    # The peak is the tree's with a cgroup (held at the limit), else the largest process's (an upper
    # bound, starting at this spawning process's own high-water mark: see test_memory_peak_is_measured).
    bound = (64 << 20) + (80 << 20)
    assert r.peak_memory_bytes <= (bound if mode.get("cgroup_parents") else max(bound, _spawner_rss())), r
    assert_contained(r, parents)


def _spawner_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_memory_peak_is_measured(mode: dict[str, Any]) -> None:
    r = run("x = b'x' * (100 << 20)\nresult = len(x)", limits=Limits(memory_bytes=256 << 20), **mode)
    assert value(r) == 100 << 20
    # Without a cgroup the peak is wait4's maxrss, which the kernel starts at the spawning process's
    # high-water mark: only an upper bound when the spawner (this test process) is the bigger.
    bound = (200 << 20) if mode.get("cgroup_parents") else max(200 << 20, _spawner_rss() + (20 << 20))
    assert (100 << 20) <= r.peak_memory_bytes <= bound, r


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
    spam = "import subprocess\nps = [subprocess.Popen(['sleep', '60']) for _ in range(100)]"
    r = run(spam, limits=lim, skip=skip, **mode)
    assert r.error_code == "code_error" and "BlockingIOError" in r.error, r
    assert_contained(r, parents)


def test_a_daemon_left_behind_is_killed(mode: dict[str, Any], parents: dict[str, str]) -> None:
    code = "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\nresult = 'left one'"
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


def test_hidden_paths_cannot_be_read(secret_dir: Path) -> None:
    code = """
import os
out = {}
try:
    out['read'] = open(world.args + '/secret.txt').read()
except OSError as exc:
    out['read'] = type(exc).__name__
try:
    out['list'] = os.listdir(world.args)
except OSError as exc:
    out['list'] = type(exc).__name__
result = out
"""
    # Control: without hiding, nobody can read it (so hiding is what stops it below).
    assert value(run(code, str(secret_dir))) == {"read": "the secret", "list": ["secret.txt"]}
    r = run(code, str(secret_dir), hide=[str(secret_dir)])
    assert value(r) == {"read": "FileNotFoundError", "list": []}
    assert "mountns" in r.isolation
    r = run(code.replace("+ '/secret.txt'", ""), str(secret_dir / "secret.txt"), hide=[str(secret_dir / "secret.txt")])
    assert value(r)["read"] == "PermissionError"  # /dev/null on a nodev mount: unopenable
    assert_contained(r)


def test_no_network(secret_dir: Path) -> None:
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
        assert value(run(code, args, skip=("netns",))) == ["connected", "connected"]  # control
        server.accept()[0].close()
        usrv.accept()[0].close()
        r = run(code, args, hide=[str(secret_dir)])
        tcp, unix = value(r)
        assert tcp != "connected" and unix != "connected", (tcp, unix)
        assert "netns" in r.isolation
        for srv in (server, usrv):
            srv.settimeout(0.1)
            with pytest.raises(TimeoutError):
                srv.accept()
    assert_contained(r)


def test_writes_outside_its_directory_do_not_reach_the_host() -> None:
    tag = uuid.uuid4().hex
    targets = [f"/tmp/escape-{tag}", f"/var/tmp/escape-{tag}", f"/dev/shm/escape-{tag}", f"{REPO}/escape-{tag}"]
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
    r = run(code, targets)
    outcome = value(r)
    assert outcome[f"/tmp/escape-{tag}"] == "written"  # into the private tmpfs
    for path in targets:
        assert not os.path.exists(path), f"{path} reached the host ({outcome[path]})"
    assert_contained(r)


def test_cannot_signal_the_caller() -> None:
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
    r = run(code, os.getpid())
    # Its parent is the PID namespace's init (root); nothing outside the namespace has a pid in it.
    assert value(r) == ["PermissionError", "ProcessLookupError", "ProcessLookupError"], r
    os.kill(os.getpid(), 0)  # we are alive
    assert_contained(r)


def test_no_secrets_in_the_environment() -> None:
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
        r = run(code, os.getpid())
        text = r.value.decode()
        assert r.ok and os.environ["AECO_TEST_SECRET"] not in text and "AECO" not in text, text
        assert set(value(r)["env"]) == {"PATH", "HOME", "LANG"}
    finally:
        del os.environ["AECO_TEST_SECRET"]
    assert_contained(r)


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


def test_isolation_of_this_host() -> None:
    avail = isolation_available()
    r = run("import os\nresult = [os.getuid(), os.getgid(), os.getgroups(), os.getcwd()]")
    assert value(r) == [NOBODY, NOBODY, [], "/tmp/work"]
    print(f"\nisolation available: {avail}")
    for step in ("mountns", "netns", "pidns", "uid", "rlimits"):
        assert step in avail and step in r.isolation, (step, avail)


def test_round_trip_overhead(parents: dict[str, str]) -> None:
    def best(f: Any, n: int = 10) -> tuple[float, float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times), statistics.median(times)

    bare = best(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
    plain = best(lambda: run("pass"))
    with_cg = best(lambda: run("pass", cgroup_parents=parents))
    print(
        f"\ntrivial invocation (min/median ms): bare subprocess {bare[0] * 1e3:.1f}/{bare[1] * 1e3:.1f}, "
        f"confined {plain[0] * 1e3:.1f}/{plain[1] * 1e3:.1f}, "
        f"confined+cgroup {with_cg[0] * 1e3:.1f}/{with_cg[1] * 1e3:.1f}"
    )
