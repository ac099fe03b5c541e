"""The ledger's rules for standing orders (triggers and sponsorships) on the replay's in-memory view:
what a restart takes up is exactly what these ops leave, and a refused op leaves nothing."""

from __future__ import annotations

import msgspec
import pytest

from runtime.economy.ledger import (
    EndTrigger,
    LedgerError,
    OpenAccount,
    Sponsor,
    SponsorUsed,
    Subscribe,
    codec,
    standing_key,
)
from runtime.economy.ledger.checkpoint import Checkpoint
from runtime.economy.ledger.rules import MemoryView, apply


def _view() -> MemoryView:
    view = MemoryView()
    for name in ("ann", "ben"):
        apply(view, OpenAccount(id=f"open:{name}", account=name))
    return view


def test_a_trigger_stands_until_its_subscriber_ends_it() -> None:
    view = _view()
    sub = Subscribe(id="s1", trigger="trig-ann-1", subscriber="ann", artifact="tool", kind="transfer")
    apply(view, sub)
    assert view.standing(standing_key("trigger", "trig-ann-1")) == sub
    with pytest.raises(LedgerError) as err:  # one trigger per id
        apply(view, Subscribe(id="s2", trigger="trig-ann-1", subscriber="ann", artifact="x", kind="transfer"))
    assert err.value.code == "conflict"
    with pytest.raises(LedgerError) as err:  # not ben's to end
        apply(view, EndTrigger(id="e1", trigger="trig-ann-1", subscriber="ben", state="cancelled"))
    assert err.value.code == "forbidden" and view.standing(standing_key("trigger", "trig-ann-1")) == sub
    apply(view, EndTrigger(id="e2", trigger="trig-ann-1", subscriber="ann", state="suspended", reason="broke"))
    assert view.standing_orders == {}
    with pytest.raises(LedgerError) as err:
        apply(view, EndTrigger(id="e3", trigger="trig-ann-1", subscriber="ann", state="cancelled"))
    assert err.value.code == "not_found"
    with pytest.raises(LedgerError) as err:  # only an agent subscribes
        apply(view, Subscribe(id="s3", trigger="t", subscriber="nobody", artifact="x", kind="transfer"))
    assert err.value.code == "unknown_account"


def test_a_sponsorship_holds_what_is_left_and_ends_at_zero() -> None:
    view = _view()
    key = standing_key("sponsor", "ann", "tool")
    apply(view, Sponsor(id="p1", owner="ann", artifact="tool", cpu_seconds=2.0))
    apply(view, SponsorUsed(id="u1", owner="ann", artifact="tool", cpu_seconds=0.5))
    left = view.standing(key)
    assert isinstance(left, Sponsor) and left.cpu_seconds == 1.5
    apply(view, Sponsor(id="p2", owner="ann", artifact="tool", cpu_seconds=3.0))  # replaces what was left
    apply(view, SponsorUsed(id="u2", owner="ann", artifact="tool", cpu_seconds=5.0))  # more than left: none left
    assert view.standing(key) is None
    apply(view, SponsorUsed(id="u3", owner="ann", artifact="tool", cpu_seconds=0.1))  # ended meanwhile: no-op
    apply(view, Sponsor(id="p3", owner="ann", artifact="tool", cpu_seconds=1.0))
    apply(view, Sponsor(id="p4", owner="ann", artifact="tool", cpu_seconds=0.0))  # 0 stops it
    assert view.standing_orders == {}


def test_a_checkpoint_keeps_what_stands_through_its_stored_form() -> None:
    view = _view()
    apply(view, Subscribe(id="s1", trigger="trig-ann-1", subscriber="ann", artifact="tool", kind="transfer"))
    apply(view, Sponsor(id="p1", owner="ben", artifact="tool", cpu_seconds=1.5))
    stored = codec.checkpoint.decode(codec.encode(Checkpoint.of(view, through=4, at=0.0, folded=4, usage_records=0)))
    assert stored.view().standing_orders == view.standing_orders
    # A checkpoint written before triggers stood in the ledger reads as one with none.
    fields = msgspec.structs.asdict(stored)
    del fields["standing"]
    older = codec.checkpoint.decode(codec.encode(fields))
    assert older.view().standing_orders == {} and older.view().offers == stored.view().offers
