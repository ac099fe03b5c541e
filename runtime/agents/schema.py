"""The action schema an LLM brain generates against, and the parser that checks what it produced.

llama.cpp's JSON-schema converter ignores ``minLength``/``maximum`` and friends, so every string here is
bounded with a ``pattern`` and every small integer with an ``enum``; whatever the model produces is
then decoded with msgspec against ``AgentAction``, the same types the supervisor executes.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from runtime.actions import AgentAction
from runtime.errors import AecoError, ErrorCode

_ID = {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,23}$"}
_AGENT = {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,23}$"}
_TEXT = {"type": "string", "pattern": "^[A-Za-z0-9 ,.!?'-]{1,60}$"}
#: One line of Python (``def double(x): return 2 * x``; ``world.result(world.args)``): enough for a
#: task's solution or a small tool, with no newline or quote for the grammar to escape.
_CODE = {"type": "string", "pattern": "^[A-Za-z0-9 ,.!?()\\[\\]:=+*/<>_%-]{1,160}$"}


def _action(kind: str, **props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"kind": {"const": kind}, **props},
        "required": ["kind", *props],
        "additionalProperties": False,
    }


#: An offer id `<agent>.<name>`: at most 64 characters in all, as the action's own type allows.
_OFFER = {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,23}[.][A-Za-z0-9_.-]{1,39}$"}
#: A trigger id as ``runtime.world.triggers`` makes them: ``trig-<agent>-<run>-<n>``.
_TRIGGER = {"type": "string", "pattern": "^trig-[a-z][a-z0-9_-]{0,23}-[A-Za-z0-9_.-]{1,60}$"}
_RIGHT = {"enum": ["cpu_rate", "llm_rate", "disk_quota", "memory_quota", "llm_budget"]}
_PRICE = {"enum": [0, 1, 2, 5, 10, 20, 50]}
#: Rights come in very different units (millicores, tokens/s, bytes, micro-dollars).
_UNITS = {"enum": [10, 50, 100, 500, 1000, 100000, 1000000]}
_POLICY = {
    "type": "string",
    "pattern": "^(public|owner|price:[0-9]{1,3}|allow:[a-z][a-z0-9_-]{0,23}|contract:[a-z][a-z0-9_-]{0,23})$",
}

ACTION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _action("write_artifact", id=_ID, content=_TEXT),
        _action(
            "write_artifact", id=_ID, content=_CODE, artifact_kind={"const": "code"}, readable=_POLICY, price=_PRICE
        ),
        _action("read_artifact", id=_ID),
        _action("delete_artifact", id=_ID),
        _action("invoke_artifact", id=_ID),
        _action("invoke_artifact", id=_ID, charge_to={"const": "owner"}),
        _action("sponsor", id=_ID, cpu_seconds={"enum": [1, 5, 10, 60]}),
        _action("transfer", to=_AGENT, amount={"enum": [1, 2, 5, 10, 20, 50]}),
        _action("transfer", to=_AGENT, amount=_UNITS, asset=_RIGHT),
        _action("offer", asset=_RIGHT, amount=_UNITS, price=_PRICE),
        _action("accept_offer", offer=_OFFER),
        _action("cancel_offer", offer=_OFFER),
        _action("submit", task=_ID, id=_ID),
        _action("subscribe", id=_ID, on={"type": "string", "pattern": "^[a-z][a-z_]{0,31}$"}),
        _action("unsubscribe", trigger=_TRIGGER),
        _action("remember", text=_TEXT),
        _action("recall", query=_TEXT),
        _action("sleep", seconds={"enum": [1, 2, 5, 10, 30]}),
        _action("noop"),
    ]
}
ACTION_SCHEMA_BYTES = json.dumps(ACTION_SCHEMA, separators=(",", ":")).encode()

_decoder = msgspec.json.Decoder(AgentAction)


class InvalidAction(AecoError, ValueError):
    """Model output that is not an action; the message says why, for the agent to read."""

    default_code: ErrorCode = "invalid_action"


def parse_action(text: str | bytes) -> AgentAction:
    """Decode one action, or raise ``InvalidAction`` saying what is wrong with it."""
    raw = text.encode() if isinstance(text, str) else text
    try:
        action: AgentAction = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        shown = raw[:120].decode("utf-8", "replace")
        raise InvalidAction(f"not a valid action ({exc}): {shown!r}") from None
    return action
