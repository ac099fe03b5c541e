"""Unit tests for the scale-out part of ``runtime.config``: populations, agent ranges, node settings."""

from __future__ import annotations

import pytest

from runtime.actions import InvokeArtifact, SleepFor, TransferScrip, WriteArtifact
from runtime.config import ConfigError, local_agents, node_id, parse

POPULATION = """
population:
  count: 12
  policy: trader
  stride: 4
  template: {id: t, brain: scripted, think_ms: 2}
"""
PG = "postgresql://aeco@db/aeco"


def _error(text: str, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, "test.yaml", environ=environ)
    return str(info.value)


def test_a_population_expands_after_the_listed_agents_with_trader_partners_a_stride_apart() -> None:
    text = "agents: [{id: boss, brain: scripted, policy: [{kind: noop}]}]\n" + POPULATION
    cfg = parse(text, environ={})
    assert [a.id for a in cfg.agents] == ["boss"] + [f"t{i:03d}" for i in range(1, 13)]
    t010 = cfg.agents[10]
    assert t010.id == "t010" and t010.think_ms == 2
    write, pay, use, sleep, pay2, use2 = t010.policy
    assert write == WriteArtifact(id="tool-t010", artifact_kind="code", content="world.result('t010')", price=1)
    # Partners 4 and 8 positions on, wrapping around the 12 agents: t002 and t006.
    assert (pay, use, pay2, use2) == (
        TransferScrip(to="t002", amount=1),
        InvokeArtifact(id="tool-t002"),
        TransferScrip(to="t006", amount=1),
        InvokeArtifact(id="tool-t006"),
    )
    assert sleep == SleepFor(seconds=2.0, until="transfer")


def test_agent_range_selects_positions_and_names_the_node() -> None:
    cfg = parse(POPULATION, environ={"AGENT_RANGE": "5-8", "POSTGRES_URL": PG})
    assert [a.id for a in local_agents(cfg)] == ["t005", "t006", "t007", "t008"]
    assert node_id(cfg) == "n5-8" and cfg.node.postgres_url == PG
    named = parse(POPULATION, environ={"AGENT_RANGE": "5-8", "POSTGRES_URL": PG, "NODE_ID": "pod-1"})
    assert node_id(named) == "pod-1"
    single = parse(POPULATION, environ={})
    assert local_agents(single) == single.agents and node_id(single) == ""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AGENT_RANGE": "5-8"}, "$AGENT_RANGE: nodes running part of the agents must share PostgreSQL"),
        ({"AGENT_RANGE": "10-13", "POSTGRES_URL": PG}, "$AGENT_RANGE: agent range 10-13 is not within the 12"),
        ({"AGENT_RANGE": "8-5", "POSTGRES_URL": PG}, "agent range 8-5 is not within"),
        ({"AGENT_RANGE": "5", "POSTGRES_URL": PG}, "at `node.agent_range` (set by $AGENT_RANGE)"),
        ({"REDIS_URL": "redis://r"}, "$REDIS_URL: Redis carries wake-ups for the shared PostgreSQL event log"),
        ({"POSTGRES_AGENT_URL": PG}, "$POSTGRES_AGENT_URL: needs POSTGRES_URL"),
        ({"AECO_CONNECT_TIMEOUT_S": "0"}, "at `node.connect_timeout_s` (set by $AECO_CONNECT_TIMEOUT_S)"),
    ],
)
def test_bad_node_settings_name_the_variable(environ: dict[str, str], expected: str) -> None:
    assert expected in _error(POPULATION, environ)


def test_the_population_ids_must_fit_its_digits_and_traders_must_be_scripted() -> None:
    assert "at most `digits` (1) digits" in _error(POPULATION.replace("stride: 4", "stride: 4\n  digits: 1"), {})
    llm = POPULATION.replace("brain: scripted, think_ms: 2", "brain: llm")
    assert "the trader policy needs `brain: scripted`" in _error(llm, {})


def test_qdrant_url_points_memory_at_a_server() -> None:
    assert parse("", environ={"QDRANT_URL": "http://qdrant:6333"}).memory_url == "http://qdrant:6333"
