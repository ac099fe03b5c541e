"""The ecology's own rules through the real path (actions, world, ledger, store, pool, confined code):
rights and quotas traded with ``transfer``, standing offers accepted atomically, access policies, the
task mint, triggers."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import msgspec
import pytest

from runtime.actions import (
    AcceptOffer,
    CancelOffer,
    InvokeArtifact,
    MakeOffer,
    Noop,
    ReadArtifact,
    Sponsor,
    SubmitTask,
    Subscribe,
    TransferScrip,
    Unsubscribe,
    WriteArtifact,
    perform,
)
from runtime.agents.loop import Agent, ScriptedBrain
from runtime.agents.schema import ACTION_SCHEMA
from runtime.config import BudgetConfig, Config, TaskConfig, load
from runtime.economy.ledger import AwardTask, LedgerError
from runtime.economy.ledger import Subscribe as LedgerSubscribe
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.errors import AecoError
from runtime.protocol import Burn
from runtime.world.access import CONTRACT_CPU_S, CONTRACT_WALL_S
from runtime.world.events import Event
from runtime.world.store import Kind, StoreError
from runtime.world.tasks import TaskError, blob_id
from runtime.world.world import InvokeError, World
from tests.integration.test_world import with_world


def _cpu_rate(w: World, agent: str) -> float:
    return w.economy.buckets.get(agent, "cpu").rate


def _ledger_ok(tmp: Path) -> None:
    with LmdbLedger(tmp / "data" / "ledger") as ledger:
        report = check(ledger)
        assert report.ok, report.problems


def test_the_transfer_action_moves_a_rate_right_and_re_rates_both_buckets(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        assert _cpu_rate(w, "alice") == _cpu_rate(w, "bob") == pytest.approx(0.4)
        done = await perform(w, "alice", TransferScrip(to="bob", amount=150, asset="cpu_rate"))
        assert done.text == "gave 150 cpu_rate to bob"
        assert w.economy.ledger.balance("alice", "cpu_rate") == 250
        assert _cpu_rate(w, "alice") == pytest.approx(0.25) and _cpu_rate(w, "bob") == pytest.approx(0.55)
        # The levels settled at the old rates are persisted with the trade (a restart keeps both).
        assert "cpu" in w.economy.ledger.buckets("bob") and "cpu" in w.economy.ledger.buckets("alice")

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_disk_quota_in_use_cannot_be_given_away(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        quota = w.economy.ledger.balance("alice", "disk_quota")
        assert quota == 1 << 20
        await w.write_artifact("alice", "big", b"x" * 700_000)
        with pytest.raises(LedgerError) as err:
            await perform(w, "alice", TransferScrip(to="bob", amount=400_000, asset="disk_quota"))
        assert err.value.code == "quota_exceeded" and "700000" in str(err.value)
        assert w.economy.ledger.balance("alice", "disk_quota") == quota
        await perform(w, "alice", TransferScrip(to="bob", amount=300_000, asset="disk_quota"))
        assert w.economy.ledger.balance("alice", "disk_quota") == quota - 300_000
        # The same rule holds when the quota is sold: an offer of bytes in use cannot be accepted.
        await perform(w, "alice", MakeOffer(asset="disk_quota", amount=48_000, price=1))
        await w.write_artifact("alice", "more", b"y" * 30_000)
        [offer] = await w.offers()
        with pytest.raises(LedgerError) as err:
            await perform(w, "bob", AcceptOffer(offer=offer.offer))
        assert err.value.code == "quota_exceeded"
        assert await w.offers() == [offer]

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_memory_quota_in_use_cannot_be_given_away(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        led = w.economy.ledger
        quota = led.balance("bob", "memory_quota")
        assert quota == 256 << 20
        await w.write_artifact("bob", "nap", b"import time\ntime.sleep(3)\nworld.result(1)", kind="code")
        await perform(w, "bob", MakeOffer(asset="memory_quota", amount=1 << 20, price=1, name="mem"))
        # bob's confined run holds a limit of its whole quota until it ends: none of it can go meanwhile.
        running = asyncio.create_task(w.invoke_artifact("bob", "nap", wall_seconds=20))
        while w.economy.memory_in_use("bob") == 0:
            await asyncio.sleep(0.01)
        assert w.economy.memory_in_use("bob") == quota
        with pytest.raises(LedgerError) as err:
            await perform(w, "bob", TransferScrip(to="alice", amount=1 << 20, asset="memory_quota"))
        assert err.value.code == "quota_exceeded" and f"{quota} bytes" in str(err.value)
        with pytest.raises(LedgerError) as err:
            await perform(w, "alice", AcceptOffer(offer="bob.mem"))
        assert err.value.code == "quota_exceeded"
        assert led.balance("bob", "memory_quota") == quota and [o.offer for o in await w.offers()] == ["bob.mem"]
        assert (await running).value == 1
        # Its task has ended: the same trade and the same acceptance go through.
        assert w.economy.memory_in_use("bob") == 0
        await perform(w, "bob", TransferScrip(to="alice", amount=1 << 20, asset="memory_quota"))
        await perform(w, "alice", AcceptOffer(offer="bob.mem"))
        assert led.balance("bob", "memory_quota") == quota - (2 << 20)

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_a_memory_trade_waiting_for_its_commit_holds_no_task_back_and_gives_none_what_is_leaving(
    tmp_path: Path,
) -> None:
    async def body(w: World) -> None:
        async def started() -> None:  # bob has a task that took its limit
            while w.economy.memory_in_use("bob") == 0:
                await asyncio.sleep(0.01)

        led = w.economy.ledger
        quota, giving = led.balance("bob", "memory_quota"), 1 << 20
        await perform(w, "bob", MakeOffer(asset="memory_quota", amount=giving, price=1, name="mem"))
        hold = led.hold()  # type: ignore[attr-defined]  # the ledger's writer commits nothing until released
        try:
            accepting = asyncio.create_task(perform(w, "alice", AcceptOffer(offer="bob.mem")))
            await asyncio.wait_for(asyncio.to_thread(hold.waiting.wait), 30)  # checked, queued, not durable
            # bob's task starts meanwhile, not behind the trade's commit, limited to what stays bob's.
            burn = asyncio.create_task(w.economy.run("bob", Burn(ms=1)))
            await asyncio.wait_for(started(), 10)
            assert w.economy.memory_in_use("bob") == quota - giving
            assert not accepting.done()
        finally:
            hold.release()  # (on a failure too: a held writer would hold up the node's stop)
        await asyncio.wait_for(asyncio.gather(accepting, burn), 30)
        assert led.balance("bob", "memory_quota") == quota - giving
        # The trade done, what was reserved for it is not counted again: the next task takes the new quota.
        burn = asyncio.create_task(w.economy.run("bob", Burn(ms=200)))
        await asyncio.wait_for(started(), 10)
        assert w.economy.memory_in_use("bob") == quota - giving
        await burn

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_a_named_offer_open_already_is_refused_without_waiting_for_a_commit(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        led = w.economy.ledger
        await perform(w, "alice", MakeOffer(asset="cpu_rate", amount=10, price=1, name="o"))
        hold = led.hold()  # type: ignore[attr-defined]  # the ledger's writer commits nothing until released
        try:
            with pytest.raises(LedgerError) as err:
                # Refused from the ledger's committed state: a post that waited for a commit would time out.
                await asyncio.wait_for(perform(w, "alice", MakeOffer(asset="cpu_rate", amount=5, price=2, name="o")), 5)
            assert err.value.code == "conflict" and "`alice.o` is open already" in str(err.value)
        finally:
            hold.release()
        [offer] = await w.offers()
        assert (offer.offer, offer.amount, offer.price) == ("alice.o", 10, 1)
        # Taken, the name is free again.
        await perform(w, "bob", AcceptOffer(offer="alice.o"))
        await perform(w, "alice", MakeOffer(asset="cpu_rate", amount=5, price=2, name="o"))
        [offer] = await w.offers()
        assert (offer.offer, offer.amount, offer.price) == ("alice.o", 5, 2)

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_an_agent_s_context_shows_others_open_offers_and_follows_its_own_trades(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        led, mib = w.economy.ledger, 1 << 20
        alice = Agent("alice", ScriptedBrain(w.economy, [Noop()], 1), w)
        await perform(w, "bob", MakeOffer(asset="memory_quota", amount=mib, price=3, name="m"))
        assert f"Offers: bob.m: {mib} memory_quota for 3" in await alice.context()
        # Its own offer is not shown it, and the others' are still there.
        await alice.act(MakeOffer(asset="disk_quota", amount=1000, price=1, name="d"))
        context = await alice.context()
        assert "bob.m" in context and "alice.d" not in context
        # What it bought leaves its market and shows in its limits at once.
        await alice.act(AcceptOffer(offer="bob.m"))
        context = await alice.context()
        assert "Offers:" not in context
        assert f"memory {led.balance('alice', 'memory_quota') / mib:.0f} MB per task" in context

    with_world(tmp_path, body)


def test_an_offer_is_filled_once_by_concurrent_buyers_and_both_sides_move(tmp_path: Path) -> None:
    events: list[str] = []

    async def body(w: World) -> None:
        led = w.economy.ledger
        before = {a: led.balance(a, "scrip") for a in ("alice", "bob", "carol")}
        done = await perform(w, "alice", MakeOffer(asset="cpu_rate", amount=100, price=20))
        [offer] = await w.offers()
        assert offer.offer in done.text and offer.seller == "alice"
        outcomes = await asyncio.gather(
            *(perform(w, buyer, AcceptOffer(offer=offer.offer)) for buyer in ("bob", "carol")),
            return_exceptions=True,
        )
        won = [b for b, o in zip(("bob", "carol"), outcomes, strict=True) if not isinstance(o, BaseException)]
        lost = [o for o in outcomes if isinstance(o, LedgerError)]
        assert len(won) == 1 and len(lost) == 1 and lost[0].code == "not_found"
        buyer = won[0]
        assert led.balance("alice", "scrip") == before["alice"] + 20
        assert led.balance(buyer, "scrip") == before[buyer] - 20
        assert led.balance(buyer, "cpu_rate") == 500 and led.balance("alice", "cpu_rate") == 300
        assert _cpu_rate(w, buyer) == pytest.approx(0.5) and _cpu_rate(w, "alice") == pytest.approx(0.3)
        assert await w.offers() == []
        # A second offer, withdrawn, moves nothing.
        await perform(w, "alice", MakeOffer(asset="memory_quota", amount=1 << 20, price=5))
        [second] = await w.offers()
        with pytest.raises(LedgerError):
            await perform(w, "bob", CancelOffer(offer=second.offer))
        await perform(w, "alice", CancelOffer(offer=second.offer))
        assert await w.offers() == []

    with_world(tmp_path, body, events)
    assert events.count("offer_posted") == 2 and events.count("offer_closed") == 2
    _ledger_ok(tmp_path)


def test_an_agent_that_gave_away_all_its_memory_quota_runs_nothing_unlimited(tmp_path: Path) -> None:
    """A limit of 0 means none to the worker, and an invocation fell back to 256 MiB: an agent that sold
    its whole memory_quota could run tasks and code with more memory than before. Both are refused
    (``quota_exceeded``), charged nothing; once it buys some back, they run within it."""

    async def body(w: World) -> None:
        led = w.economy.ledger
        await w.write_artifact("bob", "hog", b"x = bytearray(64 << 20)\nworld.result(len(x))", kind="code")
        await perform(
            w, "bob", TransferScrip(to="alice", amount=led.balance("bob", "memory_quota"), asset="memory_quota")
        )
        assert led.balance("bob", "memory_quota") == 0
        usage = len(list(led.usage_records()))
        with pytest.raises(AecoError) as ran:
            await w.economy.run("bob", Burn(ms=10))
        assert ran.value.code == "quota_exceeded" and "holds no memory_quota" in str(ran.value)
        with pytest.raises(InvokeError) as invoked:
            await w.invoke_artifact("bob", "hog")
        assert invoked.value.code == "quota_exceeded" and "holds no memory_quota" in str(invoked.value)
        assert len(list(led.usage_records())) == usage  # nothing ran, nothing charged
        await perform(w, "alice", TransferScrip(to="bob", amount=32 << 20, asset="memory_quota"))
        assert (await w.economy.run("bob", Burn(ms=10))).usage.cpu_seconds > 0
        with pytest.raises(InvokeError) as over:
            await w.invoke_artifact("bob", "hog")  # 64 MiB within a limit of 32
        assert over.value.code == "memory_exceeded", over.value

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_confined_code_moves_a_right_only_within_what_the_invoker_authorised(tmp_path: Path) -> None:
    code = b"""
