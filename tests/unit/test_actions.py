"""The action language agrees with the ledger it acts on."""

from __future__ import annotations

from typing import get_args

from runtime.actions import ReadableText, RightAsset, TradeAsset, TriggerIdText
from runtime.economy.ledger import ASSETS, TriggerId
from runtime.world.store import READABLE_PATTERN


def test_the_actions_name_exactly_the_ledger_assets() -> None:
    assert get_args(TradeAsset) == ASSETS
    assert get_args(RightAsset) == tuple(a for a in ASSETS if a != "scrip")


def test_the_write_action_takes_exactly_the_store_s_access_policies() -> None:
    assert get_args(ReadableText)[1].pattern == READABLE_PATTERN


def test_the_unsubscribe_action_takes_exactly_the_ledger_s_trigger_ids() -> None:
    assert get_args(TriggerIdText)[1].pattern == get_args(TriggerId)[1].pattern
