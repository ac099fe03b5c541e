"""The event log against real LMDB files, a real PostgreSQL database and real ZeroMQ sockets: order,
durability (SIGKILL), filters, cursors, waiting without polling, observers that cannot slow the writer,
and the observer CLI. Tests of the contract run on both backends (``make_log``, ``events``); tests of
LMDB specifics (read-only opening, the SIGKILL writer, the ``dump`` CLI) on LMDB only
(``make_lmdb_log``). Several PostgreSQL nodes and Redis: ``test_events_scaleout.py``.

Run as a module (``python -m tests.integration.test_events DIR --round N``) this file is the crash
writer of ``test_acknowledged_events_survive_sigkill``: it streams events from several threads and
prints each acknowledgement only after its future resolved (a printed line is a durability promise).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from runtime.world.events import ANY_KIND, Event, EventError, concerns
from runtime.world.events.log import EventLog
from runtime.world.events.postgres import PostgresEventLog
from runtime.world.events.pub import EventPublisher, Observer
from tests.crash import kill_mid_write, live_children
from tests.harness import ROOT, closing_all, counting, die_with_parent, started, wake_delays

Log = EventLog | PostgresEventLog
Make = Callable[..., Log]
MakeLmdb = Callable[..., EventLog]


@pytest.fixture
def make_lmdb_log(tmp_path: Path) -> Iterator[MakeLmdb]:
    """``make(name="events", durable=True)``: an LMDB event log in ``tmp_path``, closed after the test."""

    def make(name: str = "events", **kw: Any) -> EventLog:
        return EventLog(tmp_path / name, **kw)

    with closing_all(make) as opener:
        yield opener


@pytest.fixture(params=["lmdb", "postgres"])
def make_log(request: pytest.FixtureRequest, make_lmdb_log: MakeLmdb) -> Iterator[Make]:
    """``make(durable=True, notifiers=...)``: an event log of each backend (a test runs once per backend);
    each call opens the same log again (the same LMDB directory, the same database)."""
    if request.param == "lmdb":
        yield make_lmdb_log
        return
    url: str = request.getfixturevalue("pg_url")
    with closing_all(lambda **kw: PostgresEventLog(url, **kw)) as opener:
        yield opener


@pytest.fixture
def events(make_log: Make) -> Log:
    """A fresh durable log."""
    return make_log()


def seqs(evs: Sequence[Event]) -> list[int]:
    """The sequence numbers of ``evs``."""
    return [e.seq for e in evs]


# ------------------------------------------------------------------------------ order and durability


def test_concurrent_submitters_get_gapless_seqs_in_submission_order(events: Log) -> None:
    threads, per_thread = 8, 250
    results: dict[int, list[Event]] = {}

    def submitter(k: int) -> None:
        futs = [events.submit("transfer", f"a{k}", {"k": k, "i": i}) for i in range(per_thread)]
        results[k] = [f.result(30) for f in futs]

    workers = [threading.Thread(target=submitter, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    total = threads * per_thread
    acked = sorted((e for evs in results.values() for e in evs), key=lambda e: e.seq)
    assert seqs(acked) == list(range(1, total + 1))
    stored = events.read()
    assert stored == acked  # what each caller was acknowledged with is exactly what the log holds
    assert events.last_seq() == total
    for k, evs in results.items():  # one thread's events keep their order
        assert [e.fields["i"] for e in evs] == list(range(per_thread))
        assert seqs(evs) == sorted(seqs(evs))
        assert all(e.agent == f"a{k}" and e.kind == "transfer" for e in evs)
    ats = [e.at for e in stored]
    assert ats == sorted(ats), "at never decreases along seq"
    assert len(set(ats)) < total / 4, "group commit: many events share one transaction"
    assert events.counts == {"transfer": total}


async def _publish_many(log: Log, n: int, **fields: Any) -> list[Event]:
    return list(await asyncio.gather(*(log.publish("task_finished", "alice", i=i, **fields) for i in range(n))))


def test_publish_from_the_loop_and_submit_from_threads_share_one_sequence(events: Log) -> None:
    async def main() -> tuple[list[Event], list[Event]]:
        loop = asyncio.get_running_loop()
        from_threads = loop.run_in_executor(
            None, lambda: [f.result() for f in [events.submit("transfer", None, {"i": i}) for i in range(100)]]
        )
        published = await _publish_many(events, 100)
        return published, await from_threads

    published, submitted = asyncio.run(main())
    assert sorted(seqs(published) + seqs(submitted)) == list(range(1, 201))
    assert seqs(published) == sorted(seqs(published))


def test_a_batch_reaches_an_event_loop_in_one_call(events: Log) -> None:
    hold = events.hold()

    async def main() -> None:
        first = events.submit_async("transfer", "alice", {"i": 0})
        assert hold.waiting.wait(10)  # the writer holds a batch of one; what follows queues behind it
        published = [events.submit_async("transfer", "alice", {"i": i}) for i in range(1, 41)]
        cursor = events.set_cursor_async("alice", 41)  # queued in order, after the events
        past = events.set_cursor_async("bob", 99)
        with counting(asyncio.get_running_loop()) as calls:
            hold.release()
            got = await asyncio.gather(first, *published)
            assert await cursor == 41
            with pytest.raises(EventError):
                await past
        assert seqs(got) == list(range(1, 42))
        assert hold.sizes == [1, 42]
        assert calls.count == 2  # one call on the loop per batch, not one per event

    asyncio.run(main())
    assert events.cursor("alice") == 41 and events.cursor("bob") == 0


def test_events_and_cursors_survive_close_and_reopen(make_log: Make) -> None:
    log = make_log()
    first = [log.append("artifact_written", "alice", id=f"art{i}", size=i) for i in range(5)]
    log.append("system_reset", by="operator")
    assert log.set_cursor("alice", 3).result() == 3
    assert log.set_cursor("bob", 6).result() == 6
    log.close()
    log.close()  # idempotent
    with pytest.raises(EventError) as err:
        log.submit("transfer").result()
    assert err.value.code == "closed"

    again = make_log()
    stored = again.read()
    assert stored[:5] == first and seqs(stored) == [1, 2, 3, 4, 5, 6]
    assert stored[5].agent is None and stored[5].fields == {"by": "operator"}
    assert again.cursor("alice") == 3 and again.cursor("bob") == 6 and again.cursor("carol") == 0
    assert again.cursors() == {"alice": 3, "bob": 6}
    nxt = again.append("transfer", "bob", amount=1)
    assert nxt.seq == 7 and nxt.at >= stored[-1].at


@pytest.mark.slow
def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    data = tmp_path / "events"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    acked: dict[int, tuple[int, int, int]] = {}  # seq -> (round, thread, i)
    cursor_acked = 0
    for rnd in range(5):
        cmd = [sys.executable, "-m", "tests.integration.test_events", str(data), "--round", str(rnd)]
        lines = kill_mid_write(cmd, env=env, errlog=tmp_path / f"writer-{rnd}.err", delay_s=rng.uniform(0.05, 0.6))
        round_acks = 0
        for line in lines:
            tag, *nums = line.split()
            if tag == "c":
                cursor_acked = max(cursor_acked, int(nums[0]))
            else:
                seq, r, k, i = map(int, nums)
                assert r == rnd and seq not in acked
                acked[seq] = (r, k, i)
                round_acks += 1
        assert round_acks > 0

        log = EventLog(data)  # asserts at open that the keys are gapless
        try:
            stored = log.read()
            assert seqs(stored) == list(range(1, len(stored) + 1)), f"round {rnd}: seqs are not gapless"
            by_seq = {e.seq: e for e in stored}
            lost = [s for s in acked if s not in by_seq]
            assert not lost, f"round {rnd}: {len(lost)} acknowledged events lost, e.g. {lost[:5]}"
            for s, (r, k, i) in acked.items():
                assert by_seq[s].fields == {"round": r, "thread": k, "i": i} and by_seq[s].agent == f"w{k}"
            # Each submitting thread's events are in the log in the order it submitted them.
            order: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
            for e in stored:
                order[e.fields["round"], e.fields["thread"]].append(e.fields["i"])
            assert all(v == list(range(len(v))) for v in order.values())
            assert cursor_acked <= log.cursor("watcher") <= log.last_seq()
        finally:
            log.close()
    assert live_children("tests.integration.test_events") == []
    assert len(acked) > 5 * 100  # every round really streamed, not just trickled
    assert cursor_acked > 0


def crash_writer(argv: Sequence[str] | None = None) -> int:
    """Stream events into the log at DIR from several threads until killed (or ``--max-seconds``);
    print ``e SEQ ROUND THREAD I`` for each acknowledged event and ``c SEQ`` for each acknowledged
    cursor update, flushed, only after the future resolved."""
    ap = argparse.ArgumentParser(prog="python -m tests.integration.test_events")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--window", type=int, default=16, help="events in flight per thread")
    ap.add_argument("--max-seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    die_with_parent()
    log = EventLog(args.dir)
    out_lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def submitter(k: int) -> None:
        inflight: collections.deque[tuple[int, Future[Event]]] = collections.deque()
        cursor: Future[int] | None = None
        i = 0
        while time.monotonic() < deadline or inflight:
            while len(inflight) < args.window and time.monotonic() < deadline:
                fields = {"round": args.round, "thread": k, "i": i}
                inflight.append((i, log.submit("task_finished", f"w{k}", fields)))
                i += 1
            lines: list[str] = []
            # Wait for the oldest, then take every other one already done: one flush per group.
            while inflight and (not lines or inflight[0][1].done()):
                n, fut = inflight.popleft()
                ev = fut.result()
                lines.append(f"e {ev.seq} {args.round} {k} {n}\n")
            if k == 0:
                if cursor is not None and cursor.done():
                    lines.append(f"c {cursor.result()}\n")
                    cursor = None
                if cursor is None:
                    cursor = log.set_cursor("watcher", ev.seq)
            with out_lock:
                sys.stdout.write("".join(lines))
                sys.stdout.flush()

    workers = [threading.Thread(target=submitter, args=(k,)) for k in range(args.threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    log.close()
    return 0


# --------------------------------------------------------------------------------- filters and cursors


def test_read_filters_by_kind_agent_since_and_limit(events: Log) -> None:
    events.append("artifact_written", "alice", id="a1")  # 1
    events.append("transfer", "bob", amount=5)  # 2
    events.append("system_reset")  # 3: for everyone
    events.append("artifact_written", "bob", id="b1")  # 4
    events.append("worker_crashed", None, worker=3)  # 5: for everyone
    events.append("agent_blocked", "alice", resource="cpu")  # 6
    assert seqs(events.read()) == [1, 2, 3, 4, 5, 6]
    assert seqs(events.read(3)) == [4, 5, 6]
    assert seqs(events.read(6)) == []
    assert seqs(events.read(kinds={"artifact_written"})) == [1, 4]
    assert seqs(events.read(kinds=["artifact_written", "system_reset"])) == [1, 3, 4]
    assert seqs(events.read(agent="alice")) == [1, 3, 5, 6]
    assert seqs(events.read(agent="bob")) == [2, 3, 4, 5]
    assert seqs(events.read(agent="carol")) == [3, 5]
    assert seqs(events.read(1, kinds={"artifact_written", "worker_crashed"}, agent="bob")) == [4, 5]
    assert seqs(events.read(agent="alice", limit=2)) == [1, 3]
    assert events.read(limit=0) == []
    assert seqs(events.read(kinds=())) == []
    all_events = events.read()
    for kinds in (None, {"transfer", "system_reset"}):
        for agent in (None, "alice", "bob"):
            expect = [e for e in all_events if concerns(e, kinds, agent)]
            assert events.read(kinds=kinds, agent=agent) == expect
    with pytest.raises(ValueError):
        events.read(-1)


def test_the_reads_for_the_event_loop_agree_with_the_synchronous_ones(events: Log) -> None:
    events.append("artifact_written", "alice", id="a1")
    events.append("transfer", "bob", amount=5)
    events.append("system_reset")
    events.append("transfer", "alice", amount=1)
    events.set_cursor("alice", 2).result()

    async def body() -> None:
        for since, kinds, agent, limit in (
            (0, None, None, None),
            (1, {"transfer"}, "alice", None),
            (0, None, "bob", 2),
        ):
            got = await events.read_async(since, kinds=kinds, agent=agent, limit=limit)
            assert got == events.read(since, kinds=kinds, agent=agent, limit=limit)
        assert await events.read_async(0, kinds=()) == []
        assert await events.last_seq_async() == events.last_seq() == 4
        assert await events.cursor_async("alice") == events.cursor("alice") == 2
        assert await events.cursor_async("carol") == 0
        for agent in ("alice", "bob", "carol"):
            for kinds in ({"transfer"}, {"transfer", "system_reset"}, {ANY_KIND}):
                assert await events.last_addressed_async(agent, kinds) == events.last_addressed(agent, kinds)
        await asyncio.wrap_future(events.set_cursor("alice", 4))
        assert await events.cursor_async("alice") == 4
        with pytest.raises(ValueError):
            await events.read_async(-1)

    asyncio.run(body())


def test_cursors_default_set_move_back_and_refuse_the_future(events: Log) -> None:
    assert events.cursor("alice") == 0
    with pytest.raises(EventError) as err:
        events.set_cursor("alice", 1).result()
    assert err.value.code == "cursor"
    for i in range(3):
        events.append("transfer", "alice", i=i)
    assert events.set_cursor("alice", 3).result() == 3
    assert events.set_cursor("alice", 1).result() == 1  # an agent may go back and re-read
    assert events.cursor("alice") == 1
    # Queued behind the event it points at, the cursor is committed after it: never past the end.
    events.submit("transfer", "alice")
    assert events.set_cursor("alice", 4).result() == 4 and events.cursor("alice") == 4
    for bad_agent, bad_seq in (("Alice", 1), ("", 1), ("alice", -1), ("alice", True), ("alice", 1.5)):
        with pytest.raises(EventError) as err:
            events.set_cursor(bad_agent, bad_seq).result()  # type: ignore[arg-type]
        assert err.value.code == "invalid"
    assert events.cursors() == {"alice": 4}


def test_bad_events_are_refused_and_nothing_is_written(events: Log) -> None:
    bad: list[tuple[Any, Any, Any]] = [
        ("Transfer", None, {}),  # kinds are lowercase
        ("task finished", None, {}),
        ("", None, {}),
        ("x" * 65, None, {}),
        ("transfer", "Alice", {}),
        ("transfer", "a" * 33, {}),
        ("transfer", 7, {}),
        ("transfer", None, {"when": object()}),  # not JSON-able
        ("transfer", None, {"blob": "x" * 70_000}),  # an event announces; it does not carry payloads
    ]
    for kind, agent, fields in bad:
        with pytest.raises(EventError) as err:
            events.submit(kind, agent, fields).result()
        assert err.value.code == "invalid", (kind, agent, fields)
    assert events.last_seq() == 0
    odd: dict[Any, Any] = {"items": ("a", 1), "raw": b"\x00\x01", 7: None}
    ev = events.submit("transfer", "alice", odd).result()
    assert ev.fields == {"items": ["a", 1], "raw": "AAE=", "7": None}  # normalized to plain JSON
    assert events.read() == [ev]


def test_append_refuses_to_block_an_event_loop(events: Log) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="publish"):
            events.append("transfer")

    asyncio.run(main())
    assert events.last_seq() == 0
    assert events.append("transfer", "alice").seq == 1


def test_readonly_logs_refuse_writes(make_lmdb_log: MakeLmdb) -> None:
    log = make_lmdb_log()
    log.append("transfer", "alice")
    log.close()  # LMDB must not be opened twice in one process (reading alongside: see the dump CLI test)
    reader = make_lmdb_log(readonly=True)
    assert seqs(reader.read()) == [1]
    with pytest.raises(EventError) as err:
        reader.submit("transfer").result()
    assert err.value.code == "readonly"
    with pytest.raises(EventError):
        reader.set_cursor("alice", 1).result()


class _Collect:
    """A notifier that keeps what it was told."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    def announce(self, events: Sequence[Event]) -> None:
        self.batches.append(list(events))


