"""The ecology's own rules through the real path (actions, world, ledger, store, pool, confined code):
rights and quotas traded with ``transfer``, standing offers accepted atomically."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.actions import AcceptOffer, CancelOffer, MakeOffer, TransferScrip, perform
from runtime.economy.ledger import LedgerError
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
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
