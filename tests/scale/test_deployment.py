"""The deployment files: docker-compose.yml and deploy/k8s/agent-nodes.yaml, read without running them.

``tests/container/test_compose.py`` runs the compose file under Podman; no Kubernetes cluster runs here,
so the manifest is validated against the Kubernetes API's own schemas (the OpenAPI definitions of pinned
Kubernetes versions as JSON Schema, shipped offline by ``kubernetes-validate``), strictly: an unknown
field is an error, as ``kubectl apply --validate=strict`` would make it. Both files are also checked for
what the runtime needs: every node has its agent range, the shared servers' URLs pointing at services
that exist, resource limits, health checks and start-up order; the nodes' ranges partition the
population of ``config/scale-out.yaml`` exactly; each node's environment gives a configuration the
supervisor accepts; the servers are sized as the deployment table and the measurement say; no
password has a default.
"""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from runtime import config as config_mod
from tests.harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s" / "agent-nodes.yaml"
IMAGE = "agent-ecology-local"
URL_VARS = ("POSTGRES_URL", "POSTGRES_AGENT_URL", "REDIS_URL", "QDRANT_URL")
#: The Kubernetes versions the manifest is validated against: the oldest it is meant for and the newest
#: whose schemas kubernetes-validate (pinned in requirements.lock) ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
#: The shared servers' limits (CPUs, memory): the deployment's sizing table, except PostgreSQL's CPUs
#: (2, not 1), which `python -m benchmarks scale` measured (README, "When to scale").
SIZING = {"postgres": (2.0, "2g"), "redis": (1.0, "1g"), "qdrant": (2.0, "4g")}


def _compose() -> dict[str, Any]:
    """The compose file as compose reads it with every required variable set (to ``<name>-value``)."""
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"{m.group(1).lower()}-value", COMPOSE.read_text())
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def _node_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in doc["services"].items() if "AGENT_RANGE" in s.get("environment", {})}


def _config_arg(command: list[str]) -> Path:
    return ROOT / command[command.index("--config") + 1]


def _partition(ranges: list[str], total: int) -> list[int]:
    """The agent positions the ranges cover, in order (a partition of 1..total is exactly that list)."""
    covered: list[int] = []
    for r in sorted(ranges, key=lambda r: int(r.split("-")[0])):
        first, last = (int(x) for x in r.split("-"))
        covered += range(first, last + 1)
    return covered


def test_compose_nodes_have_everything_the_runtime_needs() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"postgres", "redis", "qdrant"} <= set(services)
    for infra in ("postgres", "redis", "qdrant"):
        assert services[infra]["healthcheck"]["test"], f"{infra} has no health check"
    nodes = _node_services(doc)
    assert len(nodes) >= 3
    for name, node in nodes.items():
        env = node["environment"]
        assert node["image"] == IMAGE, name
        assert float(node["cpus"]) > 0 and str(node["mem_limit"]).endswith(("g", "m")), name
        assert node["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "runtime.status"], name
        for var in URL_VARS:
            host = urlsplit(env[var]).hostname
            assert host in services, f"{name}: {var} points at {host}, which is not a service"
            assert node["depends_on"][host]["condition"] == "service_healthy", f"{name} does not wait for {host}"
        # The agent role exists before any node connects with it.
        assert node["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert node["command"][:3] == ["python", "-m", "runtime.supervisor"] and "--no-live" in node["command"]
        assert _config_arg(node["command"]).is_file()
        assert env["AECO_DATA_DIR"] == "/data" and any(v.endswith(":/data") for v in node["volumes"]), name
    # Each node keeps its own data directory (local memory, status): no two share a volume.
    volumes = [v for n in nodes.values() for v in n["volumes"]]
    assert len(volumes) == len(set(volumes))
    setup = services["setup"]
    assert setup["command"] == ["python", "-m", "runtime.backends", "setup"]
    assert {"POSTGRES_URL", "POSTGRES_AGENT_URL"} <= set(setup["environment"])


def test_compose_ranges_partition_the_population_and_each_node_config_is_valid() -> None:
    nodes = _node_services(_compose())
    ranges = [n["environment"]["AGENT_RANGE"] for n in nodes.values()]
    configs = {_config_arg(n["command"]) for n in nodes.values()}
    assert len(configs) == 1, "every node must load the same configuration"
    path = configs.pop()
    total = len(config_mod.load(path, environ={}).agents)
    assert _partition(ranges, total) == list(range(1, total + 1))
    seen: list[str] = []
    for name, node in nodes.items():
        env = {k: str(v) for k, v in node["environment"].items()}
        cfg = config_mod.load(path, environ=env)  # the supervisor's own validation of the node's view
        assert cfg.node.postgres_url and cfg.node.redis_url and cfg.memory_url, name
        seen += [a.id for a in config_mod.local_agents(cfg)]
    assert sorted(seen) == sorted(a.id for a in config_mod.load(path, environ={}).agents)


def test_compose_sizes_the_servers_as_the_table_says_and_no_password_has_a_default() -> None:
    services = _compose()["services"]
    for name, (cpus, memory) in SIZING.items():
        assert (float(services[name]["cpus"]), services[name]["mem_limit"]) == (cpus, memory), name
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{(\w*PASSWORD\w*)([^}]*)\}", text)
    assert {var for var, _ in uses} == {"POSTGRES_PASSWORD", "AGENT_PASSWORD"}, uses
    # `:?` makes compose refuse to start without the variable; `:-` would be a default.
    assert all(rest.startswith(":?") for _, rest in uses), uses
    env = yaml.safe_load(text)["services"]["node1"]["environment"]
    for var in ("POSTGRES_URL", "POSTGRES_AGENT_URL"):
        assert re.search(r":\$\{\w*PASSWORD:\?", env[var]), f"{var} has a password of its own: {env[var]}"


def _k8s() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifest_is_valid_against_the_kubernetes_api_schema(version: str) -> None:
    docs = _k8s()
    assert {d["kind"] for d in docs} == {"Service", "StatefulSet"}
    for doc in docs:
        # Raises for an unknown kind or apiVersion (no schema), a wrong type, a missing required field,
        # and, strict, for any field the API does not define.
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("a misspelt field", lambda sts: sts["spec"].__setitem__("replica", 3)),
        ("a wrong type", lambda sts: sts["spec"].__setitem__("replicas", "three")),
        ("a missing required field", lambda sts: sts["spec"].pop("selector")),
        ("a misplaced field", lambda sts: sts["spec"]["template"]["spec"]["containers"][0].__setitem__("limits", {})),
    ],
)
def test_the_schema_check_rejects_what_the_api_server_would(where: str, change: Any) -> None:
    sts = copy.deepcopy(next(d for d in _k8s() if d["kind"] == "StatefulSet"))
    change(sts)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSIONS[-1], strict=True)


