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


def _action(kind: str, **props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"kind": {"const": kind}, **props},
        "required": ["kind", *props],
        "additionalProperties": False,
    }


ACTION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _action("write_artifact", id=_ID, content=_TEXT),
        _action("read_artifact", id=_ID),
        _action("delete_artifact", id=_ID),
        _action("invoke_artifact", id=_ID),
        _action("transfer", to=_AGENT, amount={"enum": [1, 2, 5, 10, 20, 50]}),
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
