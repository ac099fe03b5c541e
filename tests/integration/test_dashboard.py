"""The web dashboard in a real browser: headless Chromium from Debian (installed by
``scripts/ensure-browser``, which ``make test`` runs), driven by Playwright for Python, against a
running supervisor. Screenshots are saved in the test's temporary directory; with
``AECO_SCREENSHOTS=1`` under ``benchmarks/results/`` (the ones the README shows), so that a test run
leaves the checkout as it found it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.world.events.log import EventLog
from tests.harness import ROOT, python_m, start_supervisor, wait_for_dashboard
from tests.integration.store_backends import assert_fsck, git
from tests.integration.test_native import _free_port
from tests.integration.test_supervisor import SCRIPTED


def _shots(tmp_path: Path) -> Path:
    """Where this run's screenshots go (module docstring)."""
    return ROOT / "benchmarks" / "results" if os.environ.get("AECO_SCREENSHOTS") == "1" else tmp_path


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium (scripts/ensure-browser installs Debian's as root)")
    return path


def _actions(url: str, agent: str) -> int:
    st = json.loads(urllib.request.urlopen(f"{url}/api/status", timeout=10).read())
    (a,) = [a for a in st["agents"] if a["id"] == agent]
    return int(a["actions"] + a["rejected"])


def _tree(repo: Path, commit: str) -> str:
    """The tree of ``commit`` in the store's repository, by the git CLI."""
    out = git(repo, "rev-parse", f"{commit}^{{tree}}")
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def _admin(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = python_m("runtime.admin", "--data-dir", str(data), *args, timeout_s=60)
    assert not check or out.returncode == 0, out.stderr
    return out


def test_the_dashboard_shows_the_run_live_and_controls_need_the_token(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    port = _free_port()
    data = tmp_path / "data"
    config = tmp_path / "dash.yaml"
    config.write_text(SCRIPTED.format(data=data) + f"metrics_port: {port}\n")
    url = f"http://127.0.0.1:{port}"
    repo = data / "artifacts.git"
    proc = start_supervisor(config)
    try:
        token_file = wait_for_dashboard(proc, data)
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            writer = page.locator("#agent-writer")
            expect(writer).to_be_visible(timeout=30_000)
            # The agents update: the writer's action count grows on the page.
            first = int(writer.locator("td").nth(2).inner_text().split()[0])
            page.wait_for_function(
                "n => parseInt(document.querySelector('#agent-writer td:nth-child(3)').textContent) > n",
                arg=first,
                timeout=30_000,
            )
            # The events arrive live: more of them than when we looked.
            expect(page.locator("#events li").first).to_be_visible(timeout=30_000)
            # The newest line changes (the list keeps the last 200, so counting them can stall at 200).
            newest = page.locator("#events li").first.inner_text()
            page.wait_for_function(
                "t => document.querySelector('#events li').innerText !== t", arg=newest, timeout=30_000
            )
            expect(page.locator("#artifacts tbody tr")).to_have_count(1, timeout=30_000)
            page.screenshot(path=str(_shots(tmp_path) / "dashboard-live.png"), full_page=True)

            # Without the token a control is refused, and nothing happens.
            writer.locator("button.pause").click()
            expect(page.locator("#control-result")).to_contain_text("refused", timeout=10_000)
            assert page.locator("#control-result").get_attribute("data-status") == "401"
            assert "paused" not in (writer.get_attribute("class") or "")

            # With it, the writer is paused: the page shows it, and it stops acting while the reader goes on.
            # (It has written its diary twice by then, so the diary's oldest version is not HEAD's: see below.)
            deadline = time.monotonic() + 60
            while _actions(url, "writer") < 6:
                assert time.monotonic() < deadline, "the writer does not act"
                time.sleep(0.1)
            page.fill("#token", token)
            page.dispatch_event("#token", "change")
            writer.locator("button.pause").click()
            expect(page.locator("#control-result")).to_contain_text("done: agent_paused writer", timeout=10_000)
            expect(writer).to_have_class("paused", timeout=10_000)
            at_pause = _actions(url, "writer")
            reader_at_pause = _actions(url, "reader")
            page.wait_for_function(
                "n => parseInt(document.querySelector('#agent-reader td:nth-child(3)').textContent) > n + 10",
                arg=reader_at_pause,
                timeout=60_000,
            )
            assert _actions(url, "writer") <= at_pause + 1  # at most the turn it was in
            writer.locator("button.grant").click()
            expect(page.locator("#control-result")).to_contain_text("done: mint 100 scrip for writer", timeout=10_000)
            page.locator("#agent-writer td").first.click()
            expect(page.locator("#bill tbody tr").last).to_contain_text("total", timeout=10_000)
            page.screenshot(path=str(_shots(tmp_path) / "dashboard-paused.png"), full_page=True)

            # A rollback from the page, while the supervisor runs: the diary's history, its oldest version
            # chosen; HEAD's tree becomes that commit's (the paused writer writes nothing in between).
            page.locator("#artifact-diary td").first.click()
            oldest = page.locator("#history tbody tr").last
            expect(oldest.locator("td").nth(2)).to_have_text("write", timeout=10_000)
            target = oldest.get_attribute("data-commit")
            assert target is not None and _tree(repo, "HEAD") != _tree(repo, target)
            oldest.locator("button.rollback").click()
            expect(page.locator("#control-result")).to_contain_text(f"done: rolled back to {target}", timeout=10_000)
            assert _tree(repo, "HEAD") == _tree(repo, target)
            expect(page.locator("#events li.system_reset").first).to_be_visible(timeout=10_000)
            expect(page.locator("#history tbody tr").first.locator("td").nth(2)).to_have_text("reset", timeout=10_000)
            page.screenshot(path=str(_shots(tmp_path) / "dashboard-rollback.png"), full_page=True)
            browser.close()
        # The same controls from the command line (the token from the data directory).
        assert "agent_resumed writer" in _admin(data, "control", "resume", "writer").stdout
        writer_now = _actions(url, "writer")
        deadline = time.monotonic() + 60
        while _actions(url, "writer") <= writer_now + 2:
            assert time.monotonic() < deadline, "the resumed writer does not act"
            time.sleep(0.2)
        assert "burn 50 scrip for writer" in _admin(data, "control", "burn", "writer", "scrip", "50").stdout
        assert "operator_note (event" in _admin(data, "control", "note", "the market closes at five").stdout
        unknown = _admin(data, "control", "pause", "nobody", check=False)
        assert unknown.returncode == 1 and "no agent 'nobody'" in unknown.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    # Both controls are journaled: the pause in the event log, the grant in the ledger.
    dump = python_m("runtime.events", "dump", str(data / "events"), timeout_s=60)
    logged = list(map(json.loads, dump.stdout.splitlines()))
    controls = [e for e in logged if e["kind"] in ("agent_paused", "agent_resumed")]
    assert [(e["kind"], e["agent"], e["fields"]["by"]) for e in controls] == [
        ("agent_paused", "writer", "operator"),
        ("agent_resumed", "writer", "operator"),
    ]
    notes = [(e["agent"], e["fields"]["text"]) for e in logged if e["kind"] == "operator_note"]
    assert notes == [(None, "the market closes at five")]
    journal = _admin(data, "journal")
    ops = [e["op"] for e in map(json.loads, journal.stdout.splitlines()) if e["op"]["op"] in ("mint", "burn")]
    assert [(m["op"], m["account"], m["asset"], m["amount"], m["reason"]) for m in ops] == [
        ("mint", "writer", "scrip", 100, "operator grant"),
        ("burn", "writer", "scrip", 50, "operator burn"),
    ]
    resets = [e for e in logged if e["kind"] == "system_reset"]
    assert [(e["agent"], e["fields"]["to"]) for e in resets] == [(None, target)]
    with EventLog(str(data / "events"), readonly=True) as log:  # both agents' news showed them the reset
        assert log.cursor("reader") >= resets[0]["seq"] and log.cursor("writer") >= resets[0]["seq"]
    assert_fsck(repo)
    _replay_serves_the_stopped_run(data)


def _started(config: Path, url: str) -> subprocess.Popen[str]:
    """A supervisor on ``config`` whose dashboard at ``url`` answers with its status."""
    proc = start_supervisor(config)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the dashboard does not answer"
        try:
            st = json.loads(urllib.request.urlopen(f"{url}/api/status", timeout=10).read())
        except (OSError, ValueError):
            st = {}
        if st.get("pid") == proc.pid:
            return proc
        time.sleep(0.2)


def _stopped(proc: subprocess.Popen[str]) -> str:
    """Stop a supervisor (SIGTERM); its standard output. It must exit 0."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return out


def _until(what: str, done: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_pause_outlives_a_restart_and_a_rollback_runs_while_the_agents_do(tmp_path: Path) -> None:
    """Controls from ``python -m runtime.admin`` against a running supervisor: a rollback while it runs
    (refused without the token), and a pause that the next supervisor on the same data directory
    replays from the event log until the operator resumes the agent."""
    port = _free_port()
    data = tmp_path / "data"
    config = tmp_path / "restart.yaml"
    config.write_text(SCRIPTED.format(data=data) + f"metrics_port: {port}\n")
    url, repo = f"http://127.0.0.1:{port}", data / "artifacts.git"
    proc = _started(config, url)
    try:
        _until("the writer does not act", lambda: _actions(url, "writer") >= 3)
        root = git(repo, "rev-list", "--max-parents=0", "HEAD").stdout.decode().strip()
        head = _tree(repo, "HEAD")
        # Without the token, a rollback is refused and the store is left as it was.
        req = urllib.request.Request(f"{url}/api/control", data=f'{{"type": "rollback", "to": "{root}"}}'.encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401  # and nothing was reset: the one reset in the history is the next one
        assert "agent_paused writer" in _admin(data, "control", "pause", "writer").stdout
        # The store's first commit (the empty tree): with the writer paused, HEAD's tree stays that one.
        assert f"rolled back to {root}" in _admin(data, "control", "rollback", root).stdout
        assert _tree(repo, "HEAD") == _tree(repo, root) != head
        with EventLog(str(data / "events"), readonly=True) as log:
            (reset,) = log.read(kinds=["system_reset"])
            assert reset.agent is None and reset.fields["to"] == root
            _until("the reader is not shown the reset", lambda: log.cursor("reader") >= reset.seq)
        assert _tree(repo, "HEAD") == _tree(repo, root)
    finally:
        first_out = _stopped(proc)
    assert "paused by the operator" not in first_out
    assert_fsck(repo)

    proc = _started(config, url)
    try:
        # The pause is replayed: the writer takes no turn at all while the reader takes many.
        _until("the reader does not act", lambda: _actions(url, "reader") >= 10)
        st = json.loads(urllib.request.urlopen(f"{url}/api/status", timeout=10).read())
        (writer,) = [a for a in st["agents"] if a["id"] == "writer"]
        assert writer["state"] == "paused" and writer["actions"] + writer["rejected"] == 0
        assert _tree(repo, "HEAD") == _tree(repo, root)
        assert "agent_resumed writer" in _admin(data, "control", "resume", "writer").stdout
        _until("the resumed writer does not act", lambda: _actions(url, "writer") >= 3)
    finally:
        second_out = _stopped(proc)
    assert "paused by the operator: writer" in second_out
    assert _tree(repo, "HEAD") != _tree(repo, root)  # the writer wrote its diary again
    subjects = git(repo, "log", "--format=%s", "HEAD").stdout.decode().splitlines()
    assert [s for s in subjects if s.startswith("system reset")] == [f"system reset to {root}"]
    assert_fsck(repo)
    with EventLog(str(data / "events"), readonly=True) as log:
        controls = [(e.kind, e.agent) for e in log.read(kinds=["agent_paused", "agent_resumed"])]
        assert controls == [("agent_paused", "writer"), ("agent_resumed", "writer")]
        # The reset was announced once: the second start found HEAD at a reset it had already announced.
        assert [e.seq for e in log.read(kinds=["system_reset"])] == [reset.seq]
        assert log.cursor("writer") >= reset.seq  # the writer, resumed, was shown the reset too


def _replay_serves_the_stopped_run(data: Path) -> None:
    """``python -m runtime.ops.dashboard --data-dir``: the last status, the log's events, bills and
    artifacts of the stopped run; controls are refused."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.ops.dashboard", "--data-dir", str(data), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and "read-only" in proc.stdout.readline()
        st = json.loads(urllib.request.urlopen(f"{url}/api/status", timeout=10).read())
        assert st["running"] is False and {a["id"] for a in st["agents"]} == {"writer", "reader"}
        with urllib.request.urlopen(f"{url}/api/events?since=0", timeout=10) as stream:
            first = json.loads(stream.readline().removeprefix(b"data: "))
        assert first["seq"] == 1
        b = json.loads(urllib.request.urlopen(f"{url}/api/bill/writer", timeout=10).read())
        assert b["total"]["tasks"] > 0
        arts = json.loads(urllib.request.urlopen(f"{url}/api/artifacts", timeout=10).read())
        assert [(a["id"], a["owner"]) for a in arts] == [("diary", "writer")]
        req = urllib.request.Request(f"{url}/api/control", data=b'{"type": "resume", "agent": "writer"}')
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