class _Broken:
    def announce(self, events: Sequence[Event]) -> None:
        raise RuntimeError("this notifier is broken")


def test_notifiers_hear_every_committed_event_once_in_order_and_a_broken_one_harms_nothing(
    make_log: Make, caplog: pytest.LogCaptureFixture
) -> None:
    good = _Collect()
    log = make_log(notifiers=[_Broken()])
    log.attach(good)
    published = asyncio.run(_publish_many(log, 50))
    with pytest.raises(EventError):
        log.submit("Bad").result()
    told = [e for b in good.batches for e in b]
    assert told == published == log.read()
    assert "this notifier is broken" in caplog.text


# ------------------------------------------------------------------------------------------- waiting


def test_wait_returns_at_once_when_a_matching_event_is_already_durable(events: Log) -> None:
    events.append("agent_woken", "alice", why="trade")  # 1
    events.append("transfer", "bob", amount=1)  # 2
    events.append("system_reset")  # 3

    async def main() -> None:
        # A shared log opens its first connection for reads on this loop when first asked: not what is timed.
        await events.last_seq_async()
        t0 = time.monotonic()
        got = await events.wait("alice", kinds={"agent_woken"}, since=0, timeout=10)
        assert seqs(got) == [1] and time.monotonic() - t0 < 0.5  # not the 10 s of its timeout
        assert seqs(await events.wait("alice", since=0, timeout=10)) == [1, 3]  # broadcasts too
        assert seqs(await events.wait("bob", since=0, timeout=10, limit=1)) == [2]
        events.set_cursor("alice", 1).result()
        assert seqs(await events.wait("alice", timeout=10)) == [3]  # since defaults to the cursor
        t0 = time.monotonic()
        assert await events.wait("alice", kinds={"transfer"}, since=0, timeout=0.1) == []  # bob's
        assert time.monotonic() - t0 >= 0.09
        assert events.waiting() == 0

    asyncio.run(main())


