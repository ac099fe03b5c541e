"""Agents' artifacts end to end: the store, the ledger, the economy and confined code on real workers."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from runtime.config import AgentConfig, Config, EconomyConfig, PoolConfig
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.node import Node
from runtime.world.store import StoreError, verify
from runtime.world.world import InvokeError, World
from tests.crash import descendants_of_uid

T = TypeVar("T")


def _agent(name: str, **kw: object) -> AgentConfig:
    return msgspec.convert({"id": name, "workload": [{"kind": "echo"}], "cpu_rate": 400, **kw}, AgentConfig)


def with_world(
    tmp: Path,
    body: Callable[[World], Awaitable[T]],
    events: list[str] | None = None,
    tweak: Callable[[Config], Config] | None = None,
) -> T:
    """A supervisor's world in miniature: real ledger, store and pool, the data directory hidden.
    ``tweak`` changes the configuration (adds tasks, a budget …) before the node starts."""
    data = tmp / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    cfg = Config(
        data_dir=str(data),
        pool=PoolConfig(workers=2),
        economy=EconomyConfig(burst_seconds=20),
        agents=[_agent("alice", disk_quota_mb=1), _agent("bob", scrip=100, memory_quota_mb=256), _agent("carol")],
    )
    if tweak is not None:
        cfg = tweak(cfg)

    async def main() -> T:
        async with Node(cfg) as node:
            out = await body(node.world)
            if events is not None:
                await node.events.publish("marker")  # committed in order: every earlier event is durable
                events.extend(e.kind for e in node.events.read())
            return out

    return asyncio.run(main())


def test_code_is_invoked_confined_charged_to_the_invoker_and_paid_for(tmp_path: Path) -> None:
    events: list[str] = []

    async def body(w: World) -> None:
        await w.write_artifact(
            "alice", "adder", b"world.result(sum(world.args) + len(world.read_artifact('note')))", kind="code", price=7
        )
        await w.write_artifact("alice", "note", b"hello")
        before = {a: w.economy.ledger.balance(a, "scrip") for a in ("alice", "bob")}
        inv = await w.invoke_artifact("bob", "adder", [1, 2, 3])
        assert inv.value == 11 and inv.paid == 7
        after = {a: w.economy.ledger.balance(a, "scrip") for a in ("alice", "bob")}
        assert after == {"alice": before["alice"] + 7, "bob": before["bob"] - 7}
        assert inv.cpu_seconds > 0.005  # a confined Python really ran, and bob was charged for it
        bob = w.economy.pool.accounts.agents["bob"]
        assert bob.cpu_seconds >= inv.cpu_seconds - 1e-9

    with_world(tmp_path, body, events)
    assert events.count("artifact_written") == 2 and events.count("artifact_invoked") == 1
    with LmdbLedger(tmp_path / "data" / "ledger") as ledger:
        assert check(ledger).ok
        assert sum(r.agent == "bob" for r in ledger.usage_records()) == 1


def test_a_failed_invocation_is_charged_but_not_paid_for(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.write_artifact("alice", "broken", b"raise ValueError('nope')", kind="code", price=5)
        before = w.economy.ledger.balance("alice", "scrip")
        with pytest.raises(InvokeError) as err:
            await w.invoke_artifact("bob", "broken")
        assert err.value.code == "code_error" and "nope" in str(err.value)
        assert w.economy.ledger.balance("alice", "scrip") == before
        assert w.economy.pool.accounts.agents["bob"].cpu_seconds > 0

    with_world(tmp_path, body)


def test_code_transfers_only_up_to_what_the_invoker_authorised(tmp_path: Path) -> None:
    code = b"""
world.transfer("carol", 10)
try:
    world.transfer("carol", 10)
    world.result("second went through")
except Exception as exc:
    world.result(str(exc))