world.transfer("carol", 60, "cpu_rate")
try:
    world.transfer("carol", 60, "cpu_rate")
    world.result("second went through")
except Exception as exc:
    world.result(str(exc))
"""

    async def body(w: World) -> None:
        await w.write_artifact("alice", "rights-mover", code, kind="code")
        inv = await w.invoke_artifact("bob", "rights-mover", max_rights={"cpu_rate": 100})
        assert "exceed" in inv.value and inv.rights_transferred == {"cpu_rate": 60} and inv.transferred == 0
        assert w.economy.ledger.balance("carol", "cpu_rate") == 460
        assert _cpu_rate(w, "carol") == pytest.approx(0.46) and _cpu_rate(w, "bob") == pytest.approx(0.34)
        # Authorising scrip authorises no right: the code's first transfer is refused, and raises in it.
        with pytest.raises(InvokeError, match="exceed the 0"):
            await w.invoke_artifact("bob", "rights-mover", max_transfer=100)
        assert w.economy.ledger.balance("carol", "cpu_rate") == 460

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


# ------------------------------------------------------------------------------------ access policies


def _cpu_charged(w: World, agent: str) -> float:
    return w.economy.pool.accounts.agents[agent].cpu_seconds if agent in w.economy.pool.accounts.agents else 0.0


async def _behind_contract(
    w: World, contract: str, code: bytes, guarded: str, content: bytes, kind: Kind = "data"
) -> None:
    """alice's artifact ``guarded``, readable as her code artifact ``contract`` answers."""
    await w.write_artifact("alice", contract, code, kind="code")
    await w.write_artifact("alice", guarded, content, kind=kind, readable=f"contract:{contract}")