def test_a_waiter_wakes_within_milliseconds_of_a_publish(events: Log) -> None:
    delays = asyncio.run(wake_delays(events, [events], 20, 0.01))
    # From the publish call to the waiter running again, durable commit (fsync) included.
    assert statistics.median(delays) < 0.05, delays
    # Every one, too, though a stalled sync on a busy host's disk may stretch one: far below a timeout.
    assert max(delays) < 2.0, delays


def test_an_event_submitted_from_another_thread_wakes_a_waiter_on_the_loop(events: Log) -> None:
    async def main() -> tuple[float, list[Event]]:
        task = await started(events, "alice", since=0, timeout=5)
        t0 = time.perf_counter()
        threading.Thread(target=lambda: events.submit("agent_unblocked", "alice", {"resource": "cpu"})).start()
        got = await task
        return time.perf_counter() - t0, got

    delay, got = asyncio.run(main())
    assert [(e.kind, e.agent) for e in got] == [("agent_unblocked", "alice")]
    assert delay < 2.0  # woken by the commit, not by the 5 s timeout (a loaded host may delay the thread)


def test_a_publish_wakes_only_the_waiters_it_concerns_and_a_broadcast_wakes_all(events: Log) -> None:
    agents = [f"a{i}" for i in range(100)]

    async def main() -> None:
        tasks = {a: await started(events, a, since=0, timeout=10) for a in agents}
        ev = await events.publish("transfer", "a42", amount=1)
        assert seqs(await asyncio.wait_for(tasks.pop("a42"), 5)) == [ev.seq]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks.values())
        reset = await events.publish("system_reset")
        done = await asyncio.wait_for(asyncio.gather(*tasks.values()), 10)
        assert all(got == [reset] for got in done)

    asyncio.run(main())


