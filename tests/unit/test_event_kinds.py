"""The documented event kinds (``runtime.world.events.KINDS``) are exactly the kinds the runtime emits."""

from __future__ import annotations

import re
from pathlib import Path

from runtime.world.events import KINDS

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
#: A literal kind handed to the event log (``emit``, ``publish``, ``submit``, ``submit_async``) or to the
#: buckets' ``on_event``.
EMITTED = re.compile(r"\b(?:emit|publish|submit|submit_async)\(\s*\"([a-z_]+)\"|\"(agent_(?:un)?blocked)\"")


def test_every_kind_emitted_is_documented_and_every_documented_kind_is_emitted() -> None:
    found = set()
    for path in RUNTIME.rglob("*.py"):
        for m in EMITTED.finditer(path.read_text()):
            found.add(m.group(1) or m.group(2))
    assert found == set(KINDS)