def test_an_allow_list_and_a_read_price_are_kept(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        led = w.economy.ledger
        await perform(w, "alice", WriteArtifact(id="club", content="members only", readable="allow:bob"))
        await perform(w, "alice", WriteArtifact(id="paper", content="news", readable="price:5"))
        assert (await perform(w, "bob", ReadArtifact(id="club"))).text.endswith("members only")
        with pytest.raises(StoreError) as err:
            await perform(w, "carol", ReadArtifact(id="club"))
        assert err.value.code == "forbidden" and "bob" in str(err.value)
        # Listed for everyone (it is not owner-only), readable by the list alone.
        assert "club" in [a.id for a in await w.list_artifacts("carol")]
        before = {a: led.balance(a, "scrip") for a in ("alice", "bob")}
        await perform(w, "bob", ReadArtifact(id="paper"))
        await perform(w, "bob", ReadArtifact(id="paper"))
        await perform(w, "alice", ReadArtifact(id="paper"))  # the owner reads free
        assert led.balance("bob", "scrip") == before["bob"] - 10
        assert led.balance("alice", "scrip") == before["alice"] + 10

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_a_contract_that_denies_blocks_the_read_and_the_caller_pays_for_the_check(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await _behind_contract(w, "gate", b"world.result(world.args['caller'] == 'bob')", "vault", b"the combination")
        carol_before = _cpu_charged(w, "carol")
        with pytest.raises(StoreError) as err:
            await perform(w, "carol", ReadArtifact(id="vault"))
        assert err.value.code == "forbidden" and "gate" in str(err.value)
        assert _cpu_charged(w, "carol") > carol_before  # the check ran confined, as carol
        assert _cpu_charged(w, "alice") == 0.0  # the owner paid nothing for it
        assert (await perform(w, "bob", ReadArtifact(id="vault"))).text.endswith("the combination")
        assert w.access.contract_runs == 2
        # Asked again: the cached answer, at no cost.
        carol_after = _cpu_charged(w, "carol")
        with pytest.raises(StoreError):
            await perform(w, "carol", ReadArtifact(id="vault"))
        assert w.access.contract_runs == 2 and w.access.cache_hits == 1
        assert _cpu_charged(w, "carol") == carol_after
        # A new version of the contract is asked afresh.
        await w.write_artifact("alice", "gate", b"world.result(True)", kind="code")
        await perform(w, "carol", ReadArtifact(id="vault"))
        assert w.access.contract_runs == 3
        # Invocation is an action the contract rules too.
        strict = b"world.result(world.args['action'] == 'read')"
        await _behind_contract(w, "strict", strict, "tool", b"world.result(1)", kind="code")
        await perform(w, "bob", ReadArtifact(id="tool"))
        with pytest.raises(StoreError, match="denies bob to invoke"):
            await w.invoke_artifact("bob", "tool")

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_a_contract_that_loops_is_cut_at_its_deadline_and_denies(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await _behind_contract(w, "spin", b"while True:\n    pass", "locked", b"x")
        t0 = time.monotonic()
        with pytest.raises(StoreError) as err:
            await perform(w, "bob", ReadArtifact(id="locked"))
        elapsed = time.monotonic() - t0
        assert err.value.code == "forbidden"
        assert elapsed < CONTRACT_WALL_S + 3.0, elapsed
        # The loop's CPU, cut at the contract's limit, is bob's.
        charged = _cpu_charged(w, "bob")
        assert CONTRACT_CPU_S * 0.5 < charged < CONTRACT_CPU_S + 2.0
        # The denial is this contract version's answer: asked again, it is the cached one, at no cost.
        with pytest.raises(StoreError):
            await perform(w, "bob", ReadArtifact(id="locked"))
        assert (w.access.contract_runs, w.access.cache_hits) == (1, 1) and _cpu_charged(w, "bob") == charged
        assert (await perform(w, "alice", ReadArtifact(id="locked"))).text.endswith("x")  # the owner is not asked

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


# ------------------------------------------------------------------------------------------ task mint

DOUBLE = TaskConfig(
    id="double", description="define double(x)", reward=50, tests="assert double(2) == 4\nassert double(-3) == -6"
)
#: Rewards more than the supply cap leaves room for.
BIG = TaskConfig(id="big", description="define one()", reward=100, tests="assert one() == 1")


def _with_tasks(cfg: Config) -> Config:
    # 2,100 scrip at the start (alice 1,000, bob 100, carol 1,000): room for DOUBLE's reward, not BIG's too.
    return msgspec.structs.replace(cfg, tasks=[DOUBLE, BIG], budget=BudgetConfig(scrip_supply_cap=2_200))


def test_a_task_pays_exactly_once_under_concurrent_submissions_and_never_for_a_failing_artifact(
    tmp_path: Path,
) -> None:
    events: list[str] = []
    good = b"def double(x):\n    return 2 * x\n"

    async def body(w: World) -> None:
        led = w.economy.ledger
        supply = led.supply()["scrip"]
        await w.write_artifact("alice", "almost", b"def double(x):\n    return x + 2\n", kind="code")
        before = _cpu_charged(w, "alice")
        with pytest.raises(TaskError) as err:
            await perform(w, "alice", SubmitTask(task="double", id="almost"))
        assert err.value.code == "code_error" and str(err.value).endswith("tests: AssertionError")
        assert _cpu_charged(w, "alice") > before  # the tests ran confined, charged to the submitter
        assert led.supply()["scrip"] == supply
        for agent in ("alice", "bob", "carol"):
            await w.write_artifact(agent, f"{agent}-double", good, kind="code")
        scrip = {a: led.balance(a, "scrip") for a in ("alice", "bob", "carol")}
        outcomes = await asyncio.gather(
            *(perform(w, a, SubmitTask(task="double", id=f"{a}-double")) for a in ("alice", "bob", "carol")),
            return_exceptions=True,
        )
        paid = [a for a, o in zip(("alice", "bob", "carol"), outcomes, strict=True) if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, TaskError)]
        assert len(paid) == 1 and len(refused) == 2 and {e.code for e in refused} == {"conflict"}
        assert led.balance(paid[0], "scrip") == scrip[paid[0]] + 50
        assert led.supply()["scrip"] == (supply[0] + 50, supply[1])
        [award] = [e.op for e in led.journal() if isinstance(e.op, AwardTask)]
        assert (award.task, award.agent, award.blob) == ("double", paid[0], blob_id(good))
        # Someone else's code cannot be submitted, and the supply cap bounds what tasks mint.
        with pytest.raises(TaskError, match="of your own"):
            await w.submit_task("bob", "double", "alice-double")
        await w.write_artifact("bob", "one", b"def one():\n    return 1\n", kind="code")
        with pytest.raises(TaskError, match="over its cap of 2200"):
            await w.submit_task("bob", "big", "one")
        assert w.mint is not None and [t.id for t in w.mint.open_tasks()] == ["big"]

    with_world(tmp_path, body, events, tweak=_with_tasks)
    assert events.count("task_solved") == 1
    _ledger_ok(tmp_path)


# ------------------------------------------------------------------------------------------- triggers


def test_a_trigger_fires_once_per_matching_event_and_stops_when_its_subscriber_is_broke(tmp_path: Path) -> None:
    events: list[str] = []

    async def body(w: World) -> None:
        assert w.events is not None
        led = w.economy.ledger
        # bob (100 scrip) pays 40 a firing for carol's tool: two firings, then it cannot pay.
        await w.write_artifact("carol", "watcher", b"world.result(world.args['fields']['id'])", kind="code", price=40)
        done = await perform(w, "bob", Subscribe(id="watcher", on="artifact_written", actor="alice"))
        [trigger] = w.triggers.triggers.values()
        assert trigger.id in done.text
        since = await w.events.last_seq_async()
        carol = led.balance("carol", "scrip")
        await w.write_artifact("carol", "not-alice", b"x")  # another actor: no firing
        for i in range(3):
            await w.write_artifact("alice", f"note{i}", b"x")
        suspended = await w.events.wait("bob", kinds={"trigger_suspended"}, since=since, timeout=60)
        assert suspended and "insufficient_funds" in suspended[0].fields["reason"]
        assert (trigger.fired, trigger.state) == (2, "suspended")
        invoked = await w.events.read_async(since, kinds={"artifact_invoked"}, agent="carol")
        assert [e.fields["by"] for e in invoked if e.fields["ok"]] == ["bob", "bob"]
        assert led.balance("carol", "scrip") == carol + 80 and led.balance("bob", "scrip") == 20
        # Suspended: its task has ended, and a new matching event does not match it any more.
        assert w.triggers.tasks[0].done()
        await w.write_artifact("alice", "note3", b"x")
        await w.events.publish("marker")  # committed in order: the write's event is durable before it
        [note3] = (await w.events.read_async(since, kinds={"artifact_written"}, agent="alice"))[-1:]
        assert note3.fields["id"] == "note3" and not trigger.matches(note3)

    with_world(tmp_path, body, events)
    assert events.count("trigger_suspended") == 1
    _ledger_ok(tmp_path)


def test_triggers_and_sponsorships_stand_across_a_restart(tmp_path: Path) -> None:
    trigger: list[str] = []
    left: list[float] = []

    async def before(w: World) -> None:
        await w.write_artifact("carol", "watcher", b"world.result(world.args['fields']['id'])", kind="code")
        await w.write_artifact("alice", "hello", b"world.result('hi')", kind="code")
        kept = await perform(w, "bob", Subscribe(id="watcher", on="artifact_written", actor="alice"))
        dropped = await w.subscribe("carol", "watcher", "artifact_deleted")
        await w.triggers.cancel("carol", dropped.id)
        await perform(w, "alice", Sponsor(id="hello", cpu_seconds=5.0))
        await perform(w, "bob", InvokeArtifact(id="hello", charge_to="owner"))
        trigger.append(kept.text.split(" as ")[-1])
        left.append(w.sponsored[("alice", "hello")])

    async def after(w: World) -> None:
        assert w.events is not None
        # The trigger bob left standing runs again (the cancelled one does not); the sponsorship's rest holds.
        standing = [(t.id, t.record.subscriber, t.state) for t in w.triggers.triggers.values()]
        assert standing == [(trigger[0], "bob", "active")]
        assert w.sponsored == {("alice", "hello"): pytest.approx(left[0])} and 0 < left[0] < 5.0
        since = await w.events.last_seq_async()
        await w.write_artifact("alice", "after", b"x")
        fired = await w.events.wait("carol", kinds={"artifact_invoked"}, since=since, timeout=60)
        assert [(e.fields["by"], e.fields["ok"]) for e in fired] == [("bob", True)]
        alice = _cpu_charged(w, "alice")
        await perform(w, "bob", InvokeArtifact(id="hello", charge_to="owner"))
        assert _cpu_charged(w, "alice") > alice and w.sponsored[("alice", "hello")] < left[0]

    with_world(tmp_path, before)
    with_world(tmp_path, after)
    _ledger_ok(tmp_path)


def test_an_agent_ends_its_own_trigger_with_the_unsubscribe_action_and_no_one_else_can(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        assert w.events is not None
        led = w.economy.ledger
        await w.write_artifact("carol", "watcher", b"world.result(world.args['fields']['id'])", kind="code")
        done = await perform(w, "bob", Subscribe(id="watcher", on="artifact_written", actor="alice"))
        trigger = done.text.split(" as ")[-1]
        # The id the agent was told is one the grammar lets a model write back.
        [variant] = [v for v in ACTION_SCHEMA["anyOf"] if v["properties"]["kind"]["const"] == "unsubscribe"]
        assert re.fullmatch(variant["properties"]["trigger"]["pattern"], trigger), trigger
        since = await w.events.last_seq_async()
        await w.write_artifact("alice", "one", b"x")
        fired = await w.events.wait("carol", kinds={"artifact_invoked"}, since=since, timeout=60)
        assert [e.fields["by"] for e in fired] == ["bob"]
        with pytest.raises(AecoError) as err:  # only its subscriber ends it
            await perform(w, "alice", Unsubscribe(trigger=trigger))
        assert err.value.code == "not_found"
        assert (await perform(w, "bob", Unsubscribe(trigger=trigger))).text == f"ended trigger {trigger}"
        assert [r for r in led.standing() if isinstance(r, LedgerSubscribe)] == []
        with pytest.raises(AecoError) as err:  # and once
            await perform(w, "bob", Unsubscribe(trigger=trigger))
        assert err.value.code == "not_found"
        # Ended: a matching event fires nothing any more; a trigger still standing (alice's, on the same
        # events) fires, so the event was routed.
        ended = w.triggers.triggers[trigger]
        await w.subscribe("alice", "watcher", "artifact_written", actor="alice")
        since = await w.events.last_seq_async()
        await w.write_artifact("alice", "two", b"x")
        fired = await w.events.wait("carol", kinds={"artifact_invoked"}, since=since, timeout=60)
        assert [e.fields["by"] for e in fired] == ["alice"]
        assert (ended.state, ended.fired) == ("cancelled", 1) and w.triggers.tasks[0].done()

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_the_loop_is_handed_only_events_of_a_kind_some_trigger_stands_on(tmp_path: Path) -> None:
    routed: list[str] = []

    async def body(w: World) -> None:
        assert w.events is not None
        route = w.triggers._route

        def counted(events: list[Event]) -> None:
            routed.extend(e.kind for e in events)
            route(events)

        w.triggers._route = counted  # type: ignore[method-assign]
        await w.write_artifact("carol", "watcher", b"world.result(world.args['fields']['id'])", kind="code")
        trigger = await w.subscribe("bob", "watcher", "artifact_written", actor="alice")
        since = await w.events.last_seq_async()
        await perform(w, "alice", TransferScrip(to="carol", amount=1))  # a transfer event: no trigger on it
        await w.write_artifact("alice", "one", b"x")
        fired = await w.events.wait("carol", kinds={"artifact_invoked"}, since=since, timeout=60)
        assert [e.fields["by"] for e in fired] == ["bob"] and trigger.fired == 1
        assert set(routed) == {"artifact_written"}  # the transfer, the invocation, the actions: not handed over
        await w.triggers.cancel("bob", trigger.id)
        n = len(routed)
        await w.write_artifact("alice", "two", b"x")
        await w.events.publish("marker")  # committed in order: the write's event was announced before it
        assert len(routed) == n  # no trigger stands on any kind now: nothing is handed over

    with_world(tmp_path, body)


def test_the_default_config_s_tasks_are_earned_with_one_line_solutions_the_grammar_allows(tmp_path: Path) -> None:
    shipped = load(Path(__file__).resolve().parents[2] / "config" / "default.yaml")
    assert [t.id for t in shipped.tasks] == ["double", "add"]
    solutions = {"double": "def double(x): return 2 * x", "add": "def add(a, b): return a + b"}

    def tweak(cfg: Config) -> Config:
        return msgspec.structs.replace(cfg, tasks=shipped.tasks, budget=shipped.budget)

    async def body(w: World) -> None:
        earned = 0
        for task in shipped.tasks:
            code = solutions[task.id]
            assert re.match(ACTION_SCHEMA["anyOf"][1]["properties"]["content"]["pattern"], code)
            await perform(w, "carol", WriteArtifact(id=f"sol-{task.id}", content=code, artifact_kind="code"))
            done = await perform(w, "carol", SubmitTask(task=task.id, id=f"sol-{task.id}"))
            assert done.text.endswith(f"earned {task.reward} scrip")
            earned += task.reward
        assert w.mint is not None and w.mint.open_tasks() == []
        assert w.economy.ledger.balance("carol", "scrip") == 1000 + earned

    with_world(tmp_path, body, tweak=tweak)
    _ledger_ok(tmp_path)


# ------------------------------------------------------------------------------------------ charge_to


def test_an_owner_pays_for_others_runs_only_up_to_what_it_sponsors(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.write_artifact("alice", "spin", b"while True:\n    pass", kind="code")
        await w.write_artifact("alice", "hello", b"world.result('hi')", kind="code")
        # Not sponsored: asking the owner to pay is refused, and nothing runs.
        with pytest.raises(InvokeError) as err:
            await perform(w, "bob", InvokeArtifact(id="hello", charge_to="owner"))
        assert err.value.code == "insufficient_funds"
        await perform(w, "alice", Sponsor(id="hello", cpu_seconds=5.0))
        bob, alice = _cpu_charged(w, "bob"), _cpu_charged(w, "alice")
        done = await perform(w, "bob", InvokeArtifact(id="hello", charge_to="owner"))
        assert '"hi"' in done.text
        assert _cpu_charged(w, "bob") == bob and _cpu_charged(w, "alice") > alice  # the owner paid
        assert w.sponsored[("alice", "hello")] < 5.0
        # A loop on the owner's account is cut at what is left of its sponsorship.
        await perform(w, "alice", Sponsor(id="spin", cpu_seconds=0.3))
        alice = _cpu_charged(w, "alice")
        with pytest.raises(InvokeError):
            await perform(w, "bob", InvokeArtifact(id="spin", charge_to="owner"))
        assert 0.1 < _cpu_charged(w, "alice") - alice < 0.3 + 0.2
        assert _cpu_charged(w, "bob") == bob
        with pytest.raises(InvokeError, match="does not pay"):
            await perform(w, "bob", InvokeArtifact(id="spin", charge_to="owner"))
        # Only the owner can sponsor.
        with pytest.raises(InvokeError):
            await perform(w, "bob", Sponsor(id="hello", cpu_seconds=1.0))

    with_world(tmp_path, body)
    _ledger_ok(tmp_path)


def test_a_contract_answer_for_any_caller_is_asked_once_even_by_concurrent_callers(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        gate = b"world.result({'allow': world.args['action'] == 'read', 'any_caller': True})"
        await _behind_contract(w, "gate", gate, "board", b"open to all readers")
        # Asked at once by many: one run, whose answer every caller then uses.
        await asyncio.gather(*(perform(w, agent, ReadArtifact(id="board")) for agent in ("bob", "carol") * 3))
        await perform(w, "alice", ReadArtifact(id="board"))  # the owner is not asked at all
        assert (w.access.contract_runs, w.access.cache_hits) == (1, 5)

    with_world(tmp_path, body)