def test_a_waiter_with_a_timeout_returns_nothing_after_the_timeout(events: Log) -> None:
    events.append("transfer", "alice")

    async def main() -> tuple[float, list[Event]]:
        t0 = time.monotonic()
        got = await events.wait("alice", since=1, timeout=0.3)
        return time.monotonic() - t0, got

    elapsed, got = asyncio.run(main())
    assert got == [] and 0.29 <= elapsed < 1.5


def test_a_sleeping_waiter_uses_no_cpu(events: Log) -> None:
    async def main() -> tuple[float, float, list[Event]]:
        cpu0, wall0 = time.process_time(), time.monotonic()
        got = await events.wait("alice", since=0, timeout=1.0)
        return time.process_time() - cpu0, time.monotonic() - wall0, got

    cpu, wall, got = asyncio.run(main())
    assert got == [] and wall >= 0.99
    assert cpu < 0.02, f"a sleeping waiter burnt {cpu:.3f} s of CPU in {wall:.2f} s"


def test_closing_the_log_wakes_its_waiters_with_nothing(events: Log) -> None:
    async def main() -> list[Event]:
        task = await started(events, "alice", since=0)  # no timeout at all
        events.close()
        return await asyncio.wait_for(task, 1)

    assert asyncio.run(main()) == []


