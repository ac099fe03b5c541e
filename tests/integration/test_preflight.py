"""Values and hosts the supervisor cannot run with are refused up front, by ``--check`` and by the start
alike: one line on stderr, exit 2, no traceback, and nothing created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from runtime import config as config_mod
from runtime.economy.ledger.rules import MAX_SUPPLY
from runtime.ops import preflight
from tests.harness import ROOT, python_m, start_supervisor, tmpfs

AGENT = "{id: a, workload: [{kind: echo}]}"


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return python_m("runtime.supervisor", "--config", str(config), *args)


def _refused(config: Path, data: Path, *needles: str) -> None:
    """Both ``--check`` and a start refuse ``config`` with one line naming ``needles``, creating nothing."""
    for args in (("--check",), ("--duration", "1", "--no-live")):
        out = _run(config, *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)
        assert "Traceback" not in out.stderr and all(n in lines[0] for n in needles), (args, lines[0])
        assert not (data / "run").exists() and not (data / "ledger").exists(), (args, sorted(data.rglob("*")))


BAD_VALUES = {
    "disk quota beyond 64-bit bytes": (
        "agents:\n  - {id: a, disk_quota_mb: 1000000000000000, workload: [{kind: echo}]}\n",
        "disk_quota_mb",
    ),
    "memory quota of a petabyte": (
        "agents:\n  - {id: a, memory_quota_mb: 1000000000000, workload: [{kind: echo}]}\n",
        "memory_quota_mb",
    ),
    "scrip beyond the supply": (f"agents:\n  - {{id: a, scrip: {2**63}, workload: [{{kind: echo}}]}}\n", "scrip"),
    "scrip that sums beyond the supply": (
        f"agents:\n  - {{id: a, scrip: {2**62}, workload: [{{kind: echo}}]}}\n"
        f"  - {{id: b, scrip: {2**62}, workload: [{{kind: echo}}]}}\n",
        "largest supply",
    ),
    "cpu rights of a million cores": (
        "agents:\n  - {id: a, cpu_rate: 1000000000, workload: [{kind: echo}]}\n",
        "cpu_rate",
    ),
    "ten thousand workers": (f"pool: {{workers: 10000}}\nagents:\n  - {AGENT}\n", "pool.workers"),
    "a heartbeat every nanosecond": (f"pool: {{heartbeat_s: 1.0e-9}}\nagents:\n  - {AGENT}\n", "pool.heartbeat_s"),
    "a heartbeat timeout under the heartbeat": (
        f"pool: {{heartbeat_s: 5, heartbeat_timeout_s: 2}}\nagents:\n  - {AGENT}\n",
        "pool.heartbeat_timeout_s",
    ),
    "a status refresh every nanosecond": (f"status_interval_s: 1.0e-9\nagents:\n  - {AGENT}\n", "status_interval_s"),
    "no agents at all": ("", "no agents"),
    "a model file that does not exist": (
        "llm: {model: /nonexistent/model.gguf}\nagents:\n  - {id: a, brain: llm}\n",
        "/nonexistent/model.gguf",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_value_the_run_cannot_use_is_refused_before_anything_is_created(case: str, tmp_path: Path) -> None:
    body, needle = BAD_VALUES[case]
    data = tmp_path / "data"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"data_dir: {data}\n{body}")
    _refused(cfg, data, needle)


def _config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "host.yaml"
    cfg.write_text(f"data_dir: {data}\nagents:\n  - {AGENT}\n")
    return cfg


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    _refused(_config(tmp_path, data), tmp_path / "elsewhere", "is not a directory")


def test_a_data_dir_too_long_for_its_sockets_is_refused(tmp_path: Path) -> None:
    data = tmp_path / ("d" * (preflight.MAX_SOCKET_PATH - len(str(tmp_path))))
    _refused(_config(tmp_path, data), data, "too long for its ipc sockets", "pool.transport: tcp")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_read_only_data_dir_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64m") as ro:
        _refused(_config(tmp_path, ro / "data"), ro / "data", "cannot be created", "not writable")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_data_dir_on_a_full_volume_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=8m") as small:
        _refused(_config(tmp_path, small / "data"), small / "data", "MiB free", "MiB needed")


def test_the_config_bound_on_scrip_is_the_ledgers_supply() -> None:
    info = msgspec.inspect.type_info(config_mod.AgentConfig)
    assert isinstance(info, msgspec.inspect.StructType)
    scrip = next(f.type for f in info.fields if f.name == "scrip")
    assert isinstance(scrip, msgspec.inspect.IntType) and scrip.le == MAX_SUPPLY


def test_a_second_supervisor_on_the_same_data_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "one.yaml"
    cfg.write_text(
        f"data_dir: {data}\nmetrics_port: 0\nagents:\n  - {{id: a, pause_ms: 50, workload: [{{kind: echo}}]}}\n"
    )
    first = start_supervisor(cfg)
    try:
        lock = data / "run" / "supervisor.lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text() == str(first.pid)):
            assert time.monotonic() < deadline and first.poll() is None, "the first supervisor never took the lock"
            time.sleep(0.05)
        second = _run(cfg, "--duration", "2", "--no-live")
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"supervisor {first.pid} is running with it" in lines[0], lines[0]
        assert first.poll() is None  # the first one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("dump", "/nonexistent"), 2, "no event log there"),
        (("tail", "bogus://x", "--timeout", "1"), 2, "not ipc://PATH or tcp://HOST:PORT"),
        (("tail", "ipc:///nonexistent/dir/events.sock", "--timeout", "1"), 1, "is a supervisor running there?"),
    ],
)
def test_the_events_cli_says_what_is_wrong_in_one_line(args: tuple[str, ...], code: int, needle: str) -> None:
    out = python_m("runtime.events", *args, timeout_s=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert needle in lines[0] and "Traceback" not in out.stderr, lines[0]


def _wait_for_the_projects_handlers(pid: int) -> None:
    """Until the process catches SIGTERM, which Python leaves alone: the first thing the project's code
    does (``runtime.errors.command``). A signal before it lands in the interpreter's own start, before
    any of the project runs (Python says ``Could not import runpy module`` and a KeyboardInterrupt)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.001)
    raise AssertionError("the supervisor never took SIGTERM")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_of_the_start_stops_it_without_a_traceback(sig: signal.Signals, tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "start.yaml"
    cfg.write_text(
        f"data_dir: {data}\nmetrics_port: 0\nagents:\n  - {{id: a, pause_ms: 50, workload: [{{kind: echo}}]}}\n"
    )
    codes = []
    for delay in (0.0, 0.3, 0.8, 1.5, 3.0):
        proc = start_supervisor(cfg)
        _wait_for_the_projects_handlers(proc.pid)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err[-3000:])
        # Stopped while loading (one line, 128 + the signal) or by the running loop (cleanly, 0).
        assert proc.returncode in (0, 128 + sig), (delay, proc.returncode, err[-2000:])
        if proc.returncode:
            assert err.strip().splitlines()[-1] == f"error: stopped by {sig.name} while starting (nothing was opened)"
        codes.append(proc.returncode)
    check = python_m("runtime.admin", "--data-dir", str(data), "check")
    assert not (data / "ledger").exists() or "all invariants hold" in check.stdout, check.stdout + check.stderr
    print(f"{sig.name}: exit codes by delay {codes}")


