"""``docker-compose.yml`` as a user runs it: ``podman-compose up`` on a real engine.

The deployment file itself, with ``deploy/compose/offline.yml`` for what this host cannot have (official
images: PostgreSQL and Redis are built from Debian's packages; no Qdrant server, the nodes keep memories
in local mode) and the project's image for ``setup`` and the three nodes. Checked: the one-shot
``setup`` runs once, to completion, before any node starts; the services' own health checks pass; the
nodes act and trade across nodes (read from the shared ledger); a node whose container is killed
(``kill -9`` of its main process from the host) comes back under ``restart: unless-stopped`` and acts
again; afterwards, with the nodes stopped, ``admin check`` finds every invariant intact. The compose
file refuses to start without its passwords. Timings are printed (``pytest -s``) at the end.

The deployment comes up as the README tells Podman users to bring it up, in two steps: the servers
and ``setup`` (waited for, exit status 0), then the nodes with ``--no-deps``. One ``podman-compose up``
would run ``setup`` again each time a node starts: podman-compose (1.6) turns every ``depends_on`` into
``podman --requires``, and ``podman start`` starts a required container that has exited, one-shot or
not (podman-compose issue 1467, open); on Podman 4.3 the nodes then fail to start at all (a broken
dependency graph). Docker Compose has no such problem: ``docker compose up -d``.
podman-compose also enforces ``service_healthy`` only on Podman ≥ 4.6; on older Podman (Debian 12's
4.3) it warns and starts the dependent at once, and the runtime's own patience (connections retried
with back-off up to ``node.connect_timeout_s``) carries ``setup`` and the nodes over a PostgreSQL that
is still starting.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from benchmarks.engine import Engine
from runtime import config as config_mod
from tests.container.compose import FILES, Deployment, infra_images, stamp, until
from tests.harness import ROOT

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

NODES = ("node1", "node2", "node3")
KILLED = "node2"


def _ranges() -> dict[str, range]:
    """Each node service's agent positions, from the compose file."""
    services = yaml.safe_load(FILES[0].read_text())["services"]
    out = {}
    for name in NODES:
        first, last = (int(x) for x in services[name]["environment"]["AGENT_RANGE"].split("-"))
        out[name] = range(first, last + 1)
    return out


def _agents() -> list[str]:
    return [a.id for a in config_mod.load(ROOT / "config" / "scale-out.yaml", environ={}).agents]


def _project(engine: Engine, **images: str) -> Deployment:
    """A compose project under a name of its own, with fresh random passwords."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith("PASSWORD")},
        "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
        "AGENT_PASSWORD": secrets.token_urlsafe(18),
        **images,
    }
    return Deployment(engine, f"aeco-deploy-{os.getpid()}-{secrets.token_hex(3)}", env)


@pytest.fixture
def deployment(engine: Engine, image: str) -> Iterator[Deployment]:
    """A compose project with its images ready, taken down afterwards (whatever happened)."""
    infra = infra_images(engine)
    dep = _project(
        engine,
        AECO_IMAGE=image,
        AECO_POSTGRES_IMAGE=infra["aeco-postgres"].image,
        AECO_REDIS_IMAGE=infra["aeco-redis"].image,
    )
    try:
        yield dep
    finally:
        start = time.monotonic()
        dep.down()
        print(f"compose: down in {time.monotonic() - start:.1f} s")
        assert not dep.containers("postgres") and not dep.containers(KILLED)


def test_the_compose_file_refuses_to_start_without_its_passwords(engine: Engine) -> None:
    dep = _project(engine)
    try:
        for missing in ("POSTGRES_PASSWORD", "AGENT_PASSWORD"):
            env = {k: v for k, v in dep.env.items() if k != missing}
            out = Deployment(engine, dep.project, env).compose("up", "-d", check=False)
            assert out.returncode != 0
            assert f"required variable {missing} is missing a value" in out.stderr, out.stderr[-2000:]
            assert not dep.containers("postgres"), "a container was made although the file was refused"
    finally:
        dep.down()


class Ledger:
    """The shared ledger as ``python -m runtime.admin`` prints it, from inside a running node."""

    def __init__(self, dep: Deployment, ranges: dict[str, range], agents: list[str]) -> None:
        self.dep = dep
        self.node_of = {agents[pos - 1]: node for node, r in ranges.items() for pos in r}

    def journal(self, via: str = "node1") -> list[dict[str, Any]]:
        out = self.dep.exec(via, "python", "-m", "runtime.admin", "journal")
        assert out.returncode == 0, out.stdout[-1000:] + out.stderr[-2000:]
        return [json.loads(line) for line in out.stdout.splitlines()]

    def usage(self, journal: list[dict[str, Any]], node: str, since: int = 0) -> list[dict[str, Any]]:
        """The usage records of ``node``'s agents after journal entry ``since``."""
        return [
            e["op"]
            for e in journal
            if e["seq"] > since and e["op"]["op"] == "usage" and self.node_of.get(e["op"]["agent"]) == node
        ]

    def cross_transfers(self, journal: list[dict[str, Any]]) -> set[tuple[str, str]]:
        """(payer's node, payee's node) of every transfer between agents on different nodes."""
        pairs = set()
        for e in journal:
            op = e["op"]
            if op["op"] == "transfer" and op["src"] in self.node_of and op["dst"] in self.node_of:
                src, dst = self.node_of[op["src"]], self.node_of[op["dst"]]
                if src != dst:
                    pairs.add((src, dst))
        return pairs


def _run_ids(logs: str) -> list[str]:
    """The run id of each start of a node, from its start-up lines (``node n6-10, run r…: …``)."""
    return [line.split(", run ", 1)[1].split(":", 1)[0] for line in logs.splitlines() if ", run " in line]


