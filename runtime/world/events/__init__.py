"""Events: what happened in the world, numbered in a durable log, served to observers and waking agents.

Every event (a task finished, a transfer, an artifact written, an agent blocked or woken, a worker
crashed, …) gets the next sequence number in the log (``runtime.world.events.log.EventLog``, LMDB; or
``runtime.world.events.postgres.PostgresEventLog``, shared by the nodes of a scale-out deployment) and is
acknowledged only once it is on disk. After each commit the log hands the new events to

- the in-process waiters: an agent sleeping in ``wait`` until an event concerning it arrives is woken
  by the commit itself (no polling), then reads the log from where it left off;
- its ``Notifier``s: the ZeroMQ PUB socket for live observers (``runtime.world.events.pub``), the Redis
  relay that carries wake-ups to other nodes (``runtime.world.events.redis``). Notifiers are
  fire-and-forget: a lost notification costs an observer a line or a remote waiter a wake-up, never
  an event, because the log is the source of truth and everything downstream can re-read it by
  sequence number.

Each agent has a cursor (the last sequence number it has dealt with) kept in the same log, so that an
agent that restarts resumes where it was.

Invariants:

- sequence numbers are 1, 2, 3, … without gaps, in commit order, and never reused;
- ``at`` never decreases along the sequence (a clock stepping back is clamped);
- an event is acknowledged (its future resolved, its waiters woken, its notifiers told) only after it
  is durable;
- a cursor never points past the last event.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any, Protocol

from msgspec import Meta, Struct

from runtime.errors import AecoError, ErrorCode

#: Event kinds are ZeroMQ topics, so observers subscribe by prefix: keep them short, lowercase words.
Kind = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
#: Same shape as a ledger account id.
AgentId = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]

#: The kinds the runtime itself emits (others are allowed: any ``Kind``), with who emits them:
#: ``action`` (an agent's turn: ok or rejected, and why), ``transfer`` and ``rate_changed`` (``World``),
#: ``offer_posted`` and ``offer_closed`` (``World``: to the seller; the open offers are in every context),
#: ``budget_alert`` and ``budget_paused`` (the run's dollar cap, ``runtime.economy.dollars``),
#: ``task_posted`` (the task mint, to everyone: the operator posted a task while the runtime runs),
#: ``task_solved`` (the task mint, ``runtime.world.tasks``: to the agent it paid), ``trigger_suspended``
#: (``runtime.world.triggers``: to the subscriber that could not pay),
#: ``artifact_written``/``_deleted``/``_invoked`` (``World``), ``agent_blocked``/``_unblocked`` (the
#: buckets), ``system_reset`` (an operator's rollback: by the control, or at start for one made while
#: stopped), ``task_failed`` (a task a
#: crash interrupted, charged by the recovery), ``agent_paused``/``_resumed`` and ``operator_note`` (the
#: operator's controls, ``runtime.ops.dashboard``). ``tests/unit/test_event_kinds.py`` keeps this list true.
KINDS: tuple[str, ...] = (
    "action",
    "transfer",
    "rate_changed",
    "offer_posted",
    "offer_closed",
    "budget_alert",
    "budget_paused",
    "task_posted",
    "task_solved",
    "trigger_suspended",
    "artifact_written",
    "artifact_deleted",
    "artifact_invoked",
    "agent_blocked",
    "agent_unblocked",
    "system_reset",
    "task_failed",
    "agent_paused",
    "agent_resumed",
    "operator_note",
)

#: An event's encoded ``fields`` may not exceed this: events announce, they do not carry payloads
#: (those belong in artifacts), and every waiter and observer pays for each byte.
MAX_FIELDS_BYTES = 64 * 1024


#: For ``last_addressed``: any kind of event.
ANY_KIND = "*"


class Event(Struct, frozen=True):
    """One thing that happened, as kept in the log and sent to observers."""

    seq: int
    #: When it was committed: UTC unix time, non-decreasing along ``seq``.
    at: float
    kind: str
    #: Whom it concerns; ``None`` concerns everyone (a broadcast).
    agent: str | None
    #: JSON-able details.
    fields: dict[str, Any] = {}


class EventError(AecoError, ValueError):
    """An event or cursor update that was refused; nothing of it was written (``invalid``, ``closed``,
    ``readonly``, ``cursor``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)


def concerns(event: Event, kinds: Collection[str] | None, agent: str | None) -> bool:
    """Whether ``event`` passes the filters of ``read`` and ``wait``: its kind is one of ``kinds``
    (any kind when ``None``), and it is for ``agent`` or for everyone (any agent when ``None``)."""
    if kinds is not None and event.kind not in kinds:
        return False
    return agent is None or event.agent is None or event.agent == agent


class Notifier(Protocol):
    """Something told of every committed event after the commit: the PUB socket for observers, the
    Redis notifier for other nodes' waiters.

    ``announce`` runs on the log's writer thread, between commits: it must not block (drop instead)
    and should not raise (an exception is logged and ignored; the events are durable regardless).
    A notifier that *receives* wake-ups from elsewhere hands them to the log's ``notice``.
    """

    def announce(self, events: Sequence[Event]) -> None:
        """Pass on these committed events (in ``seq`` order)."""
        ...


#: ``emit(kind, fields)``: an event for the log, queued without waiting for it (``fields["agent"]``,
#: when set, is whom it concerns).
Emit = Callable[[str, dict[str, Any]], None]


def emitter(events: Events) -> Emit:
    """``emit(kind, fields)`` for the world and the buckets: queued to the durable event log (which
    wakes sleeping agents and tells observers once the event is on disk), without waiting for it."""

    def emit(kind: str, fields: dict[str, Any]) -> None:
        rest = dict(fields)
        agent = rest.pop("agent", None)
        events.submit(kind, agent if isinstance(agent, str) else None, rest)

    return emit


# The interface every backend offers is the base class they all derive from (writes, reads, waiting,
# notifiers); imported last because it is built on the types above.
from runtime.world.events.base import LogBase as Events  # noqa: E402

__all__ = [
    "ANY_KIND",
    "KINDS",
    "MAX_FIELDS_BYTES",
    "AgentId",
    "Emit",
    "Event",
    "EventError",
    "Events",
    "Kind",
    "Notifier",
    "concerns",
    "emitter",
]