def test_notice_wakes_a_waiter_that_then_trusts_only_the_log(events: Log) -> None:
    """What a cross-node notifier does: hand over an event heard of elsewhere. The waiter re-reads
    the log; a hint of an event the log does not hold wakes it but returns nothing."""

    async def main() -> None:
        task = await started(events, "alice", since=0, timeout=10)
        hint = Event(seq=99, at=time.time(), kind="transfer", agent="alice")
        threading.Thread(target=events.notice, args=([hint],)).start()
        await asyncio.sleep(0.05)
        assert not task.done()  # woken, looked, found nothing, asleep again
        ev = await events.publish("transfer", "alice")
        assert await task == [ev]

    asyncio.run(main())


# -------------------------------------------------------------------------------------- observers


async def _until_heard(log: Log, hear: Callable[[], bool], kind: str = "probe") -> None:
    """Publish ``kind`` events until ``hear()`` says one arrived: a new subscription takes a moment."""
    end = time.monotonic() + 10
    while not hear():
        assert time.monotonic() < end, "the subscription never took"
        await log.publish(kind)
        await asyncio.sleep(0.02)


def test_an_observer_subscribed_by_kind_prefix_gets_those_events(make_log: Make) -> None:
    log = make_log(durable=False)
    with EventPublisher("tcp://127.0.0.1:*") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith(":*")
        log.attach(pub)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(pub.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"artifact_")
        try:

            def heard() -> bool:
                while sub.poll(0):
                    if sub.recv_multipart()[0] == b"artifact_probe":
                        return True
                return False

            async def main() -> list[Event]:
                await _until_heard(log, heard, "artifact_probe")
                return [
                    await log.publish("artifact_written", "alice", id="a1"),
                    await log.publish("transfer", "alice", amount=2),
                    await log.publish("artifact_invoked", "bob", id="a1", ok=True),
                    await log.publish("agent_woken", "bob"),
                    await log.publish("artifact_deleted", "alice", id="a1"),
                ]

            sent = asyncio.run(main())
            got = []
            while sub.poll(300):
                kind, payload = sub.recv_multipart()
                ev = msgspec.msgpack.decode(payload, type=Event)
                assert kind == ev.kind.encode()
                got.append(ev)
            # A probe published before the subscription took may still trail in.
            assert [e for e in got if e.kind != "artifact_probe"] == [e for e in sent if e.kind.startswith("artifact_")]
        finally:
            sub.close()
            ctx.term()


