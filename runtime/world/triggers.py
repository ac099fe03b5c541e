"""Triggers: code that runs when something happens, paid for by whoever asked.

    event log writer thread ──announce──► loop: route ──► trigger's queue ──► invoke confined as the
    (every committed event)               (filters)        (one at a time)     subscriber, charged to it

An agent subscribes a code artifact it may invoke to an event filter (kind; optionally the actor — the
agent the event concerns or who caused it — and the artifact the event is about). Every committed event
that matches invokes the artifact once, confined, with the event as ``world.args``
(``{"seq", "kind", "agent", "fields"}``), through ``World.invoke_artifact`` as the subscriber: its CPU
waits for and is charged to the subscriber's buckets (which so rate-limit it), and its price is paid by
the subscriber. A trigger whose subscriber cannot pay (``insufficient_funds``) is suspended, with a
``trigger_suspended`` event to the subscriber, and fires no more; other failures of the code are the
code's and the trigger stays.

Events a trigger's own invocation causes (``artifact_invoked`` of its artifact) do not fire it again,
so a trigger cannot feed itself.

A trigger stands in the ledger, like an open offer: subscribing is a ``Subscribe`` op (its stored record
while it stands), a cancellation or suspension an ``EndTrigger`` op, and a supervisor that starts again
starts the triggers standing for its agents (``restore``). Events committed while no supervisor ran
fire nothing: a trigger hears what happens while it runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Literal

from msgspec import Struct

from runtime.economy.ledger import EndTrigger, Subscribe
from runtime.errors import AecoError
from runtime.world.events import Event

if TYPE_CHECKING:
    from runtime.world.world import World

log = logging.getLogger("runtime.world.triggers")

#: Events waiting for one trigger: a trigger slower than its events drops the oldest past this (each
#: waiting event is a future charge to its subscriber, and memory of the supervisor's).
QUEUE_LIMIT = 1000


class Trigger(Struct, kw_only=True):
    """One subscription (its record in the ledger: who, which artifact, the filter) and what it did."""

    record: Subscribe
    state: Literal["active", "suspended", "cancelled"] = "active"
    fired: int = 0
    failed: int = 0
    dropped: int = 0

    @property
    def id(self) -> str:
        """The trigger's id (what ``cancel`` takes)."""
        return self.record.trigger

    def matches(self, event: Event) -> bool:
        """Whether ``event`` should fire this trigger."""
        f, r = event.fields, self.record
        if event.kind != r.kind or self.state != "active":
            return False
        if event.kind == "artifact_invoked" and f.get("id") == r.artifact and f.get("by") == r.subscriber:
            return False  # its own invocation
        if r.actor is not None and r.actor not in (event.agent, f.get("by"), f.get("from"), f.get("buyer")):
            return False
        return r.about is None or r.about in (f.get("id"), f.get("artifact"), f.get("offer"))


