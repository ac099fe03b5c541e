"""Unit tests for retention's pure parts: the ``retention:`` section's ranges, pruning archived events,
and the soak benchmark's growth and steadiness figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.soak import TIMER_ONLY, Point, config, growth, steadiness
from runtime.config import ConfigError, parse
from runtime.ops.compact import prune_archives

AGENT = "agents: [{id: a, brain: scripted, policy: [{kind: sleep, seconds: 1}]}]\n"


def test_retention_section_is_off_by_default_and_ranged() -> None:
    cfg = parse(AGENT, "t.yaml", environ={})
    assert not cfg.retention.enabled and cfg.retention.horizon_s == 86_400
    on = parse(AGENT + "retention: {enabled: true, horizon_s: 600, interval_s: 60}\n", "t.yaml", environ={})
    assert on.retention.enabled and on.retention.horizon_s == 600 and on.retention.interval_s == 60
    with pytest.raises(ConfigError, match=r"retention.horizon_s"):
        parse(AGENT + "retention: {horizon_s: 5}\n", "t.yaml", environ={})
    with pytest.raises(ConfigError, match=r"retention.interval_s"):
        parse(AGENT + "retention: {interval_s: 0.001}\n", "t.yaml", environ={})
    with pytest.raises(ConfigError, match=r"unknown key `retention.keep`"):
        parse(AGENT + "retention: {keep: 3}\n", "t.yaml", environ={})
    assert not on.retention.shared
    shared = parse(AGENT + "retention: {enabled: true, shared: true}\n", "t.yaml", environ={})
    assert shared.retention.shared


def test_the_soaks_agents_sleep_on_their_timer_alone(tmp_path: Path) -> None:
    """A sleep without ``until`` ends at the first event addressed to the agent (the previous agent's
    transfer, in the soak's ring): the soak's sleeps wait for a kind nothing publishes, so the offered
    load is the agents' pace."""
    agents = config(tmp_path, 60.0)["agents"]
    sleeps = [step for a in agents for step in a["policy"] if step["kind"] == "sleep"]
    assert len(sleeps) == len(agents) and all(s["until"] == TIMER_ONLY for s in sleeps)
    # The configuration takes it (JSON is YAML).
    assert parse(json.dumps({"agents": agents[:1]}), "t.yaml", environ={}).agents[0].id == agents[0]["id"]


def test_prune_archives_drops_the_oldest_beyond_the_budget(tmp_path: Path) -> None:
    for first, last in ((1, 10), (11, 20), (21, 30)):
        (tmp_path / f"events-{first:012d}-{last:012d}.jsonl.gz").write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_bytes(b"y" * 1000)  # not an archive: never counted or removed
    assert prune_archives(tmp_path, 250) == ["events-000000000001-000000000010.jsonl.gz"]
    assert prune_archives(tmp_path, 250) == []
    assert prune_archives(tmp_path, 0) == [
        "events-000000000011-000000000020.jsonl.gz",
        "events-000000000021-000000000030.jsonl.gz",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_soak_growth_and_steadiness() -> None:
    flat = [Point(t, 100, 1000 + (50 if t < 300 else 0), 10 * t) for t in range(0, 601, 5)]
    assert growth(flat, "rss", 600) == 0.0
    assert growth(flat, "disk", 600) == 0.0  # the drop before the middle (a first pass) does not count
    grown = [Point(t, 100 + t // 10, 1000, 10 * t) for t in range(0, 601, 5)]
    g = growth(grown, "rss", 600)
    assert g == pytest.approx((159 - 130) / 130)  # medians around 300 s and around the last sample
    rate, spread = steadiness(flat, 600)
    assert rate == pytest.approx(10.0) and spread == pytest.approx(0.0)
    bursty = [Point(t, 100, 1000, 10 * t + (300 if t >= 450 else 0)) for t in range(0, 601, 5)]
    _, spread = steadiness(bursty, 600)
    assert spread is not None and spread > 0.5
