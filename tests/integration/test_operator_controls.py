"""The operator's grant, burn and note controls carried out on a node's real parts (LMDB ledger, event log,
worker pool), as the dashboard carries them out for the page and ``python -m runtime.admin control``: each
an ordinary journaled operation under the ledger's rules, a rate right re-rating the agent's bucket; and a
rollback made while the supervisor was stopped, announced by the next start; a pause that outlives the
archiving of its event.

A pause replayed by a restarted supervisor, and a rollback while it runs, are in ``test_dashboard.py``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from runtime.actions import Noop
from runtime.agents.loop import Agent
from runtime.config import AgentConfig, Config, PoolConfig
from runtime.economy.ledger import Burn, LedgerError, Mint
from runtime.node import Node
from runtime.ops.compact import compact_data_dir
from runtime.ops.dashboard import BurnAsset, Control, ControlRefused, Dashboard, Grant, Inject, Pause, Resume
from runtime.world.events.log import EventLog
from tests.harness import python_m
from tests.integration.store_backends import git, git_head


def test_grants_and_burns_follow_the_rules_and_rerate_the_bucket(tmp_path: Path) -> None:
    cfg = Config(
        data_dir=str(tmp_path / "data"),
        pool=PoolConfig(workers=1),
        agents=[AgentConfig(id=a, brain="scripted", policy=[Noop()]) for a in ("ann", "ben")],
    )

    async def main() -> None:
        async with Node(cfg) as node:
            ledger, buckets = node.economy.ledger, node.economy.buckets
            dash = Dashboard(None, None, ledger, node.events, node.world.store, lambda: node.agents, node.economy)
            dash.cpu_capacity = node.capacity
            held = ledger.balance("ann", "cpu_rate")
            assert held > 0 and buckets.get("ann", "cpu").rate == held / 1000

            # The agents hold the whole container (two `auto` shares of its capacity, but for rounding):
            # a grant past it is refused, and nothing is journaled.
            room = node.capacity - held - ledger.balance("ben", "cpu_rate")
            entries = len(list(ledger.journal()))
            with pytest.raises(ControlRefused, match="would not fit"):
                await dash.apply(Grant("ann", "cpu_rate", room + 1))
            assert len(list(ledger.journal())) == entries and ledger.balance("ann", "cpu_rate") == held

            # A burn frees some: the bucket's rate follows at once, and the freed rate can be granted again.
            assert "burn 100 cpu_rate for ann" in await dash.apply(BurnAsset("ann", "cpu_rate", 100))
            assert ledger.balance("ann", "cpu_rate") == held - 100
            assert buckets.get("ann", "cpu").rate == (held - 100) / 1000
            assert "mint 60 cpu_rate for ben" in await dash.apply(Grant("ben", "cpu_rate", 60, "a busy week"))
            assert buckets.get("ben", "cpu").rate == ledger.balance("ben", "cpu_rate") / 1000

            # A burn of more than the agent holds is the ledger's overdraft; a grant to nobody, unknown.
            scrip = ledger.balance("ben", "scrip")
            with pytest.raises(LedgerError, match="cannot burn"):
                await dash.apply(BurnAsset("ben", "scrip", scrip + 1))
            with pytest.raises(LedgerError):
                await dash.apply(Grant("nobody", "scrip", 5))
            assert ledger.balance("ben", "scrip") == scrip

            # A note to one agent is an event for it alone, with the operator's text.
            done = await dash.apply(Inject("the market closes at five", "ben"))
            (note,) = node.events.read(kinds=["operator_note"])
            assert done == f"operator_note (event {note.seq})"
            assert (note.agent, note.fields) == ("ben", {"text": "the market closes at five"})

            ops = [e.op for e in ledger.journal() if isinstance(e.op, Mint | Burn)]
            assert [(o.__struct_config__.tag, o.account, o.asset, o.amount, o.reason) for o in ops] == [
                ("burn", "ann", "cpu_rate", 100, "operator burn"),
                ("mint", "ben", "cpu_rate", 60, "a busy week"),
            ]

    asyncio.run(main())


def test_a_rollback_made_while_stopped_is_announced_once(tmp_path: Path) -> None:
    """``python -m runtime.admin rollback`` needs the store to itself: the next start announces the reset
    to the agents, and the start after that does not announce it again."""
    data = tmp_path / "data"
    cfg = Config(
        data_dir=str(data),
        pool=PoolConfig(workers=1),
        agents=[AgentConfig(id="ann", brain="scripted", policy=[Noop()])],
    )

    async def resets(write: bool = False) -> list[dict[str, object]]:
        async with Node(cfg) as node:
            if write:
                await node.world.write_artifact("ann", "diary", b"day one")
        # What the start queued (the announcement) is committed by the close.
        with EventLog(str(data / "events"), readonly=True) as log:
            return [e.fields for e in log.read(kinds=["system_reset"])]

    assert asyncio.run(resets(write=True)) == []
    root = git(data / "artifacts.git", "rev-list", "--max-parents=0", "HEAD").stdout.decode().strip()
    out = python_m("runtime.admin", "--data-dir", str(data), "rollback", "--to", root, timeout_s=60)
    assert out.returncode == 0, out.stderr
    head = git_head(data / "artifacts.git")
    assert asyncio.run(resets()) == [{"commit": head, "by": "operator"}]
    assert asyncio.run(resets()) == [{"commit": head, "by": "operator"}]


def test_a_pause_outlives_the_archiving_of_its_event(tmp_path: Path) -> None:
    """Retention moves old events out of the log: a pause still in force is carried forward first, so the
    next start pauses the agent again; a pause the operator took back is not."""
    data = tmp_path / "data"
    cfg = Config(
        data_dir=str(data),
        pool=PoolConfig(workers=1),
        agents=[AgentConfig(id=a, brain="scripted", policy=[Noop()]) for a in ("ann", "ben")],
    )

    async def controls(*sent: Control) -> dict[str, bool]:
        async with Node(cfg) as node:
            dash = Dashboard(None, None, node.economy.ledger, node.events, node.world.store, lambda: node.agents)
            for control in sent:
                await dash.apply(control)
            return {a.id: a.paused for a in node.agents if isinstance(a, Agent)}

    assert asyncio.run(controls(Pause("ann"), Pause("ben"), Resume("ben"), Inject("later"))) == {
        "ann": True,
        "ben": False,
    }
    report = compact_data_dir(data, time.time(), 1 << 30)
    assert report.events is not None and report.events.last >= 3  # the controls have left the log
    with EventLog(str(data / "events"), readonly=True) as log:
        assert [(e.kind, e.agent, e.fields) for e in log.read(kinds=["agent_paused", "agent_resumed"])] == [
            ("agent_paused", "ann", {"by": "operator", "carried": True})
        ]
    assert asyncio.run(controls()) == {"ann": True, "ben": False}
