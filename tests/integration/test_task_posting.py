"""The operator posts tasks with ``python -m runtime.admin task post``: to a running supervisor (a
control, announced to agents at once) or, when none runs, into the ledger it starts from; either way a
journaled ``PostTask`` that a later run takes up, hidden tests included."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import msgspec
import pytest

from runtime.actions import SubmitTask, WriteArtifact, perform
from runtime.config import Config
from runtime.world.tasks import TaskError
from runtime.world.world import World
from tests.harness import python_m, start_supervisor, wait_for_dashboard
from tests.integration.test_dashboard import _admin
from tests.integration.test_native import _free_port
from tests.integration.test_rules import _ledger_ok
from tests.integration.test_supervisor import SCRIPTED
from tests.integration.test_world import _agent, with_world


def _post(task: str, reward: int, tests: Path, *more: str) -> list[str]:
    return ["task", "post", task, "--reward", str(reward), "--tests", str(tests), *more]


def test_the_operator_posts_tasks_to_a_running_supervisor_and_into_a_stopped_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "run.yaml"
    config.write_text(SCRIPTED.format(data=data) + f"metrics_port: {_free_port()}\n")
    double, triple = tmp_path / "double.py", tmp_path / "triple.py"
    double.write_text("assert double(3) == 6\nassert double(-1) == -2\n")
    triple.write_text("assert triple(2) == 6\n")
    # No run yet: no ledger to post into, said in one line, and nothing is made.
    none = _admin(data, *_post("double", 40, double, "--description", "d"), check=False)
    assert none.returncode == 2 and none.stderr.startswith("error: no ledger") and len(none.stderr.splitlines()) == 1
    proc = start_supervisor(config)
    try:
        wait_for_dashboard(proc, data)
        args = _post("double", 40, double, "--max-awards", "2", "--description", "write double(x)")
        assert "posted task double: 40 scrip, at most 2 award(s)" in _admin(data, *args).stdout
        listed = _admin(data, "task", "list").stdout.splitlines()
        assert [line.split()[:3] for line in listed[1:]] == [["double", "40", "0/2"]]
        # Bad input: one line, nothing posted (a reward must be positive; the tests file must exist).
        bad = _admin(data, *_post("zero", 0, double, "--description", "z"), check=False)
        assert bad.returncode == 2 and bad.stderr.startswith("error: task 'zero'")
        missing = _admin(data, *_post("gone", 5, tmp_path / "nope.py", "--description", "g"), check=False)
        assert missing.returncode == 2 and "--tests" in missing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    # Stopped: straight into the ledger.
    done = _admin(data, *_post("triple", 30, triple, "--description", "write triple(x)")).stdout
    assert "posted task triple into the ledger" in done
    journal = [json.loads(line)["op"] for line in _admin(data, "journal").stdout.splitlines()]
    posts = [(o["task"], o["reward"], o["tests"]) for o in journal if o["op"] == "post_task"]
    assert posts == [("double", 40, double.read_text()), ("triple", 30, triple.read_text())]
    dump = python_m("runtime.events", "dump", str(data / "events"), timeout_s=60)
    announced = [json.loads(line) for line in dump.stdout.splitlines()]
    assert [(e["agent"], e["fields"]["task"]) for e in announced if e["kind"] == "task_posted"] == [(None, "double")]
    assert all("tests" not in e["fields"] for e in announced)

    # A later run knows both, hidden tests included: solving one pays, failing the other pays nothing.
    async def body(w: World) -> None:
        assert w.mint is not None and sorted(w.mint.tasks) == ["double", "triple"]
        await perform(w, "writer", WriteArtifact(id="sol", content="def triple(x): return 3 * x", artifact_kind="code"))
        done = await perform(w, "writer", SubmitTask(task="triple", id="sol"))
        assert done.text.endswith("earned 30 scrip")
        await perform(w, "reader", WriteArtifact(id="bad", content="def double(x): return x", artifact_kind="code"))
        scrip = w.economy.ledger.balance("reader", "scrip")
        with pytest.raises(TaskError, match="failed task `double`'s tests"):
            await perform(w, "reader", SubmitTask(task="double", id="bad"))
        assert w.economy.ledger.balance("reader", "scrip") == scrip
        assert [s.post.task for s in w.economy.ledger.tasks()] == ["double", "triple"]

    def same_agents(cfg: Config) -> Config:  # the supervisor's agents, whose accounts hold the host's CPU
        return msgspec.structs.replace(cfg, agents=[_agent("writer"), _agent("reader")])

    with_world(tmp_path, body, tweak=same_agents)
    _ledger_ok(tmp_path)
