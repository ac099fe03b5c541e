"""The benchmark's own PostgreSQL and Redis servers, and the CPU counters of their process trees.

The capacity model of ``python -m benchmarks scale`` charges each server's CPU to the actions of a
window. PostgreSQL spends most of it in backends, one process per connection, which may end inside
the window: their CPU must still count. Here a backend burns CPU and disconnects; once the postmaster
has reaped it, the tree's counter still holds what the backend had used (read from its own /proc entry
just before it went), and the counter never goes backwards. Redis's own counter (``INFO cpu``, finer
than the kernel's ticks) agrees with the kernel's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from benchmarks.servers import PostgresServer, RedisServer, tree_cpu_seconds
from runtime.pool.accounting import proc_cpu_seconds

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts PostgreSQL as the postgres user (needs root)")

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


def test_an_exited_backend_still_counts_in_the_servers_cpu(pg: PostgresServer) -> None:
    url = pg.create_database()
    before = tree_cpu_seconds(pg.pid)
    with psycopg.connect(url) as conn:
        (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
        status = Path(f"/proc/{backend}/status").read_text()
        assert f"\nPPid:\t{pg.pid}\n" in status, "the backend is not the postmaster's child"
        for _ in range(3):
            conn.execute("SELECT sum(i) FROM generate_series(1, 2000000) AS i").fetchone()
        used = proc_cpu_seconds(backend)
        assert used is not None and used > 0.05, used
    # The backend exits once its client is gone; the postmaster reaps it.
    end = time.monotonic() + 30
    while Path(f"/proc/{backend}").exists():
        assert time.monotonic() < end, f"backend {backend} still there"
        time.sleep(0.05)
    after = tree_cpu_seconds(pg.pid)
    assert after - before >= used - TICK_S, (before, used, after)
    assert tree_cpu_seconds(pg.pid) >= after  # monotonic


def test_the_redis_servers_own_counter_agrees_with_the_kernels() -> None:
    with RedisServer() as rd:
        assert Path(f"/proc/{rd.pid}/comm").read_text().strip() == "redis-server"
        client = redis.Redis.from_url(rd.url)
        try:
            before, kernel_before = rd.cpu_seconds(), tree_cpu_seconds(rd.pid)
            with client.pipeline(transaction=False) as pipe:
                for i in range(200_000):
                    pipe.publish("bench", i)
                pipe.execute()
            used, kernel = rd.cpu_seconds() - before, tree_cpu_seconds(rd.pid) - kernel_before
        finally:
            client.close()
        assert used > 0.05, used
        # Two readings of 10 ms ticks on the kernel's side: within two ticks (and the INFO calls).
        assert abs(used - kernel) <= 2 * TICK_S + 0.01, (used, kernel)
