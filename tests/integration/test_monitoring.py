"""The seed's monitoring on a running supervisor: network and CPU throttling numbers move when the
container makes traffic or exceeds its CPU quota, and dollars spent and left reach every surface
(the live view's frame, ``status.json``, ``python -m runtime.status`` and ``/metrics``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from native.tiny_model import write_tiny_model
from runtime.ops.bill import Bill
from runtime.ops.status import Status
from tests.cgroup_box import cgroup_box
from tests.harness import ROOT, python_m
from tests.integration.test_native import _free_port, _llama_server

BURNERS = """
data_dir: {data}
pool: {{workers: 2, heartbeat_s: 0.5}}
agents:
  - id: burner
    workload: [{{kind: burn, ms: 100}}]
  - id: stoker
    workload: [{{kind: burn, ms: 100}}]
status_interval_s: 0.2
"""


@contextmanager
def _supervisor(config: Path, prefix: list[str] | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "runtime.supervisor", "--config", str(config), "--no-live"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]


def _status_when(path: Path, proc: subprocess.Popen[str], cond: Callable[[Status], bool], timeout_s: float) -> Status:
    """The supervisor's status once ``cond`` holds for it (it is rewritten every status interval)."""
    deadline = time.monotonic() + timeout_s
    last: Status | None = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the supervisor exited: {proc.communicate()[1][-3000:]}"
        try:
            last = msgspec.json.decode(path.read_bytes(), type=Status)
        except (FileNotFoundError, msgspec.DecodeError):
            last = None
        if last is not None and cond(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"no status within {timeout_s} s met the condition; the last: {last}")


