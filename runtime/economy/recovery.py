"""Recovery at start: charge the tasks a killed supervisor left in flight (see ``runtime.pool.inflight``).

A record that cannot be charged (it does not decode, or an amount in it is not finite and >= 0: a
damaged file, or one written by someone else) must not stop the node from starting, nor be charged:
it is set aside with what was wrong (``InflightLog.quarantine``) and said, and every other record is
charged as usual, once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

import msgspec

from runtime.economy.buckets import Buckets
from runtime.economy.charging import charge, split_usage
from runtime.economy.ledger import Ledger, LedgerError, RecordUsage
from runtime.pool.accounting import BadReport, TaskUsage, check_usage
from runtime.pool.inflight import CRASH_CODE, InFlight, InflightLog, Spoiled, measure
from runtime.protocol import SeqWork, ThinkBatchReport


class EventSink(Protocol):
    """Where recovery tells of the tasks it charged (the event log: ``runtime.world.events.Events``)."""

    def submit(self, kind: str, agent: str | None = None, fields: dict[str, Any] | None = None) -> Future[Any]:
        """Queue one event; the future resolves once it is durable."""
        ...


def recover(
    inflight: InflightLog,
    ledger: Ledger,
    buckets: Buckets,
    events: EventSink,
    say: Callable[[str], None] = print,
) -> list[RecordUsage]:
    """Charge every task a killed supervisor left in flight, as failed with ``supervisor_crashed``.

    Run it at start, after the buckets are restored from the ledger and before agents run or the pool
    sweeps stale cgroups. Each task gets one usage record keyed by its task id (none if it already has
    one: charged before the kill, or by a recovery that was killed after its commit), its agent's
    buckets are lowered by the charge from their persisted levels, a ``task_failed`` event is logged
    (at most once: a kill between the charge and the event loses the event, never the charge), and one
    line is said. A record that cannot be charged is set aside and said instead. Returns the usage
    records written.
    """
    done: list[str] = []
    written: list[RecordUsage] = []
    leftovers, spoiled = inflight.scan()
    for rec in leftovers:
        usage, source = measure(rec)
        try:  # the kernel's counters are believable; a record's arithmetic on them is checked anyway
            check_usage(usage, f"in-flight task {rec.task_id}")
        except BadReport as exc:
            spoiled.append(Spoiled(rec.task_id.encode(), msgspec.msgpack.encode(rec), str(exc)))
            continue
        charged = True
        for agent, task_id, kind, share, batch in _charges(rec, usage):
            if ledger.usage(task_id) is not None:  # charged before the kill, or by a killed recovery
                continue
            record = charge(buckets, agent, kind, task_id, share, False, error=CRASH_CODE, batch=batch)
            try:
                ledger.apply(record)
            except LedgerError as exc:  # kept for the next start; the operator sees this line each time
                say(f"cannot charge task {task_id} left in flight by a killed supervisor: {exc}")
                charged = False
                continue
            written.append(record)
            fields = {"task": task_id, "kind": kind, "code": CRASH_CODE, "cpu_seconds": share.cpu_seconds}
            events.submit("task_failed", agent, fields).result()
            say(
                f"recovered task {task_id} ({kind} of {agent} on worker {rec.worker_id}): "
                f"failed with {CRASH_CODE}, charged {share.cpu_seconds:.3f} CPU-s ({source})"
            )
        if charged:
            done.append(rec.task_id)
    # The dead run's cgroups go once their counters are charged, even if the pool's sweep would not
    # take them (a new supervisor with the dead one's pid would adopt them, counters and all).
    for cgroups in {r.cgroups.dirs[0]: r.cgroups for r in leftovers if r.cgroups and r.task_id in done}.values():
        cgroups.remove()
    inflight.drop(done)
    for path, bad in zip(inflight.quarantine(spoiled), spoiled, strict=True):
        say(f"set aside in-flight record {bad.key[:64]!r}, not charged: {bad.why} (kept in {path})")
    return written


def _charges(rec: InFlight, usage: TaskUsage) -> list[tuple[str, str, str, TaskUsage, str]]:
    """What one in-flight record is charged as: (agent, task id, kind, usage, batch). A task is its
    agent's; a ``think_batch`` is split equally among its agents as ``<batch>.<i>`` (the work each
    sequence caused died with the worker's report), the same ids its shares have when it ends."""
    if not rec.sharers:
        return [(rec.agent, rec.task_id, rec.kind, usage, "")]
    nothing = ThinkBatchReport([], [SeqWork(own_tokens=0) for _ in rec.sharers])
    shares = split_usage(usage, nothing)
    return [
        (agent, f"{rec.task_id}.{i}", "think", share, rec.task_id)
        for i, (agent, share) in enumerate(zip(rec.sharers, shares, strict=True))
    ]