class Triggers:
    """The triggers of one world; the event log tells it of every committed event (``announce``)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.triggers: dict[str, Trigger] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self._task_of: dict[str, asyncio.Task[None]] = {}
        self._by_kind: dict[str, list[Trigger]] = {}
        #: The kinds of event some trigger stands on: replaced whole on the loop, read by the log's writer
        #: thread (``announce``), which hands the loop only the events of those kinds.
        self._kinds: frozenset[str] = frozenset()
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._n = itertools.count(1)

    async def subscribe(
        self, subscriber: str, artifact: str, kind: str, actor: str | None = None, about: str | None = None
    ) -> Trigger:
        """Start a trigger once the ledger holds it (on the event loop)."""
        n = next(self._n)
        record = Subscribe(
            id=f"{self.world.economy.run_id}:{subscriber}:sub{n}",
            trigger=f"trig-{subscriber}-{self.world.economy.run_id}-{n}",
            subscriber=subscriber,
            artifact=artifact,
            kind=kind,
            actor=actor,
            about=about,
        )
        await self.world.economy.ledger.submit_async(record)
        return self._start(record)

    def restore(self, agents: Collection[str]) -> list[Trigger]:
        """Start again the triggers the ledger holds for ``agents`` (this node's), on the event loop."""
        standing = self.world.economy.ledger.standing()
        return [self._start(r) for r in standing if isinstance(r, Subscribe) and r.subscriber in agents]

    def _start(self, record: Subscribe) -> Trigger:
        if self._loop is None:  # the first trigger attaches to the event log
            events = self.world.events
            if events is None or not hasattr(events, "attach"):
                raise AecoError("triggers need the supervisor's event log", code="unavailable")
            self._loop = asyncio.get_running_loop()
            events.attach(self)
        trigger = Trigger(record=record)
        self.triggers[trigger.id] = trigger
        self._by_kind.setdefault(record.kind, []).append(trigger)
        self._kinds = self._kinds | {record.kind}
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[trigger.id] = queue
        task = asyncio.create_task(self._run(trigger, queue), name=f"trigger:{trigger.id}")
        self.tasks.append(task)
        self._task_of[trigger.id] = task
        return trigger

    async def cancel(self, subscriber: str, trigger_id: str) -> None:
        """Stop one of ``subscriber``'s triggers, for good."""
        trigger = self.triggers.get(trigger_id)
        if trigger is None or trigger.record.subscriber != subscriber or trigger.state != "active":
            raise AecoError(f"`{subscriber}` has no trigger `{trigger_id}`", code="not_found")
        trigger.state = "cancelled"
        self._task_of[trigger_id].cancel()
        self._forget(trigger)
        await self._end(trigger, "")

    async def _end(self, trigger: Trigger, reason: str) -> None:
        state: Literal["cancelled", "suspended"] = "cancelled" if trigger.state == "cancelled" else "suspended"
        op = EndTrigger(
            id=f"end:{trigger.id}", trigger=trigger.id, subscriber=trigger.record.subscriber, state=state, reason=reason
        )
        await self.world.economy.ledger.submit_async(op)

    def announce(self, events: Sequence[Event]) -> None:
        """The event log's writer thread hands over committed events: those of a kind some trigger stands
        on are routed on the loop (the others cost the loop no wake-up)."""
        kinds = self._kinds
        wanted = [e for e in events if e.kind in kinds]
        if wanted and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._route, wanted)

    def _route(self, events: list[Event]) -> None:
        # By kind first: the event loop pays for the triggers an event could fire, not for all of them.
        for e in events:
            for trigger in self._by_kind.get(e.kind, ()):
                if trigger.matches(e):
                    queue = self._queues[trigger.id]
                    if queue.qsize() >= QUEUE_LIMIT:
                        queue.get_nowait()
                        trigger.dropped += 1
                    queue.put_nowait(e)

    async def _run(self, trigger: Trigger, queue: asyncio.Queue[Event]) -> None:
        r = trigger.record
        while True:
            event = await queue.get()
            if trigger.state != "active":  # suspended or cancelled meanwhile
                break
            args = {"seq": event.seq, "kind": event.kind, "agent": event.agent, "fields": event.fields}
            try:
                await self.world.invoke_artifact(r.subscriber, r.artifact, args)
                trigger.fired += 1
            except AecoError as exc:
                if exc.code in ("insufficient_funds", "not_found", "forbidden", "not_code"):
                    trigger.state = "suspended"
                    reason = f"{exc.code}: {exc.message}"[:200]
                    try:
                        await self._end(trigger, reason)
                    except AecoError as why:  # it stands in the ledger, and is suspended again after a restart
                        log.warning("could not record that trigger %s is suspended: %s", trigger.id, why)
                    self.world.emit(
                        "trigger_suspended", {"agent": r.subscriber, "trigger": trigger.id, "reason": reason}
                    )
                else:
                    trigger.failed += 1
            if trigger.state != "active":
                break
        self._forget(trigger)

    def _forget(self, trigger: Trigger) -> None:
        self._queues.pop(trigger.id, None)
        same = self._by_kind.get(trigger.record.kind, [])
        if trigger in same:
            same.remove(trigger)
        if not same:
            self._kinds = self._kinds - {trigger.record.kind}