def test_the_compose_file_runs_heals_a_killed_node_and_keeps_the_books(deployment: Deployment) -> None:
    dep = deployment
    timings: dict[str, float] = {}
    ranges, agents = _ranges(), _agents()
    ledger = Ledger(dep, ranges, agents)

    t0 = time.monotonic()
    dep.compose("up", "-d", "setup", "redis")  # postgres (setup's dependency), redis, setup
    assert dep.engine.run("wait", dep.container("setup"), timeout_s=300.0).stdout.split() == ["0"], dep.logs("setup")
    timings["servers up and setup done"] = time.monotonic() - t0
    t1 = time.monotonic()
    dep.compose("up", "-d", "--no-deps", *NODES)
    timings["nodes started"] = time.monotonic() - t1

    # -------------------------------------------------- setup: once, to completion, before every node
    setup = dep.state("setup")
    assert len(dep.containers("setup")) == 1
    assert setup["Status"] == "exited" and setup["ExitCode"] == 0 and setup["RestartCount"] == 0, setup
    setup_logs = dep.logs("setup")
    assert setup_logs.count("setup: schemas migrated") == 1, setup_logs[-2000:]
    assert "agent role 'aeco_node_agent' ready" in setup_logs, setup_logs[-2000:]
    setup_done = stamp(setup["FinishedAt"])
    first_start = {node: stamp(dep.state(node)["StartedAt"]) for node in NODES}
    for node, started in first_start.items():
        assert started >= setup_done, f"{node} started {setup_done - started:.2f} s before setup finished"
    timings["setup ran"] = setup_done - stamp(setup["StartedAt"])

    # -------------------------------------------------- the services' own health checks pass
    for service in ("postgres", "redis"):
        timings[f"{service} healthy"] = dep.healthy(service, timeout_s=120)
    for node in NODES:
        timings[f"{node} healthy"] = dep.healthy(node, timeout_s=240)
        # No Qdrant server here: memory, when an agent uses it, is local, under the node's own /data.
        out = dep.exec(node, "sh", "-c", 'test -z "$QDRANT_URL"')
        assert out.returncode == 0, f"{node}: QDRANT_URL is set, but no Qdrant server runs here"

    # -------------------------------------------------- every node acts, and trades across nodes
    every_pair = {(a, b) for a in NODES for b in NODES if a != b}
    start = time.monotonic()

    def trading() -> bool:
        journal = ledger.journal()
        acting = all(ledger.usage(journal, node) for node in NODES)
        return acting and ledger.cross_transfers(journal) == every_pair

    until("every node acting and paying agents on each other node", trading, timeout_s=240, interval_s=3)
    timings["all nodes trading across nodes"] = time.monotonic() - start

    # -------------------------------------------------- a node's container killed from the host
    before = dep.state(KILLED)
    runs_before = _run_ids(dep.logs(KILLED))
    assert len(runs_before) == 1, runs_before
    killed_seq = ledger.journal()[-1]["seq"]
    main_pid = int(before["Pid"])
    assert main_pid > 0, before
    killed_at = time.monotonic()
    os.kill(main_pid, signal.SIGKILL)  # the container's own process (tini): the whole container dies

    def restarted() -> bool:
        state = dep.state(KILLED)
        return bool(state["Running"]) and state["RestartCount"] == before["RestartCount"] + 1

    until(f"{KILLED} restarted by its restart policy", restarted, timeout_s=120, interval_s=1)
    timings[f"{KILLED} restarted after kill -9"] = time.monotonic() - killed_at
    assert int(dep.state(KILLED)["Pid"]) != main_pid
    dep.healthy(KILLED, timeout_s=240)
    timings[f"{KILLED} healthy again after kill -9"] = time.monotonic() - killed_at

    def acting_again() -> bool:
        """A task of the killed node's agents charged by a run other than the killed one."""
        fresh = ledger.usage(ledger.journal(), KILLED, killed_seq)
        return any(u["task_id"].rpartition("-")[0] != runs_before[0] for u in fresh)

    until(f"{KILLED}'s new run charging its agents' tasks", acting_again, timeout_s=180, interval_s=3)
    timings[f"{KILLED} acting again after kill -9"] = time.monotonic() - killed_at
    for node in NODES:
        if node != KILLED:
            assert dep.state(node)["RestartCount"] == 0, f"{node} restarted too"
    # Still the one run of setup: a start of its container (restart policy or not) would move StartedAt.
    assert dep.state("setup")["RestartCount"] == 0 and dep.state("setup")["StartedAt"] == setup["StartedAt"]

    # -------------------------------------------------- nodes stopped: the books
    start = time.monotonic()
    dep.compose("stop", "--timeout", "30", *NODES)
    timings["nodes stopped (SIGTERM)"] = time.monotonic() - start
    for node in NODES:
        state = dep.state(node)
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (node, state, dep.logs(node)[-2000:])
        assert "Traceback" not in dep.logs(node), dep.logs(node)[-3000:]
    # A one-off container of the image on the project's network, as the operator (the nodes' URL).
    url = yaml.safe_load(dep.compose("config").stdout)["services"]["node1"]["environment"]["POSTGRES_URL"]
    check = dep.engine.run(
        "run", "--rm", "--network", dep.network(), "--env", f"POSTGRES_URL={url}",
        dep.env["AECO_IMAGE"], "python", "-m", "runtime.admin", "check",
        check=False, timeout_s=120.0,
    )  # fmt: skip
    assert check.returncode == 0 and "all invariants hold" in check.stdout, check.stdout + check.stderr
    print(f"compose: {check.stdout.strip()}")
    print("compose timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
