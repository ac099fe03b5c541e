"""The operator's pause and resume, as the event log keeps them: ``agent_paused`` and ``agent_resumed``
events (published by ``runtime.ops.dashboard``), the latest of them per agent in force. A starting node
pauses again the agents they leave paused (``runtime.node.replay_operator``); retention, which moves old
events out of the log, first carries a pause still in force forward as a new event (``carry_pauses``),
so that the log alone always says who is paused.
"""

from __future__ import annotations

from collections.abc import Iterable

from runtime.world.events import Event, Events

#: The events that pause and resume an agent.
PAUSE_KINDS = ("agent_paused", "agent_resumed")


def paused(events: Iterable[Event]) -> set[str]:
    """The agents that ``events`` (in ``seq`` order) leave paused: each agent's latest pause or resume decides."""
    latest: dict[str, str] = {}
    for ev in events:
        if ev.kind in PAUSE_KINDS and ev.agent is not None:
            latest[ev.agent] = ev.kind
    return {a for a, kind in latest.items() if kind == "agent_paused"}


def carry_pauses(events: Events, horizon: float) -> list[str]:
    """Before the events older than ``horizon`` leave the log: append a new ``agent_paused`` for each agent
    that one of them paused and no later event resumed or paused again; the agents, sorted. Blocks on the
    log's sync (``Events.append``): call it from a thread, not the event loop."""
    controls = events.read(0, kinds=PAUSE_KINDS)
    leaving = paused(e for e in controls if e.at < horizon)
    staying = {e.agent for e in controls if e.at >= horizon}
    carried = sorted(leaving - staying)
    for agent in carried:
        events.append("agent_paused", agent, by="operator", carried=True)
    return carried


__all__ = ["PAUSE_KINDS", "carry_pauses", "paused"]