def test_k8s_statefulset_takes_urls_from_the_secret_and_has_resources() -> None:
    docs = _k8s()
    # The Secret is the operator's to create (the header says how): a Secret here would carry a
    # default password, and `kubectl apply` would overwrite the real one with it.
    assert "Secret" not in {d["kind"] for d in docs}
    header = K8S.read_text().split("\napiVersion:", 1)[0]
    secret_name = re.search(r"kubectl create secret generic (\S+)", header)
    assert secret_name, "the header does not say how to create the Secret"
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    res = container["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part]), part
    env = {e["name"]: e for e in container["env"]}
    for var in URL_VARS:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret_name.group(1) and f"--from-literal={ref['key']}=" in header, var
        assert not ref.get("optional"), f"{var}: a node must not start without its Secret"
    assert sts["spec"]["serviceName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    probe = container["livenessProbe"]["exec"]["command"]
    assert probe[:3] == ["python", "-m", "runtime.status"]


def test_k8s_pod_ordinals_pick_ranges_that_partition_the_population(tmp_path: Path) -> None:
    """Run the container's real shell command for each ordinal, with ``python`` replaced by a script
    that prints the environment it would have started the supervisor with."""
    sts = next(d for d in _k8s() if d["kind"] == "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    command: list[str] = container["command"]
    assert command[:2] == ["tini", "--"]
    script = command[command.index("-c") + 1]
    assert "runtime.supervisor" in script and "config/scale-out.yaml" in script
    shim = tmp_path / "python"
    shim.write_text('#!/bin/sh\necho "$AGENT_RANGE $NODE_ID $*"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    per_node = next(e["value"] for e in container["env"] if e["name"] == "AGENTS_PER_NODE")
    ranges = []
    for ordinal in range(int(sts["spec"]["replicas"])):
        env = {
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
            "HOSTNAME": f"agent-nodes-{ordinal}",
            "AGENTS_PER_NODE": per_node,
        }
        out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=10, check=True)
        agent_range, node, args = out.stdout.split(" ", 2)
        assert node == f"agent-nodes-{ordinal}" and "--config config/scale-out.yaml" in args
        ranges.append(agent_range)
    population = config_mod.load(ROOT / "config" / "scale-out.yaml", environ={})
    assert population.population is not None and population.population.stride == int(per_node)
    assert _partition(ranges, len(population.agents)) == list(range(1, len(population.agents) + 1))
