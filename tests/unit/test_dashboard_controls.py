"""The dashboard's controls as the wire carries them: a tagged union decoded with its type, bad input
refused with what was wrong."""

from __future__ import annotations

import msgspec
import pytest

from runtime.ops.dashboard import BurnAsset, Control, Grant, Inject, Pause, Rollback

decode = msgspec.json.Decoder(Control).decode


def test_each_control_decodes_to_its_type() -> None:
    assert decode(b'{"type": "pause", "agent": "ann"}') == Pause("ann")
    assert decode(b'{"type": "grant", "agent": "ann", "asset": "scrip", "amount": 5}') == Grant("ann", "scrip", 5)
    assert decode(b'{"type": "burn", "agent": "ann", "asset": "cpu_rate", "amount": 1, "reason": "r"}') == BurnAsset(
        "ann", "cpu_rate", 1, "r"
    )
    assert decode(b'{"type": "inject", "text": "hello"}') == Inject("hello")
    assert decode(b'{"type": "rollback", "to": "abc123"}') == Rollback("abc123")
    # What the command line sends is what the page sends.
    assert decode(msgspec.json.encode(Grant("ben", "llm_budget", 7))) == Grant("ben", "llm_budget", 7)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"type": "explode", "agent": "ann"}', "Invalid value 'explode' - at `$.type`"),
        (b'{"type": "grant", "agent": "ann", "asset": "gold", "amount": 5}', "at `$.asset`"),
        (b'{"type": "grant", "agent": "ann", "asset": "scrip", "amount": -5}', "Expected `int` >= 1 - at `$.amount`"),
        (b'{"type": "inject", "text": ""}', "at `$.text`"),
        (b'{"type": "pause"}', "missing required field `agent`"),
    ],
)
def test_bad_controls_are_refused_saying_where(body: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message.replace("$", r"\$").replace("(", r"\(")):
        decode(body)
