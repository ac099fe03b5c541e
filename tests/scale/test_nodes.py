"""Three agent nodes sharing PostgreSQL and Redis, as real supervisor processes.

The population is ``config/scale-out.yaml``'s: fifteen scripted traders, three nodes of five
(``AGENT_RANGE`` 1-5, 6-10, 11-15). Each trader's partners are five and ten positions on, so every
payment, every invocation of a partner's tool and every wake-up by a payment crosses nodes.

One test, in phases (each waits for what it needs, within generous bounds, rather than for a fixed
time): all three run until cross-node transfers, invocations and wake-ups have happened; node 2 is
killed with SIGKILL; nodes 1 and 3 go on (and pay node 2's agents, which are down); node 2 restarts
on its data directory, resumes its agents and catches up on the news it missed; all stop cleanly.
Then the shared ledger's invariants hold and every task is recorded exactly once, by the node that
ran it.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from runtime.economy.ledger import Transfer
from runtime.economy.ledger.check import check
from runtime.economy.ledger.postgres import PostgresLedger
from runtime.world.events import Event
from runtime.world.events.postgres import PostgresEventLog
from tests.harness import ROOT
from tests.scale.nodes import Node, node_of

pytestmark = pytest.mark.slow

RANGES = {"node1": "1-5", "node2": "6-10", "node3": "11-15"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The shipped scale-out configuration, with one worker per node and no metrics port (three nodes
    share this host)."""
    raw = yaml.safe_load((ROOT / "config" / "scale-out.yaml").read_text())
    raw.update(metrics_port=0, status_interval_s=0.5)
    raw["pool"]["workers"] = 1
    path = tmp_path / "scale-out.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def nodes(config: Path, tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[list[Node]]:
    env = {
        "POSTGRES_URL": pg_url,
        "REDIS_URL": redis_url,
        "AECO_NAMESPACE": f"test-{uuid.uuid4().hex[:8]}",
        "AECO_CONNECT_TIMEOUT_S": "30",
    }
    made = [Node(name, r, config, tmp_path, env) for name, r in RANGES.items()]
    try:
        yield made
    finally:
        for n in made:
            if n.alive():
                n.kill()


def _until(what: str, cond: Callable[[], bool], timeout_s: float, nodes: list[Node], at_least_s: float = 0.0) -> None:
    """Poll ``cond`` every half second for at least ``at_least_s`` and until it holds; fail after
    ``timeout_s`` showing every node's output, or as soon as a node that should run has died."""
    start = time.monotonic()
    while True:
        done = time.monotonic() - start >= at_least_s and cond()
        if done:
            return
        dead = [n.name for n in nodes if n.proc is not None and not n.alive()]
        if dead or time.monotonic() - start > timeout_s:
            why = f"{', '.join(dead)} died" if dead else f"not within {timeout_s:g} s"
            logs = "\n".join(f"--- {n.name}\n{n.output()[-2500:]}" for n in nodes)
            pytest.fail(f"waiting for {what}: {why}\n{logs}")
        time.sleep(0.5)


