"""Several nodes on one PostgreSQL event log, waking each other through real Redis pub/sub.

Nodes are ``PostgresEventLog`` instances on one database: in this process, or in child processes
(``python -m tests.integration.test_events_scaleout URL ...`` runs one node: it appends events from
several threads when told to go, and prints what it was acknowledged). Each test uses a channel
namespace of its own on the shared Redis server; tests that stop Redis run a private ``redis-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
import psycopg
import pytest
import redis

from runtime.world.events import Event
from runtime.world.events.postgres import PostgresEventLog
from runtime.world.events.redis import RedisRelay, RedisUnavailable
from tests.harness import ROOT, reap, started, wake_delays
from tests.services import ADMIN_URL

#: A safety poll so slow that a test finishing well within it proves the wake-up came another way.
NEVER = 600.0


class Nodes:
    """Opens nodes (a log, optionally with a relay) on one database and closes them all afterwards."""

    def __init__(self, pg_url: str, redis_url: str) -> None:
        self.pg_url, self.redis_url = pg_url, redis_url
        self.namespace = f"test-{uuid.uuid4().hex[:12]}"
        self._open: list[RedisRelay | PostgresEventLog] = []

    def log(self, **kw: Any) -> PostgresEventLog:
        """A node's event log."""
        log = PostgresEventLog(self.pg_url, **kw)
        self._open.append(log)
        return log

    def relay(self, log: PostgresEventLog, url: str | None = None, **kw: Any) -> RedisRelay:
        """A relay for ``log`` on this test's namespace (closed before the logs)."""
        relay = RedisRelay(url or self.redis_url, log, namespace=self.namespace, **kw)
        self._open.append(relay)
        return relay

    def close(self) -> None:
        for thing in sorted(self._open, key=lambda t: isinstance(t, PostgresEventLog)):
            thing.close()


@pytest.fixture
def nodes(pg_url: str, redis_url: str) -> Iterator[Nodes]:
    """Nodes on a fresh database and a fresh Redis namespace."""
    made = Nodes(pg_url, redis_url)
    yield made
    made.close()