"""

    async def body(w: World) -> None:
        await w.write_artifact("alice", "spender", code, kind="code")
        carol = w.economy.ledger.balance("carol", "scrip")
        inv = await w.invoke_artifact("bob", "spender", max_transfer=15)
        assert "exceed" in inv.value and inv.transferred == 10
        assert w.economy.ledger.balance("carol", "scrip") == carol + 10
        with pytest.raises(InvokeError, match="insufficient_funds"):
            await w.invoke_artifact("bob", "spender", max_transfer=10_000)

    with_world(tmp_path, body)


ATTACKS = {
    "infinite loop": ("while True: pass", {"cpu_exceeded", "deadline_exceeded"}),
    "10 GB allocation": ("b = bytearray(10 << 30)\nworld.result(len(b))", {"memory_exceeded"}),
    "touching 10 GB": (
        "chunks = []\nwhile True:\n    c = bytearray(64 << 20)\n    c[::4096] = b'x' * (len(c) // 4096)\n"
        "    chunks.append(c)",
        {"memory_exceeded"},
    ),
    "fork bomb": (
        "import os\nwhile True:\n    os.fork()",
        {"cpu_exceeded", "deadline_exceeded", "code_error", "killed"},
    ),
    "reading the ledger": ("world.result(open(world.args['ledger'], 'rb').read(10).hex())", {"code_error"}),
    "listing the repository": ("import os\nworld.result(os.listdir(world.args['repo']))", {"code_error"}),
    "connecting to the pool socket": (
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(world.args['pool'])\nworld.result('in')",
        {"code_error"},
    ),
    "connecting to 127.0.0.1": (
        "import socket\nsocket.create_connection(('127.0.0.1', world.args['port']), timeout=2)\nworld.result('in')",
        {"code_error"},
    ),
    "signalling the supervisor": (
        "import os\nos.kill(world.args['supervisor'], 9)\nworld.result('sent')",
        {"code_error"},
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_code_is_contained_charged_and_the_pool_serves_on(tmp_path: Path, name: str) -> None:
    code, codes = ATTACKS[name]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    os.environ["AECO_TEST_SECRET"] = "hunter2"

    async def body(w: World) -> None:
        pool = w.economy.pool
        args = {
            "ledger": str(tmp_path / "data" / "ledger" / "data.mdb"),
            "repo": str(tmp_path / "data" / "artifacts.git"),
            "pool": pool.endpoint.removeprefix("ipc://"),
            "port": port,
            "supervisor": os.getpid(),
        }
        await w.write_artifact("alice", "attack", code.encode(), kind="code")
        charged_before = pool.accounts.agents.get("bob")
        with pytest.raises(InvokeError) as err:
            await w.invoke_artifact("bob", "attack", args, cpu_seconds=2, wall_seconds=5)
        assert err.value.code in codes, err.value
        assert pool.accounts.agents["bob"].cpu_seconds > (charged_before.cpu_seconds if charged_before else 0)
        # The pool and the supervisor serve on.
        await w.write_artifact("alice", "ok", b"import os\nworld.result(sorted(os.environ))", kind="code")
        inv = await w.invoke_artifact("bob", "ok")
        assert "AECO_TEST_SECRET" not in inv.value
        assert pool.failed is None

    try:
        with_world(tmp_path, body)
    finally:
        listener.close()
        del os.environ["AECO_TEST_SECRET"]
    assert Path(tmp_path / "data" / "ledger" / "data.mdb").exists()


def test_writing_outside_its_directory_does_not_reach_the_host(tmp_path: Path) -> None:
    target = Path("/tmp") / f"aeco-escape-{os.getpid()}"

    async def body(w: World) -> None:
        await w.write_artifact(
            "alice", "writer", f"open({str(target)!r}, 'w').write('x')\nworld.result('ok')".encode(), kind="code"
        )
        try:
            await w.invoke_artifact("bob", "writer")
        except InvokeError as exc:
            assert exc.code == "code_error"

    with_world(tmp_path, body)
    assert not target.exists()


def test_artifacts_respect_owners_and_quotas(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.write_artifact("alice", "mine", b"x" * 1000)
        with pytest.raises(StoreError) as err:
            await w.write_artifact("bob", "mine", b"taken over")
        assert err.value.code == "forbidden"
        assert (await w.read_artifact("bob", "mine")).content == b"x" * 1000
        with pytest.raises(StoreError) as err:  # alice's disk_quota is 1 MiB
            await w.write_artifact("alice", "big", b"y" * (1 << 20))
        assert err.value.code == "quota_exceeded"
        with pytest.raises(StoreError):
            await w.read_artifact("alice", "big")
        for bad in ("../etc/passwd", "", "x" * 200, b"\xff\xfe"):
            with pytest.raises(StoreError) as err:
                await w.read_artifact("alice", bad)
            assert err.value.code == "invalid_id"
        await w.write_artifact("alice", "secret", b"s", readable="owner")
        with pytest.raises(StoreError):
            await w.read_artifact("bob", "secret")
        assert "secret" not in {a.id for a in await w.list_artifacts("bob")}
        with pytest.raises(InvokeError, match="not_code"):
            await w.invoke_artifact("bob", "mine")
        assert not verify(w.store)

    with_world(tmp_path, body)


def test_a_worker_killed_mid_invocation_leaves_no_process_and_no_cgroup(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        pool = w.economy.pool
        await w.write_artifact("alice", "sleeper", b"import time\ntime.sleep(60)", kind="code")
        task = asyncio.create_task(w.invoke_artifact("bob", "sleeper", cpu_seconds=60, wall_seconds=60))
        for _ in range(300):
            if descendants_of_uid(65534):
                break
            await asyncio.sleep(0.02)
        busy = [x["pid"] for x in pool.status().workers if x["state"] == "busy"]
        assert len(busy) == 1 and descendants_of_uid(65534)
        os.kill(int(busy[0]), 9)
        with pytest.raises(InvokeError) as err:
            await task
        assert err.value.code == "worker_crashed"
        for _ in range(100):
            if not descendants_of_uid(65534):
                break
            await asyncio.sleep(0.05)
        assert not descendants_of_uid(65534)
        gone = [d for d in Path("/sys/fs/cgroup/cpuacct").glob(f"aeco-{os.getpid()}-*") if d.is_dir()]
        assert len(gone) <= pool.size  # only the live workers' own cgroups remain
        assert all(not list(d.glob("*/")) for d in gone)
        await w.write_artifact("alice", "ok", b"world.result(1)", kind="code")
        assert (await w.invoke_artifact("bob", "ok")).value == 1

    with_world(tmp_path, body)