#: The steps of a start, in order (``tests.signal_at_step`` sends the signal as one is entered): the
#: imports' end and ``main`` up to the loop, where a signal ends the process with one line; then, the
#: loop's handlers installed, each part the node opens and starts, where it stops cleanly with a summary.
#: ``in-finalizer:``: the signal lands in a ``__del__`` the garbage collector runs there, as it did in a
#: ``ZipFile`` left by importlib.metadata — the exit raised there was swallowed and the start ran on.
START_STEPS = [
    "in-finalizer:runtime.config:load",
    "runtime.config:load",
    "runtime.host.limits:detect",
    "runtime.ops.preflight:check",
    "in-finalizer:asyncio:run",
    "runtime.ops.preflight:claim_data_dir",
    "runtime.node:open_backends",
    "runtime.pool.pool:WorkerPool.start",
    "runtime.node:recover",
    "runtime.node:post_tasks",
    "runtime.node:Node.start_agents",
    "runtime.ops.supervisor:write_status",
]
#: How long after its signal a supervisor may take to end: a clean stop closes the pool and the stores
#: (a few seconds here, more on a loaded host); a start that lost its signal never ends.
EXIT_BOUND_S = 45.0


@pytest.mark.parametrize("step", START_STEPS)
def test_a_signal_at_each_step_of_the_start_ends_the_process_within_a_bound(step: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "start.yaml"
    cfg.write_text(
        f"data_dir: {data}\nmetrics_port: 0\nagents:\n  - {{id: a, pause_ms: 50, workload: [{{kind: echo}}]}}\n"
    )
    argv = ["tests.signal_at_step", step, "SIGTERM", "--config", str(cfg), "--no-live"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=EXIT_BOUND_S + 120)  # the start before the step, then the bound
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running long after SIGTERM at {step}: {err[-3000:]}")
    ended = time.monotonic()
    signalled = [float(line.split()[-1]) for line in err.splitlines() if line.startswith("signalled at ")]
    assert len(signalled) == 1, f"the start never reached {step}: {err[-3000:]}"
    assert ended - signalled[0] < EXIT_BOUND_S, (step, ended - signalled[0])
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    if step.endswith((":load", ":detect", ":check", ":run")):  # before the loop: one line, nothing opened
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-3000:])
        assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM while starting (nothing was opened)"
        assert not (data / "ledger").exists()
    else:  # the loop's: a clean stop, its summary written, the ledger whole
        assert proc.returncode == 0 and "usage summary: " in out, (proc.returncode, out[-2000:], err[-3000:])
        check = python_m("runtime.admin", "--data-dir", str(data), "check")
        assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_stores_and_the_pool_open_stops_cleanly_with_a_summary(
    sig: signal.Signals, tmp_path: Path
) -> None:
    # Sent the moment the data directory is claimed: after the loop took over the signals, before the
    # node has opened its stores and started its workers (the timed test above may miss this window).
    data = tmp_path / "data"
    cfg = tmp_path / "start.yaml"
    cfg.write_text(
        f"data_dir: {data}\nmetrics_port: 0\nagents:\n  - {{id: a, pause_ms: 50, workload: [{{kind: echo}}]}}\n"
    )
    proc = start_supervisor(cfg)
    lock = data / "run" / "supervisor.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text() == str(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None, "the supervisor never claimed its data_dir"
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "usage summary: " in out, out[-2000:]
    check = python_m("runtime.admin", "--data-dir", str(data), "check")
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