async def eventually(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait until ``cond()`` holds; fail the test after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"condition not met within {timeout_s} s"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------- one sequence, many nodes


class NodeReport(msgspec.Struct):
    """What a child node prints when done: the seqs it was acknowledged, per thread, in order."""

    tag: str
    acked: dict[str, list[int]]
    woke: int


def node_main(argv: Sequence[str] | None = None) -> int:
    """One node in a child process: open the log (and a relay), print ``ready``, wait for a line on
    stdin, append ``--count`` events from each of ``--threads`` threads, then one ``agent_woken`` for
    ``watcher``; print a ``NodeReport`` as JSON."""
    ap = argparse.ArgumentParser(prog="python -m tests.integration.test_events_scaleout")
    ap.add_argument("url")
    ap.add_argument("--redis", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--count", type=int, default=300)
    args = ap.parse_args(argv)
    log = PostgresEventLog(args.url)
    relay = RedisRelay(args.redis, log, namespace=args.namespace, poll_s=NEVER)
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":
        return 1  # the test went away
    acked: dict[str, list[int]] = {}

    def submitter(k: int) -> None:
        futs = collections.deque[Any]()
        seqs: list[int] = []
        for i in range(args.count):
            futs.append(log.submit("transfer", args.tag, {"node": args.tag, "thread": k, "i": i}))
            if len(futs) >= 8:  # a window of events in flight, so that batches form
                seqs.append(futs.popleft().result().seq)
        seqs.extend(f.result().seq for f in futs)
        acked[str(k)] = seqs

    workers = [threading.Thread(target=submitter, args=(k,)) for k in range(args.threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    woke = log.append("agent_woken", "watcher", by=args.tag).seq
    relay.close()
    log.close()
    print(msgspec.json.encode(NodeReport(args.tag, acked, woke)).decode(), flush=True)
    return 0


def test_two_node_processes_append_concurrently_into_one_gapless_sequence(nodes: Nodes) -> None:
    threads, count = 2, 800  # enough that the two nodes overlap even if one wakes late on a loaded host
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tests.integration.test_events_scaleout", nodes.pg_url, "--redis", nodes.redis_url]
    cmd += ["--namespace", nodes.namespace, "--threads", str(threads), "--count", str(count)]
    procs = [
        subprocess.Popen(
            [*cmd, "--tag", tag],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for tag in ("na", "nb")
    ]
    try:
        for p in procs:  # both migrate the schema at once on their way up
            assert p.stdout is not None and p.stdout.readline() == b"ready\n", p.stderr.read() if p.stderr else ""
        watcher = nodes.log()
        relay = nodes.relay(watcher, poll_s=NEVER)

        async def main() -> list[Event]:
            task = await started(watcher, "watcher", kinds={"agent_woken"}, timeout=60)
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                p.stdin.flush()
            return await task

        # The first child to finish wakes this node's waiter: through Redis, as the poll never runs.
        woken = asyncio.run(main())
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        reap(procs)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    reports = [msgspec.json.decode(out, type=NodeReport) for out, _ in outs]
    # Woken by the first child's event; the second child's may already be durable when it reads.
    assert 1 <= len(woken) <= 2 and all(e.kind == "agent_woken" for e in woken), woken
    assert {e.seq for e in woken} <= {r.woke for r in reports}, (woken, reports)
    assert relay.received >= 1 and relay.delivered >= 1

    stored = watcher.read()
    total = 2 * (threads * count + 1)
    assert [e.seq for e in stored] == list(range(1, total + 1)), "seqs are gapless and unique across nodes"
    by_seq = {e.seq: e for e in stored}
    for r in reports:
        for k, seqs in r.acked.items():
            # Each thread's acknowledgements are what the log holds, in the order it submitted them.
            assert seqs == sorted(seqs) and len(seqs) == count
            assert [by_seq[s].fields for s in seqs] == [{"node": r.tag, "thread": int(k), "i": i} for i in range(count)]
        assert by_seq[r.woke].agent == "watcher"
    ats = [e.at for e in stored]
    assert ats == sorted(ats), "at never decreases along seq, whichever node wrote"
    tags = [e.fields["node"] for e in stored if e.kind == "transfer"]
    switches = sum(a != b for a, b in itertools.pairwise(tags))
    assert switches >= 2, f"the nodes' batches interleave (the appends were concurrent): {switches} switches"


def test_concurrent_appends_from_two_nodes_in_one_process_are_gapless(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()
    per = 400

    def burst(log: PostgresEventLog, tag: str) -> list[Event]:
        futs = [log.submit("transfer", tag, {"i": i}) for i in range(per)]
        return [f.result(60) for f in futs]

    results: dict[str, list[Event]] = {}
    workers = [
        threading.Thread(target=lambda log=log, tag=tag: results.__setitem__(tag, burst(log, tag)))
        for log, tag in ((a, "a"), (b, "b"), (a, "c"), (b, "d"))
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    acked = sorted((e for evs in results.values() for e in evs), key=lambda e: e.seq)
    assert [e.seq for e in acked] == list(range(1, 4 * per + 1))
    assert a.read() == b.read() == acked
    assert a.last_seq() == b.last_seq() == 4 * per
    for evs in results.values():
        assert [e.fields["i"] for e in evs] == list(range(per))


# ------------------------------------------------------------------------------------ waking across nodes


def test_a_waiter_on_one_node_is_woken_by_an_event_appended_on_another(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()
    ra, rb = nodes.relay(a, poll_s=NEVER), nodes.relay(b, poll_s=NEVER)

    # Events the waiter does not want, from either node, leave it asleep; the one it wants comes from b.
    delays = asyncio.run(wake_delays(a, [b, a], 15, 0.05))
    median, worst = statistics.median(delays) * 1000, max(delays) * 1000
    print(f"cross-node wake-up, from the publish call: median {median:.1f} ms, max {worst:.1f} ms")
    # Announcements queued together go out as one. b counts one once Redis took it, which may be after
    # a heard it: its count is waited for.
    asyncio.run(eventually(lambda: rb.published >= 15))
    assert ra.received >= 15
    assert ra.disconnects == rb.disconnects == 0


def test_each_event_of_another_node_is_noticed_once_and_a_nodes_own_never(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()
    ra, rb = nodes.relay(a, poll_s=0.2), nodes.relay(b, poll_s=0.2)

    async def main() -> None:
        # A waiter for nobody keeps node a reading every event; node b has none, but its log follows the
        # stream (for the last_addressed it answers from memory), so it reads a's events too.
        idle = await started(a, "idle", kinds={"nothing"}, timeout=60)
        for i in range(10):
            await a.publish("transfer", "x", i=i)
            await b.publish("transfer", "y", i=i)
        await b.publish("transfer", "y", i=10)
        await eventually(lambda: ra.seen() == rb.seen() == a.last_seq() == 21)
        await asyncio.sleep(0.5)  # a few more safety polls: nothing is delivered twice
        idle.cancel()

    asyncio.run(main())
    assert ra.delivered == 11, "node b's events reach node a's waiters once each; node a's own never"
    assert rb.delivered == 10, "node a's events reach node b's followers once each; node b's own never"


def test_another_nodes_action_events_are_not_read_and_the_mark_passes_them(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()
    ra, _ = nodes.relay(a, poll_s=0.2), nodes.relay(b, poll_s=0.2)
    heard: list[str] = []
    a.follow(lambda events, local: heard.extend(e.kind for e in events if not local))

    async def main() -> None:
        for i in range(5):
            await b.publish("action", "y", i=i)  # y runs on node b: its turns are news to nobody else
        await b.publish("transfer", "x", amount=1)
        for i in range(3):
            await b.publish("action", "y", i=5 + i)  # the last events are skipped ones: the mark still passes
        await eventually(lambda: ra.seen() == a.last_seq() == 9)

    asyncio.run(main())
    assert heard == ["transfer"] and ra.delivered == 1


def test_a_waiter_is_woken_by_the_safety_poll_when_no_message_comes(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()  # b has no relay: its commits are never announced
    ra = nodes.relay(a, poll_s=0.3)

    async def main() -> list[Event]:
        task = await started(a, "alice", timeout=30)
        ev = await b.publish("agent_woken", "alice")
        assert await task == [ev]
        return [ev]

    asyncio.run(main())
    assert ra.received == 0 and ra.delivered == 1


def test_a_waiter_is_woken_by_the_catch_up_after_its_subscription_was_killed(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()  # only the catch-up can tell a: b announces nothing, a's poll never runs
    ra = nodes.relay(a, poll_s=NEVER, first_backoff_s=2.0)
    admin = redis.Redis.from_url(nodes.redis_url)
    try:

        async def main() -> None:
            task = await started(a, "alice", timeout=30)
            # The server drops a's subscription (only a's: other tests share this server).
            ids = [c["id"] for c in admin.client_list(_type="pubsub") if c["name"] == ra.client_name]
            assert len(ids) == 1
            admin.client_kill_filter(_id=ids[0])
            await eventually(lambda: ra.disconnects == 1)
            # While a is away (2 s back-off) an event for alice is committed on b: nobody announces it.
            ev = await b.publish("agent_woken", "alice")
            assert await asyncio.wait_for(task, 20) == [ev]

        asyncio.run(main())
    finally:
        admin.close()
    assert ra.received == 0 and ra.delivered == 1
    # Subscribed again (the catch-up that woke the waiter may have come before the back-off ended): the
    # next announcement is heard.
    assert ra.subscribed.wait(10)
    rb = nodes.relay(b, poll_s=NEVER)

    async def again() -> None:
        task = await started(a, "alice", since=b.last_seq(), timeout=30)
        ev = await b.publish("agent_woken", "alice")
        assert await task == [ev]

    asyncio.run(again())
    asyncio.run(eventually(lambda: rb.published >= 1))  # counted once Redis took it: maybe after a heard it
    assert ra.received >= 1


def test_a_relay_started_late_catches_up_on_what_it_missed(nodes: Nodes) -> None:
    a, b = nodes.log(), nodes.log()
    nodes.relay(b, poll_s=NEVER)

    async def main() -> None:
        task = await started(a, "alice", timeout=30)
        ev = await b.publish("agent_woken", "alice")  # announced, but node a is not listening yet
        await asyncio.sleep(0.3)
        assert not task.done()
        ra = await asyncio.to_thread(nodes.relay, a, poll_s=NEVER)
        assert await asyncio.wait_for(task, 20) == [ev]
        assert ra.delivered == 1

    asyncio.run(main())


def test_a_restarted_node_resumes_from_its_durable_cursor(nodes: Nodes) -> None:
    a = nodes.log()
    first = [a.append("transfer", "alice", i=i) for i in range(3)]
    assert a.set_cursor("alice", first[-1].seq).result() == 3
    a.close()  # node a goes down; node b carries on
    b = nodes.log()
    missed = [b.append("transfer", "alice", i=3), b.append("system_reset"), b.append("transfer", "bob")]
    again = nodes.log()  # node a restarts

    async def main() -> list[Event]:
        return await again.wait("alice", timeout=10)  # since: its cursor

    assert again.cursor("alice") == 3
    assert asyncio.run(main()) == missed[:2]
    assert again.read(again.cursor("alice"), agent="alice") == missed[:2]
    assert again.last_addressed("alice", {"transfer"}) == missed[0].seq


def test_a_node_whose_database_sessions_are_dropped_carries_on(nodes: Nodes) -> None:
    """What a node sees when the server restarts or drops its sessions: the writer retries the batch
    that found its connection dead (nothing of it was written), reads retry on a fresh connection."""
    a = nodes.log()
    first = a.append("transfer", "alice")
    assert a.read(agent="alice") == [first]
    dbname = nodes.pg_url.rpartition("/")[2]
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        ).fetchone()
        assert row is not None and row[0] >= 2  # the writer's session and a reader's
        end = time.monotonic() + 20
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone() != (0,):
            assert time.monotonic() < end, "the sessions were not terminated"
            time.sleep(0.02)
    again = a.append("transfer", "alice", after="drop")
    assert again.seq == 2
    assert a.read() == [first, again] and a.last_seq() == 2 and a.cursor("alice") == 0


# ----------------------------------------------------------------------------------- Redis coming and going


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of this test's own, on a free port, that the test may stop and start."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + 20
        with redis.Redis(port=self.port, socket_connect_timeout=1) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    assert time.monotonic() < end, "the private redis-server did not come up"
                    time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A private Redis server, not started yet."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (it runs the shared test server too)")
    server = PrivateRedis()
    yield server
    server.stop()


def test_with_redis_down_commits_go_on_and_wake_ups_come_from_the_poll_until_it_is_back(
    nodes: Nodes, private_redis: PrivateRedis
) -> None:
    private_redis.start()
    a, b = nodes.log(), nodes.log()
    ra = nodes.relay(a, private_redis.url, poll_s=0.5, max_backoff_s=0.5)
    rb = nodes.relay(b, private_redis.url, poll_s=NEVER, max_backoff_s=0.5)

    async def woken_by_b(kind: str) -> Event:
        task = await started(a, "alice", kinds={kind}, since=a.last_seq(), timeout=30)
        ev = await b.publish(kind, "alice")
        assert await asyncio.wait_for(task, 30) == [ev]
        return ev

    async def main() -> None:
        await woken_by_b("agent_woken")
        heard = ra.received
        private_redis.stop()
        t0 = time.monotonic()
        for _ in range(20):  # commits do not wait for Redis: announcing is fire-and-forget
            await b.publish("transfer", "bob")
        assert time.monotonic() - t0 < 10
        await eventually(lambda: rb.dropped >= 1 and ra.disconnects >= 1)
        await woken_by_b("agent_unblocked")  # through a's safety poll
        assert ra.received == heard
        private_redis.start()
        # Both relays reconnect on their own; b's announcements reach a again.
        end = time.monotonic() + 30
        while ra.received == heard:
            assert time.monotonic() < end, "the relays never came back to the restarted server"
            await b.publish("probe")
            await asyncio.sleep(0.1)

    asyncio.run(main())
    assert ra.disconnects >= 1 and rb.dropped >= 1


def test_a_redis_slow_to_come_up_is_waited_for(nodes: Nodes, private_redis: PrivateRedis) -> None:
    log = nodes.log()
    threading.Timer(1.0, private_redis.start).start()
    t0 = time.monotonic()
    relay = nodes.relay(log, private_redis.url, deadline_s=20)
    assert time.monotonic() - t0 >= 0.9 and relay.subscribed.is_set()


def test_an_unusable_redis_url_fails_at_start_with_a_clear_message(nodes: Nodes) -> None:
    log = nodes.log()
    url = f"redis://agent:hunter2@127.0.0.1:{_free_port()}/0"
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"no Redis server answered within 1 s") as info:
        RedisRelay(url, log, namespace=nodes.namespace, deadline_s=1.0)
    assert 0.9 <= time.monotonic() - t0 < 10, "a refused connection is retried until the deadline"
    assert "hunter2" not in str(info.value) and "agent:***@127.0.0.1" in str(info.value)
    for bad, why in (
        ("http://127.0.0.1:6379", r"REDIS_URL='http://127.0.0.1:6379' is malformed"),
        (nodes.redis_url.replace("redis://", "redis://nobody:hunter2@"), r"nobody:\*\*\*@.*rejected by the server"),
    ):
        t0 = time.monotonic()
        with pytest.raises(RedisUnavailable, match=why) as info:
            RedisRelay(bad, log, namespace=nodes.namespace, deadline_s=20)
        assert time.monotonic() - t0 < 5, "a malformed URL or a refused login is not retried"
        assert "hunter2" not in str(info.value)
    assert log.append("transfer", "alice").seq == 1  # the log itself is unharmed


if __name__ == "__main__":
    sys.exit(node_main())
