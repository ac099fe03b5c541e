"""A PostgreSQL and a Redis server of the benchmark's own, and the CPU their processes use.

``benchmarks.scale`` charges the shared servers' CPU to the actions the nodes make. On a host where
other work also uses the system's PostgreSQL and Redis, their counters would include that work, so the
benchmark starts servers nobody else knows about: a PostgreSQL cluster made with ``initdb`` (the
package's defaults, as the deployment's image has them: 128 MB of shared buffers, ``fsync`` and
``synchronous_commit`` on, no TLS) on a free port, and a ``redis-server`` without persistence, as the
compose file runs it. Both live in a temporary directory on disk, not in memory, so commits are as
durable as a deployment's.

CPU of PostgreSQL is the kernel's count for its whole process tree (``tree_cpu_seconds``): the
postmaster, every live child (a backend per connection, the checkpointer, WAL writer and so on), and
every child that has exited and been reaped, which the kernel adds to the parent's ``cutime``/
``cstime``. A backend that ends during a measurement is therefore still counted. Redis is one process;
its own ``getrusage`` counters (``INFO cpu``) are read, for their microsecond resolution.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import psycopg
import redis

from tests.services import free_port

#: How long a server may take to accept connections before the benchmark gives up on it.
START_TIMEOUT_S = 60.0


class ServerFailed(RuntimeError):
    """A server could not be started; the message carries the end of its log."""


def tree_cpu_seconds(pid: int, attempts: int = 20) -> float:
    """CPU-seconds used so far by process ``pid``, its live children and its reaped children.

    One consistent reading: a child reaped while its siblings are being read would be counted twice
    (in its own counter and in the parent's) or not at all, so the parent's reaped-children counter
    is read before and after, and the reading is retried until nothing was reaped in between.
    Grandchildren are included through their parent's counters once reaped, and read directly while
    alive.
    """
    proc = psutil.Process(pid)
    for _ in range(attempts):
        own = proc.cpu_times()
        total = own.user + own.system + own.children_user + own.children_system
        for child in proc.children():
            # A child gone meanwhile shows in the reaped counter, and the re-read below notices.
            with contextlib.suppress(psutil.NoSuchProcess):
                total += tree_cpu_seconds(child.pid, attempts)
        again = proc.cpu_times()
        if (again.children_user, again.children_system) == (own.children_user, own.children_system):
            return total
    raise RuntimeError(f"process {pid}: children kept exiting while it was being read ({attempts} tries)")


def _newest_postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise ServerFailed("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (Debian's postgresql)")
    return Path(found[-1]).parent


class _Server:
    """One server process of the benchmark's, in a temporary directory of its own: started by the
    subclass (``_launch``), waited for until ``_answers``, stopped with ``stop_signal`` by ``close``,
    which also deletes the directory. A context manager."""

    #: The signal that shuts the server down cleanly.
    stop_signal = signal.SIGTERM

    def __init__(self, prefix: str, parent: str | None = None) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._proc: subprocess.Popen[bytes] | None = None

    def _launch(self, cmd: list[str], **popen: Any) -> None:
        """Start ``cmd`` and wait (up to ``START_TIMEOUT_S``) until the server answers."""
        log = self._dir / "server.log"
        with log.open("wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)
        end = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > end:
                raise ServerFailed(f"{Path(cmd[0]).name} did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """The server's main process."""
        assert self._proc is not None
        return self._proc.pid

    def cpu_seconds(self) -> float:
        """CPU-seconds the server has used so far: its process tree, exited children included."""
        return tree_cpu_seconds(self.pid)

    def close(self) -> None:
        """Stop the server and delete its files. Safe to call twice."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(self.stop_signal)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PostgresServer(_Server):
    """A fresh PostgreSQL cluster on ``127.0.0.1:port``, run as the ``postgres`` user (it refuses root).

    ``url`` is its superuser's URL (trust authentication, on the loopback only); ``create_database``
    makes an empty database for one run. On disk (``/var/tmp``), so that commits are really durable.
    """

    stop_signal = signal.SIGINT  # PostgreSQL's "fast" shutdown

    def __init__(self, user: str = "postgres") -> None:
        super().__init__("aeco-bench-pg-", parent="/var/tmp")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        account = pwd.getpwnam(user)
        uid, gid = account.pw_uid, account.pw_gid
        os.chown(self._dir, uid, gid)
        tools = _newest_postgres_bin()
        data = self._dir / "data"
        try:
            out = subprocess.run(
                [str(tools / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8"],
                capture_output=True, text=True, timeout=120, cwd=self._dir, user=uid, group=gid,
            )  # fmt: skip
            if out.returncode != 0:
                raise ServerFailed(f"initdb failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
            self._launch(
                [str(tools / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self._dir}"],
                cwd=self._dir, user=uid, group=gid,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def _answers(self) -> bool:
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self) -> str:
        """An empty database of its own; its URL."""
        name = f"aeco_b_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url.rpartition('/')[0]}/{name}"


class RedisServer(_Server):
    """``redis-server`` on ``127.0.0.1:port`` with nothing persisted (as the compose file runs it)."""

    def __init__(self) -> None:
        super().__init__("aeco-bench-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server")
        try:
            if binary is None:
                raise ServerFailed("redis-server is not installed")
            self._launch(
                [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self._dir)],
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def cpu_seconds(self) -> float:
        """Redis's own getrusage counters (``INFO cpu``: microseconds, where /proc counts 10 ms ticks,
        too coarse for the little CPU Redis uses in a window), children included."""
        client = redis.Redis.from_url(self.url)
        try:
            info = client.info("cpu")
        finally:
            client.close()
        return float(sum(info[f"used_cpu_{k}"] for k in ("user", "sys", "user_children", "sys_children")))
