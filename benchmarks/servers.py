"""A PostgreSQL and a Redis server of the benchmark's own, and the CPU their processes use.

``benchmarks.scale`` charges the shared servers' CPU to the actions the nodes make. On a host where
other work also uses the system's PostgreSQL and Redis, their counters would include that work, so the
benchmark starts servers nobody else knows about: a PostgreSQL cluster made with ``initdb`` (the
package's defaults, as the deployment's image has them: 128 MB of shared buffers, ``fsync`` and
``synchronous_commit`` on, no TLS) on a free port, and a ``redis-server`` without persistence, as the
compose file runs it. Both live in a temporary directory on disk, not in memory, so commits are as
durable as a deployment's.

CPU of a server is the kernel's count for its whole process tree (``tree_cpu_seconds``): the main
process, every live child (PostgreSQL forks a backend per connection, plus its checkpointer, WAL writer
and so on), and every child that has exited and been reaped, which the kernel adds to the parent's
``cutime``/``cstime``. A backend that ends during a measurement is therefore still counted.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

import psycopg
import redis

from tests.services import free_port

_TICK = os.sysconf("SC_CLK_TCK")
#: How long a server may take to accept connections before the benchmark gives up on it.
START_TIMEOUT_S = 60.0


class ServerFailed(RuntimeError):
    """A server could not be started; the message carries the end of its log."""


def _stat(pid: int) -> tuple[float, float, list[int]]:
    """(own CPU, CPU of reaped children, live children) of a process, in CPU-seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()  # the command, in parentheses, may hold spaces
    own = (int(fields[11]) + int(fields[12])) / _TICK
    reaped = (int(fields[13]) + int(fields[14])) / _TICK
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return own, reaped, children


def tree_cpu_seconds(pid: int, attempts: int = 20) -> float:
    """CPU-seconds used so far by process ``pid``, its live children and its reaped children.

    One consistent reading: a child reaped while its siblings are being read would be counted twice
    (in its own counter and in the parent's) or not at all, so the parent is read before and after
    and the reading is retried until nothing was reaped in between. Grandchildren are included through
    their parent's counters once reaped, and read directly while alive.
    """
    for _ in range(attempts):
        own, reaped, children = _stat(pid)
        total = own + reaped
        for child in children:
            # A child gone meanwhile shows in the reaped counter, and the re-read below notices.
            with contextlib.suppress(FileNotFoundError):
                total += tree_cpu_seconds(child, attempts)
        if _stat(pid)[1] == reaped:
            return total
    raise RuntimeError(f"process {pid}: children kept exiting while it was being read ({attempts} tries)")


def _newest_postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise ServerFailed("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (Debian's postgresql)")
    return Path(found[-1]).parent


class PostgresServer:
    """A fresh PostgreSQL cluster on ``127.0.0.1:port``, run as the ``postgres`` user (it refuses root).

    ``url`` is its superuser's URL (trust authentication on the loopback only); ``create_database``
    makes an empty database for one run. Stopped and deleted by ``close``.
    """

    def __init__(self, user: str = "postgres") -> None:
        self.port = free_port()
        self._bin = _newest_postgres_bin()
        self._account = pwd.getpwnam(user)
        self._dir = Path(tempfile.mkdtemp(prefix="aeco-bench-pg-", dir="/var/tmp"))
        os.chown(self._dir, self._account.pw_uid, self._account.pw_gid)
        self.data = self._dir / "data"
        self._log = self._dir / "server.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._as_user("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8")
            self._start()
        except BaseException:
            self.close()
            raise

    def _as_user(self, tool: str, *args: str) -> None:
        out = subprocess.run(
            [str(self._bin / tool), *args], user=self._account.pw_uid, group=self._account.pw_gid,
            capture_output=True, text=True, timeout=120, cwd=self._dir,
        )  # fmt: skip
        if out.returncode != 0:
            raise ServerFailed(f"{tool} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")

    def _start(self) -> None:
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(self._bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self._dir}"],
                user=self._account.pw_uid, group=self._account.pw_gid, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self._proc.poll() is not None or time.monotonic() > end:
                    raise ServerFailed(f"PostgreSQL did not start: {self._log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The postmaster's pid (every backend is its child)."""
        assert self._proc is not None
        return self._proc.pid

    def create_database(self) -> str:
        """An empty database of its own; its URL."""
        name = f"aeco_b_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url.rpartition('/')[0]}/{name}"

    def close(self) -> None:
        """Stop the server (a fast shutdown) and delete its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(2)  # SIGINT: PostgreSQL's fast shutdown
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port`` with nothing persisted (as the compose file runs it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="aeco-bench-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerFailed("redis-server is not installed")
        self._proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self._dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._proc.poll() is not None or time.monotonic() > end:
                        self.close()
                        raise ServerFailed(f"redis-server did not start (exit {self._proc.poll()})") from None
                    time.sleep(0.05)
        finally:
            client.close()

    @property
    def pid(self) -> int:
        """The server's pid."""
        return self._proc.pid

    def close(self) -> None:
        """Stop the server and delete its directory."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
