"""Malformed and foreign frames are dropped; neither the supervisor nor a worker falls over."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile

import msgspec
import zmq

from runtime import protocol as p
from runtime.pool import WorkerPool
from tests.integration.conftest import with_pool


def _garbage(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.randbytes(rng.randint(0, 200))]
    if kind == 1:
        return [rng.randbytes(8) for _ in range(rng.randint(2, 5))]
    if kind == 2:
        return [msgspec.msgpack.encode({"type": "result", "v": 1, "task_id": "nope"})]
    if kind == 3:
        return [msgspec.msgpack.encode({"type": "hello", "v": 99})]
    if kind == 4:  # well-formed, but from a peer that is not one of the pool's workers
        c = p.Counters(0, 0, 0, 0, 0, 0, 0)
        return [p.encode(p.Result(task_id=1, ok=True, output=b"", error=None, usage=None, counters=c))]
    return [b""]


def test_a_flood_of_malformed_frames_leaves_the_pool_serving() -> None:
    async def body(pool: WorkerPool) -> None:
        rng = random.Random(1)
        ctx = zmq.Context()
        peers = [ctx.socket(zmq.DEALER) for _ in range(3)]
        for s in peers:
            s.connect(pool.endpoint)
        for i in range(3000):
            peers[i % 3].send_multipart(_garbage(rng))
            if i % 500 == 0:  # tasks keep flowing during the flood
                assert (await pool.run(p.Echo(data=str(i)))).output == str(i).encode()
        # Raw bytes on the socket file: not even a ZMTP greeting.
        path = pool.endpoint.removeprefix("ipc://")
        for _ in range(20):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(path)
                raw.sendall(rng.randbytes(4096))
        for s in peers:
            s.close(0)
        ctx.term()
        outs = await asyncio.gather(*(pool.run(p.Burn(ms=5)) for _ in range(20)))
        assert len(outs) == 20
        # Frames of peers that are not its workers are refused whatever they hold; the others dropped.
        assert pool.refused_frames >= 1500 and pool.malformed_frames + pool.refused_frames >= 2500
        assert pool.status().crashed == 0 and pool.failed is None

    with_pool(body, size=2)


def test_a_worker_drops_bad_frames_and_keeps_serving() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    run_dir = tempfile.mkdtemp(prefix="aeco-test-")
    endpoint = f"ipc://{run_dir}/w.sock"
    router.bind(endpoint)
    boot = p.WorkerBoot(worker_id=1, endpoint=endpoint, parent_pid=os.getpid(), heartbeat_s=5.0)
    env = dict(
        os.environ,
        AECO_WORKER_BOOT=msgspec.json.encode(boot).decode(),
        PYTHONPATH=os.pathsep.join(x for x in sys.path if x),
    )
    proc = subprocess.Popen([sys.executable, "-m", "workers.worker"], env=env, stderr=subprocess.PIPE)
    try:
        assert router.poll(20_000), "worker did not say hello"
        ident, hello = router.recv_multipart()
        assert isinstance(p.decode(hello), p.Hello)
        for bad in [
            b"",
            b"\xff" * 10,
            msgspec.msgpack.encode([1, 2, 3]),
            p.encode(p.Heartbeat(counters=p.Counters(0, 0, 0, 0, 0, 0, 0))),
        ]:
            router.send_multipart([ident, bad])
        router.send_multipart([ident, p.encode(p.Task(id=7, spec=p.Echo(data="fine")))])
        assert router.poll(10_000)
        _, frame = router.recv_multipart()
        res = p.decode(frame)
        assert isinstance(res, p.Result) and res.task_id == 7 and res.output == b"fine"
        router.send_multipart([ident, p.encode(p.Shutdown())])
        assert proc.wait(10) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert err.count("dropped") == 4, err
    finally:
        proc.kill()
        proc.wait()
        router.close(0)
        ctx.term()