def test_a_stalled_observer_does_not_block_publishing_and_its_losses_are_counted(make_log: Make) -> None:
    log = make_log(durable=False)
    with (
        EventPublisher(hwm=1000) as pub,
        Observer(pub.endpoint, hwm=10) as stalled,
        Observer(pub.endpoint, hwm=0) as healthy,  # unbounded: ZeroMQ never drops for it
    ):
        assert pub.endpoint.startswith("ipc://")
        log.attach(pub)
        n, blob = 4000, "x" * 2000

        async def main() -> float:
            await _until_heard(log, lambda: stalled.recv(0) is not None)
            await _until_heard(log, lambda: healthy.recv(0) is not None)
            t0 = time.monotonic()
            for _ in range(n // 50):
                await _publish_many(log, 50, blob=blob)
                # Paced, so that the healthy observer (whose I/O thread must still move every event
                # from ZeroMQ's queue to its own) needs no luck from the scheduler to keep up.
                await asyncio.sleep(0.005)
            return time.monotonic() - t0

        elapsed = asyncio.run(main())
        assert elapsed < 10, f"{n} publishes took {elapsed:.1f} s"
        # Every event was handed to ZeroMQ, but the probes committed before the first subscription arrived.
        assert pub.sent + pub.unheard == log.last_seq() and pub.dropped == 0
        first = stalled.last_seq  # the one probe it took before stalling
        assert stalled.received == 1
        while stalled.recv(0.2) is not None:
            pass
        assert stalled.received < n, "the stalled observer's buffer filled and it lost events"
        tail = asyncio.run(_publish_many(log, 5))
        got = [stalled.recv(2) for _ in tail]
        assert got == tail, "once it reads again the stalled observer gets new events"
        assert stalled.missed > 0
        assert stalled.missed == (stalled.last_seq - first + 1) - stalled.received
        while healthy.recv(0.2) is not None:
            pass
        assert healthy.missed == 0 and healthy.last_seq == log.last_seq()


def test_events_nobody_subscribed_to_are_not_sent_and_an_observer_that_left_stops_the_sending(
    make_log: Make,
) -> None:
    """The publisher hears subscriptions (XPUB): with no observer it hands ZeroMQ nothing, once one
    subscribes it gets every event, and once it disconnects the publisher stops sending again."""
    log = make_log(durable=False)
    with EventPublisher() as pub:
        log.attach(pub)
        asyncio.run(_publish_many(log, 20))
        assert pub.unheard == 20 and pub.sent == 0
        with Observer(pub.endpoint) as observer:
            asyncio.run(_until_heard(log, lambda: observer.recv(0) is not None))
            while observer.recv(0.2) is not None:  # a probe published before the first one heard may trail in
                pass
            tail = asyncio.run(_publish_many(log, 5))
            got = [observer.recv(2) for _ in tail]
            assert got == tail
            sent = pub.sent
        # The observer's unsubscription reaches the publisher a moment after it closed.
        unheard = pub.unheard
        end = time.monotonic() + 10
        while pub.unheard == unheard:
            assert time.monotonic() < end, "the publisher kept sending to an observer that left"
            asyncio.run(_publish_many(log, 1))
            time.sleep(0.02)
        assert pub.sent >= sent and pub.sent + pub.unheard == log.last_seq()


def _lines(proc: subprocess.Popen[bytes], out: list[bytes]) -> threading.Thread:
    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t


def test_the_observer_cli_prints_json_lines(make_lmdb_log: MakeLmdb, tmp_path: Path) -> None:
    log = make_lmdb_log(durable=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with EventPublisher() as pub:
        log.attach(pub)
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.events", "tail", pub.endpoint, "--kind", "task_", "--timeout", "5"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out: list[bytes] = []
        reader = _lines(proc, out)
        try:

            async def main() -> list[Event]:
                await _until_heard(log, lambda: bool(out), "task_probe")
                sent = [
                    await log.publish("task_finished", "alice", task="t1", ok=True),
                    await log.publish("transfer", "alice", amount=1),
                    await log.publish("task_finished", "bob", task="t2", ok=False),
                ]
                end = time.monotonic() + 10
                while sum(b"task_finished" in line for line in out) < 2:
                    assert time.monotonic() < end, out
                    await asyncio.sleep(0.01)
                return sent

            sent = asyncio.run(main())
            proc.wait(20)  # it stops by itself 5 s after the last event (--timeout), printed some: exit 0
        finally:
            proc.kill()  # if the test failed before
            proc.wait()
            reader.join(5)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        printed = [msgspec.json.decode(line, type=Event) for line in out]
        assert [e for e in printed if e.kind != "task_probe"] == [sent[0], sent[2]]

    dump = subprocess.run(
        [sys.executable, "-m", "runtime.events", "dump", str(tmp_path / "events"), "--agent", "bob", "--since", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    )
    printed = [msgspec.json.decode(line, type=Event) for line in dump.stdout.splitlines()]
    assert printed == [e for e in log.read(1) if concerns(e, None, "bob")] and printed[-1] == sent[2]


if __name__ == "__main__":
    sys.exit(crash_writer())


def test_archived_events_leave_the_index(make_lmdb_log: MakeLmdb, tmp_path: Path) -> None:
    """The per-agent index of a log that archives stays bounded: at the writer's next batch the archived
    seqs are gone from it, and reads for an agent still equal a scan of what the log holds."""
    log = make_lmdb_log()
    for i in range(400):
        log.append("tick", ["a", "b", None][i % 3], i=i)
    assert log.archive(time.time() + 1, tmp_path / "archive") is not None  # all but the last
    log.append("tick", "a", i=400)
    log.append("tick", "b", i=401)
    assert sum(len(seqs) for seqs in log._index.values()) == 3
    for agent in ("a", "b", "z"):
        assert log.read(0, agent=agent) == [e for e in log.read(0) if concerns(e, None, agent)]
    assert seqs(log.read(0, agent="a")) == [400, 401] and seqs(log.read(0, agent="b")) == [402]


def test_a_read_for_one_agent_from_its_index_equals_a_full_scan(events: Log) -> None:
    """Reads for an agent use an in-memory index of the events committed since the log was opened (LMDB)
    or SQL filters (PostgreSQL); an unfiltered read scans the log: filtering that scan by hand must
    give the same events. ``last_addressed`` must agree with the scan too."""
    rng = random.Random(3)
    agents = ["a", "b", "c", None]
    for i in range(300):
        events.append(rng.choice(["transfer", "artifact_invoked", "action"]), rng.choice(agents), i=i)
    for since in (0, 1, 57, 150, 299, 300):
        everything = events.read(since)
        for agent in ("a", "b", "z"):
            for kinds in (None, {"transfer"}, {"transfer", "artifact_invoked"}):
                expected = [e for e in everything if concerns(e, kinds, agent)]
                for limit in (None, 1, 7):
                    got = events.read(since, agent=agent, kinds=kinds, limit=limit)
                    assert got == (expected if limit is None else expected[:limit]), (since, agent, kinds)
    assert events.read(0, agent="a") and all(e.agent in ("a", None) for e in events.read(0, agent="a"))
    everything = events.read()
    for agent in ("a", "b", "z"):
        for kinds in ({"transfer"}, {"transfer", "artifact_invoked"}, {ANY_KIND}, {"nothing"}, set()):
            matching = [e.seq for e in everything if concerns(e, None if ANY_KIND in kinds else kinds, agent)]
            assert events.last_addressed(agent, kinds) == max(matching, default=0), (agent, kinds)