def _cross(nodes: list[Node], a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and node_of(nodes, a) is not node_of(nodes, b)


class World:
    """What the test reads of the shared state while the nodes run."""

    def __init__(self, events: PostgresEventLog, nodes: list[Node]) -> None:
        self.events, self.nodes = events, nodes

    def all(self, since: int = 0) -> list[Event]:
        return self.events.read(since)

    def cross_transfers(self, since: int = 0) -> list[Event]:
        return [
            e for e in self.all(since) if e.kind == "transfer" and _cross(self.nodes, e.fields.get("from"), e.agent)
        ]

    def cross_invocations(self, since: int = 0) -> list[Event]:
        return [
            e
            for e in self.all(since)
            if e.kind == "artifact_invoked" and e.fields.get("ok") and _cross(self.nodes, e.fields.get("by"), e.agent)
        ]

    def remote_wakes(self, since: int = 0) -> list[tuple[Event, Event]]:
        """(the sleeper's action, the event that woke it) where the waker lives on another node."""
        evs = self.all(since)
        by_seq = {e.seq: e for e in self.all()}
        out = []
        for e in evs:
            result = str(e.fields.get("result", ""))
            if e.kind == "action" and e.fields.get("action") == "sleep" and result.startswith("woke on transfer #"):
                cause = by_seq[int(result.rpartition("#")[2])]
                if (
                    cause.kind == "transfer"
                    and cause.agent == e.agent
                    and _cross(self.nodes, cause.fields["from"], e.agent)
                ):
                    out.append((e, cause))
        return out

    def actions_by(self, node: Node, since: int = 0) -> int:
        return sum(
            1 for e in self.all(since) if e.kind == "action" and e.agent and node_of(self.nodes, e.agent) is node
        )


def test_three_nodes_trade_invoke_wake_each_other_and_survive_a_kill(nodes: list[Node], pg_url: str) -> None:
    node1, node2, node3 = nodes
    for n in nodes:  # at once: their migrations and account openings race, as in a real deployment
        n.start()
    for n in nodes:
        n.wait_up()
    events = PostgresEventLog(pg_url)
    try:
        world = World(events, nodes)
        # ---------------------------------------------------------------- all three nodes running
        _until(
            "cross-node transfers, invocations and a wake-up from another node",
            lambda: bool(world.cross_transfers() and world.cross_invocations() and world.remote_wakes()),
            timeout_s=180,
            nodes=nodes,
            at_least_s=15,
        )
        for n in nodes:
            assert world.actions_by(n) > 0, n.name
        # ---------------------------------------------------------------- node 2 killed mid-run
        node2_agents = [f"a{i:03d}" for i in node2.agents]
        node2.kill()
        killed_at = events.last_seq()
        cursors_at_kill = {a: events.cursor(a) for a in node2_agents}
        _until(
            "nodes 1 and 3 to go on, paying node 2's agents while it is down",
            lambda: (
                world.actions_by(node1, killed_at) >= 10
                and world.actions_by(node3, killed_at) >= 10
                and any(e.agent in node2_agents for e in world.cross_transfers(killed_at))
            ),
            timeout_s=120,
            nodes=[node1, node3],
            at_least_s=4,
        )
        restarted_at = events.last_seq()
        # News for node 2's agents that arrived while it was down: it must catch up on it.
        missed = {
            a: max(e.seq for e in events.read(killed_at, agent=a, kinds={"transfer"}) if e.seq <= restarted_at)
            for a in node2_agents
            if any(e.seq <= restarted_at for e in events.read(killed_at, agent=a, kinds={"transfer"}))
        }
        assert missed, "no payment reached node 2's agents during the outage"
        assert node1.alive() and node3.alive()
        # ---------------------------------------------------------------- node 2 restarted
        node2.start()
        node2.wait_up()
        _until(
            "node 2's agents to resume and read past the news they missed",
            lambda: (
                all(any(e.kind == "action" and e.agent == a for e in world.all(restarted_at)) for a in node2_agents)
                and all(events.cursor(a) >= seq for a, seq in missed.items())
            ),
            timeout_s=180,
            nodes=nodes,
        )
        for a in node2_agents:
            assert events.cursor(a) > cursors_at_kill[a], a
        # A wake-up across nodes involving node 2 after its restart: it is part of the world again.
        _until(
            "a wake-up of or by a restarted agent",
            lambda: any(
                node2 in (node_of(nodes, e.agent or ""), node_of(nodes, str(c.fields["from"])))
                for e, c in world.remote_wakes(restarted_at)
            ),
            timeout_s=120,
            nodes=nodes,
        )
    finally:
        events.close()
    codes = {n.name: n.stop() for n in nodes}
    assert codes == dict.fromkeys(RANGES, 0), "\n".join(n.output()[-2000:] for n in nodes)
    for n in nodes:
        assert "Traceback" not in n.output(), n.output()[-3000:]

    # -------------------------------------------------------------------- afterwards: the books
    ledger = PostgresLedger(pg_url)
    try:
        report = check(ledger)
        assert report.ok, report.problems[:10]
        records = list(ledger.usage_records())
        transfers = [e.op for e in ledger.journal() if isinstance(e.op, Transfer)]
    finally:
        ledger.close()
    assert any(_cross(nodes, t.src, t.dst) for t in transfers)
    # Every task is recorded once, by the node that runs its agent, under one of that node's runs.
    assert len({r.task_id for r in records}) == len(records)
    run_of = {run: n for n in nodes for run in n.runs}
    assert len(run_of) == 4  # node 2 started twice, each start a run of its own
    per_run: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in records:
        run = r.task_id.rpartition("-")[0]
        assert run in run_of, f"task {r.task_id} of {r.agent} belongs to no node's run"
        assert node_of(nodes, r.agent) is run_of[run], f"{r.agent}'s task {r.task_id} was run by {run_of[run].name}"
        if r.kind != "supervisor":  # the supervisor's own work for an agent, charged with no task of its own
            per_run[(run, r.agent)] += 1
    # The killed run recorded what it finished before it died (and nothing twice).
    assert any(run == node2.runs[0] for run, _ in per_run)
    # A cleanly stopped run's own count of finished tasks equals its records, agent by agent.
    for n in nodes:
        summary = json.loads((n.data / "usage-summary.json").read_text())
        counted = {a: t["tasks"] for a, t in summary["agents"].items() if t["tasks"]}
        recorded = {a: k for (run, a), k in per_run.items() if run == n.runs[-1]}
        assert counted == recorded, n.name