def _metrics(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _loopback_traffic(n_bytes: int) -> None:
    """Send ``n_bytes`` through a TCP connection over loopback, and receive them."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        got = 0

        def sink() -> None:
            nonlocal got
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 16):
                    got += len(chunk)

        reader = threading.Thread(target=sink)
        reader.start()
        with socket.create_connection(server.getsockname()) as c:
            c.sendall(b"x" * n_bytes)
        reader.join(timeout=30)
    assert got == n_bytes


def test_network_numbers_move_when_the_container_makes_traffic(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "net.yaml"
    config.write_text(BURNERS.format(data=tmp_path / "data") + f"metrics_port: {port}\n")
    path = tmp_path / "data" / "run" / "status.json"
    with _supervisor(config) as proc:
        first = _status_when(path, proc, lambda s: s.container is not None and s.container.network is not None, 60)
        assert first.container is not None and first.container.network is not None
        before = first.container.network.loopback
        scraped = _metrics(port)['aeco_container_network_bytes_total{direction="in",interfaces="loopback"}']
        sent = 16 << 20
        _loopback_traffic(sent)
        done = time.time()
        # A status written after the traffic may rest on a sample taken before it: the next one cannot.
        written = _status_when(path, proc, lambda s: s.at > done, 30).at
        later = _status_when(path, proc, lambda s: s.at > written, 30)
        assert later.container is not None and later.container.network is not None
        after = later.container.network.loopback
        assert after.bytes_in - before.bytes_in >= sent
        assert after.bytes_out - before.bytes_out >= sent
        assert after.packets_in > before.packets_in
        assert _metrics(port)['aeco_container_network_bytes_total{direction="in",interfaces="loopback"}'] >= (
            scraped + sent
        )
        assert "network in/out:" in later.table and "loopback" in later.table
        # The agents' pace: both burn back to back, and an interval sees each finish some.
        busy = _status_when(path, proc, lambda s: all(a.actions_per_s > 0 for a in s.agents), 30)
        assert busy.totals is not None
        assert busy.totals.actions_per_s == sum(a.actions_per_s for a in busy.agents)
        assert all(0 <= a.blocked_share <= 1 and a.actions == a.tasks for a in busy.agents)


def test_throttling_numbers_move_when_the_container_exceeds_its_cpu_quota(tmp_path: Path) -> None:
    config = tmp_path / "quota.yaml"
    config.write_text(BURNERS.format(data=tmp_path / "data"))
    path = tmp_path / "data" / "run" / "status.json"
    # Two workers burning back to back want two CPUs; the box gives half of one.
    with cgroup_box(0.5, memory_bytes=4 << 30) as prefix, _supervisor(config, prefix) as proc:
        first = _status_when(path, proc, lambda s: s.container is not None and s.container.throttling is not None, 90)
        assert first.container is not None and first.container.throttling is not None
        assert "aeco-box-" in first.container.throttling.source  # the box's cpu.stat, where its quota is
        later = _status_when(
            path,
            proc,
            lambda s: (
                s.container is not None
                and s.container.throttling is not None
                and s.container.throttling.throttled > first.container.throttling.throttled  # type: ignore[union-attr]
                and (s.container.throttled_share or 0) > 0.5
            ),
            60,
        )
        assert later.container is not None and later.container.throttling is not None
        assert later.container.throttling.throttled_seconds > first.container.throttling.throttled_seconds
        assert later.container.throttling.periods > first.container.throttling.periods
        assert "OVER 90%" in later.table  # the live view marks it
        # Memory is read against the box's limit, with the 90% mark.
        assert later.container.memory_limit_bytes == 4 << 30
        assert later.container.memory_share is not None and 0 < later.container.memory_share < 0.9
        assert not later.container.memory_high and "under 90%" in later.table


LLM = """
data_dir: {data}
pool: {{workers: 2, heartbeat_s: 0.5}}
llm:
  endpoint: "{base}"
  model: tiny
  max_tokens: 64
  prices: {{tiny: {{prompt_per_1k: 2.0, completion_per_1k: 2.0}}}}
agents:
  - {{id: ann, brain: llm, llm_budget_usd: 5.0}}
  - {{id: ben, brain: llm, llm_budget_usd: 5.0}}
status_interval_s: 0.2
metrics_port: {port}
"""


def test_dollars_spent_and_left_reach_every_surface(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny.gguf")
    port = _free_port()
    config = tmp_path / "llm.yaml"
    path = tmp_path / "data" / "run" / "status.json"
    with _llama_server(model, tmp_path / "server.log") as base:
        config.write_text(LLM.format(data=tmp_path / "data", base=base, port=port))
        with _supervisor(config) as proc:
            st = _status_when(path, proc, lambda s: s.totals is not None and s.totals.spent_usd > 0, 120)
            values = _metrics(port)
            shown = python_m("runtime.status", "--data-dir", str(tmp_path / "data"), timeout_s=60)
    assert st.totals is not None
    by_id = {a.id: a for a in st.agents}
    spent = sum(a.spent_usd for a in by_id.values())
    assert spent == st.totals.spent_usd > 0
    assert all(a.budget_left_usd <= 5.0 for a in by_id.values()) and st.totals.budget_left_usd < 10.0
    # The live view's frame (the table) has a column for each and the totals line.
    assert "$ spent" in st.table and "$ left" in st.table
    assert f"${st.totals.spent_usd:.4f} spent" in st.table
    # python -m runtime.status prints the same.
    assert shown.returncode == 0 and "$ spent" in shown.stdout and " spent, $" in shown.stdout
    # /metrics, scraped after the status: at least what it said.
    scraped = sum(values[f'aeco_agent_llm_spent_usd_total{{agent="{a}"}}'] for a in ("ann", "ben"))
    assert scraped >= spent - 1e-9
    left = sum(values[f'aeco_agent_llm_budget_left_usd{{agent="{a}"}}'] for a in ("ann", "ben"))
    assert 0 <= left < 10.0
    # The bill from the ledger: the run's last status (written at the stop) spent exactly what it says.
    final = msgspec.json.decode(path.read_bytes(), type=Status)
    assert not final.running and final.totals is not None and final.totals.spent_usd > 0
    for a in final.agents:
        # Every charge is durable by then: what is left is the budget less what was spent, to the
        # micro-dollar (or nothing, once a think cost more than was left).
        assert abs(a.budget_left_usd - (5.0 - a.spent_usd)) < 1e-6 or (a.budget_left_usd == 0 and a.spent_usd > 5.0)
        out = subprocess.run(
            [sys.executable, "-m", "runtime.admin", "--data-dir", str(tmp_path / "data"), "bill", a.id, "--json"],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        b = msgspec.json.decode(out.stdout, type=Bill)
        assert b.total.llm_tokens > 0 if a.spent_usd else b.total.llm_cost_usd == 0
        assert abs(b.total.llm_cost_usd - a.spent_usd) < 1e-6
        assert b.total.cpu_seconds >= a.cpu_seconds - 1e-6


THINKERS = """
data_dir: {data}
pool: {{workers: 2, heartbeat_s: 0.5}}
llm: {{model: "{model}", max_tokens: 96}}
agents:
{agents}
status_interval_s: 0.2
metrics_port: {port}
"""


def test_batched_thinking_reaches_every_surface(tmp_path: Path) -> None:
    """8 LLM agents on 2 workers: status.json, the live view's table, ``python -m runtime.status`` and
    ``/metrics`` show thinks in batches at once, batch sizes, prefix-cache hits and tokens reused."""
    model = write_tiny_model(tmp_path / "tiny.gguf")
    port = _free_port()
    config = tmp_path / "thinkers.yaml"
    path = tmp_path / "data" / "run" / "status.json"
    agents = "\n".join(f"  - {{id: t{i}, brain: llm, cpu_rate: 100, llm_rate: 5000}}" for i in range(8))
    config.write_text(THINKERS.format(data=tmp_path / "data", model=model, agents=agents, port=port))

    def enough(s: Status) -> bool:
        t = s.thinking
        return t is not None and t.batched_peak >= 5 and t.prefix_hits > 0 and t.largest > 1

    with _supervisor(config) as proc:
        st = _status_when(path, proc, enough, 180)
        values = _metrics(port)
        shown = python_m("runtime.status", "--data-dir", str(tmp_path / "data"), timeout_s=60)
    t = st.thinking
    assert t is not None and t.tokens_evaluated > 0 and t.tokens_reused > 0
    assert sum(t.sizes.values()) == t.batches and sum(n * k for n, k in t.sizes.items()) == t.batched_thinks
    assert "thinking in batches now" in st.table and "prefix hits" in st.table
    assert shown.returncode == 0 and "thinking in batches now" in shown.stdout
    # /metrics, scraped after the status: at least what it said.
    batches = {k: v for k, v in values.items() if k.startswith("aeco_think_batches_total{")}
    assert sum(batches.values()) >= t.batches and any(v > 0 for k, v in batches.items() if 'size="1"' not in k)
    assert values["aeco_think_prefix_hits_total"] >= t.prefix_hits
    assert values['aeco_think_prompt_tokens_total{how="reused"}'] >= t.tokens_reused > 0
    assert values['aeco_think_prompt_tokens_total{how="evaluated"}'] >= t.tokens_evaluated
    assert "aeco_thinks_batched_now" in values and "aeco_remote_thinks_in_flight" in values
