"""Only the workers a pool spawned are heard, and what they report cannot be forged into a charge.

Real processes throughout: fake peers are ZeroMQ DEALERs of this test process; forging workers are
real ``workers.worker`` processes (with the secret the pool handed them through the real pipe) whose
``Result`` lies about its usage (``tests/integration/forging_worker.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import msgspec
import pytest
import zmq

from native.tiny_model import write_tiny_model
from runtime import protocol as p
from runtime.config import PoolConfig
from runtime.economy.buckets import Buckets, Estimator
from runtime.economy.charging import Economy
from runtime.economy.ledger import OpenAccount
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.host.tally import TaskTally
from runtime.pool import TaskFailed, WorkerPool
from runtime.pool.accounting import proc_tree_cpu_seconds
from runtime.pool.inflight import CRASH_CODE, Finished, InflightLog, Spoiled
from runtime.pool.wire import hand_keys
from tests.crash import finished_task, leave_in_flight
from tests.integration.conftest import wait_until, with_pool
from tests.integration.test_restart import CONFIG, _start

C0 = p.Counters(0, 0, 0, 0, 0, 0, 0)


def _forger(field: str, value: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.forging_worker", field, value]


def test_a_peer_with_a_guessed_identity_gets_no_task_and_charges_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def body(pool: WorkerPool) -> None:
        (victim,) = pool.pids()
        ctx = zmq.Context()
        # The old names of the next worker (`w<n>-<pid>` for the pids that come next), and a random one.
        guesses = [f"w2-{pid}".encode() for pid in range(victim + 1, victim + 50)] + [os.urandom(16)]
        fakes = []
        for ident in guesses:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(pool.endpoint)
            fakes.append(s)
        for i, s in enumerate(fakes):
            pid = victim + 1 + i
            s.send(p.encode(p.Hello(worker_id=2, pid=pid, memory_probe="off", counters=C0)))  # no secret
            s.send(p.encode(p.Hello(worker_id=2, pid=pid, memory_probe="off", counters=C0, secret=os.urandom(32))))
            s.send(p.encode(p.Heartbeat(counters=C0)))
        await wait_until(lambda: pool.refused_frames >= 3 * len(fakes))
        # The replacement of a worker that dies is the slot the old names used to take.
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: len(pool.pids()) == 1 and pool.pids() != [victim] and pool.status().idle == 1)
        outs = [await pool.run(p.Burn(ms=5), agent="honest") for _ in range(5)]
        assert {o.usage.worker_pid for o in outs} == set(pool.pids())
        for s in fakes:  # no frame of any kind reached a fake peer, let alone a task
            assert not s.poll(0)
        # Nothing was charged but the honest tasks; the fake peers are not workers anywhere.
        assert set(pool.accounts.agents) == {"honest"} and pool.accounts.agents["honest"].tasks == 5
        assert all(w["pid"] != 0 and w["pid"] in pool.pids() for w in pool.status().workers)
        assert pool.refused_frames >= 3 * len(fakes)
        for s in fakes:
            s.close(0)
        ctx.term()

    with caplog.at_level(logging.WARNING, logger="runtime.pool"):
        with_pool(body, size=1, restart_backoff_s=0.05)
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused peer ")]
    assert len(refused) == 50  # each fake peer logged once, however many frames it sent


def test_a_worker_reads_its_keys_from_the_pipe_and_leaves_no_trace_of_them() -> None:
    """Started by hand (this test is its supervisor): its hello proves the secret, and neither its
    argv, its environment, its open files nor those of the processes it starts hold the keys. Its tally
    of tasks begun (shared memory) counts the task it ran, and only the worker maps it: no process it
    starts (the sandbox's zygote, confined code) can reach it, nor an open file of it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    run_dir = tempfile.mkdtemp(prefix="aeco-test-")
    endpoint = f"ipc://{run_dir}/w.sock"
    router.bind(endpoint)
    keys_fd, keys = hand_keys(1)
    pipe = f"pipe:[{os.fstat(keys_fd).st_ino}]"
    tally = TaskTally()
    tally_fd = tally.handed_fd
    boot = p.WorkerBoot(
        worker_id=1, endpoint=endpoint, parent_pid=os.getpid(), heartbeat_s=5.0, keys_fd=keys_fd, tally_fd=tally_fd
    )
    env = dict(
        os.environ,
        AECO_WORKER_BOOT=msgspec.json.encode(boot).decode(),
        PYTHONPATH=os.pathsep.join(x for x in sys.path if x),
    )
    proc = subprocess.Popen([sys.executable, "-m", "workers.worker"], env=env, pass_fds=(keys_fd, tally_fd))
    os.close(keys_fd)
    tally.close_fd()
    try:
        assert router.poll(20_000), "worker did not say hello"
        ident, frame = router.recv_multipart()
        hello = p.decode(frame)
        assert ident == keys.identity and isinstance(hello, p.Hello) and hello.secret == keys.secret
        code = (
            "import os\nlinks = []\nfor f in os.listdir('/proc/self/fd'):\n"
            "    try:\n        links.append(os.readlink(f'/proc/self/fd/{f}'))\n"
            "    except OSError:\n        pass  # the listing's own descriptor, closed since\n"
            "maps = open('/proc/self/maps').read() if os.path.exists('/proc/self/maps') else ''\n"
            "world.result([links, 'aeco-tally' in maps])"
        )
        router.send_multipart([ident, p.encode(p.Task(id=1, spec=p.Invoke(code=code)))])
        assert router.poll(30_000)
        res = p.decode(router.recv_multipart()[1])
        assert isinstance(res, p.Result) and res.ok, res
        report = p.decode_invoke(res.output)
        assert report.ok, report.error  # the confined code listed its open files: not the pipe
        links, tally_mapped = msgspec.json.decode(report.value)
        assert links and pipe not in links and not any("aeco-tally" in link for link in links), links
        assert tally_mapped is False
        assert tally.read() == 1  # the worker counted the task before it began it
        family = [proc.pid, *_descendants(proc.pid)]
        assert len(family) >= 2  # the sandbox's zygote lives on
        for pid in family:
            fds = [os.readlink(f"/proc/{pid}/fd/{f}") for f in os.listdir(f"/proc/{pid}/fd")]
            assert pipe not in fds, (pid, fds)
            # The worker's alone (its mapping keeps a close-on-exec file open; nothing it starts has one).
            assert any("aeco-tally" in fd for fd in fds) == (pid == proc.pid), (pid, fds)
            assert ("aeco-tally" in Path(f"/proc/{pid}/maps").read_text()) == (pid == proc.pid), pid
            for name in ("environ", "cmdline"):
                raw = Path(f"/proc/{pid}/{name}").read_bytes()
                assert keys.secret not in raw and keys.secret.hex().encode() not in raw
                assert keys.identity not in raw
        router.send_multipart([ident, p.encode(p.Shutdown())])
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        tally.close()
        router.close(0)
        ctx.term()


def _descendants(pid: int) -> list[int]:
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, par in parents.items() if par == parent]
        out += kids
        todo += kids
    return out


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu_seconds", "1e12"),
        ("cpu_seconds", "-1"),
        ("cpu_seconds", "nan"),
        ("cpu_seconds", "inf"),
        ("wall_seconds", "nan"),
        ("peak_memory_bytes", "-1"),
        ("peak_memory_bytes", str(10**15)),
        ("idle", "nan"),
        ("usage", "none"),
    ],
)
def test_a_forged_report_is_refused_and_the_task_charged_from_the_kernel(field: str, value: str) -> None:
    async def main(tmp: Path) -> None:
        inflight = InflightLog(tmp / "inflight")
        cfg = PoolConfig(restart_backoff_s=0.05)
        async with WorkerPool(cfg, size=1, inflight=inflight, worker_command=_forger(field, value)) as pool:
            (liar,) = pool.pids()
            with pytest.raises(TaskFailed) as info:
                await pool.run(p.Burn(ms=30), agent="victim", track="t-1")
            err = info.value
            assert err.code == "bad_report", err
            assert field in str(err) or "no usage" in str(err) or "counters" in str(err)
            # Charged what the kernel saw the liar's process use, not what it said.
            assert err.usage is not None and math.isfinite(err.usage.cpu_seconds)
            assert 0.02 <= err.usage.cpu_seconds < 1.0, err.usage
            assert err.usage.task_memory_bytes < 1 << 30 and err.usage.wall_seconds < 60
            totals = pool.accounts.agents["victim"]  # what the live table and /metrics show
            assert totals.cpu_seconds == err.usage.cpu_seconds and totals.failed == 1
            assert pool.refused_reports == 1
            # The liar is gone; its replacement (a liar too, started again) is another process.
            assert liar not in pool.pids()
            await wait_until(lambda: len(pool.pids()) == 1)
        inflight.close()  # writes what was held back: the record of t-1, finished
        log = InflightLog(tmp / "inflight", readonly=True)
        try:
            (rec,), spoiled = log.scan()
        finally:
            log.close()
        assert spoiled == [] and rec.finished is not None
        assert rec.finished.cpu_seconds == err.usage.cpu_seconds

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))


@pytest.mark.parametrize("value", ["1e12", "-1", "nan", "inf"])
def test_a_forged_report_reaches_the_ledger_only_as_the_kernels_count(value: str, tmp_path: Path) -> None:
    """Through the economy: one usage record (``bad_report``) with what the kernel counted, a finite
    bucket level still high enough to admit the agent's next task at once, books that check."""
    ledger = LmdbLedger(tmp_path / "ledger")
    # A memory_quota as every agent's account is opened with: a task of an agent without one is refused.
    ledger.apply(OpenAccount(id="open:alice", account="alice", grants={"cpu_rate": 1000, "memory_quota": 256 << 20}))
    buckets = Buckets()
    buckets.add("alice", "cpu", 1.0, 2.0)

    async def main() -> None:
        inflight = InflightLog(tmp_path / "inflight")
        pool = WorkerPool(
            PoolConfig(restart_backoff_s=0.05), size=1, inflight=inflight, worker_command=_forger("cpu_seconds", value)
        )
        async with pool:
            eco = Economy(pool, ledger, buckets, Estimator(0.01))
            for _ in range(2):  # the second on the liar's replacement: the agent was not blocked
                with pytest.raises(TaskFailed, match="bad_report"):
                    await asyncio.wait_for(eco.run("alice", p.Burn(ms=30)), 30)
        inflight.close()

    try:
        asyncio.run(main())
        records = list(ledger.usage_records())
        assert len(records) == 2 and {r.error for r in records} == {"bad_report"}
        assert all(0.02 <= r.cpu_seconds < 1.0 for r in records), records
        level = ledger.buckets("alice")["cpu"].level
        assert math.isfinite(level) and 0.0 < level <= 2.0 - sum(r.cpu_seconds for r in records) + 0.1
        assert check(ledger).ok
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("completion_tokens", "1e12"),
        ("prompt_tokens", "1e9"),
        ("cost_usd", "inf"),
        ("cost_usd", "nan"),
        ("cost_usd", "5"),
    ],
)
def test_a_think_that_claims_impossible_tokens_or_cost_is_refused(field: str, value: str, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny.gguf")
    spec = p.Think(system="s", prompt="hi", max_tokens=4, model=str(model), price_completion_per_1k=1.0)

    async def main() -> None:
        async with WorkerPool(PoolConfig(), size=1, worker_command=_forger(field, value)) as pool:
            with pytest.raises(TaskFailed) as info:
                await pool.run(spec, agent="victim")
            assert info.value.code == "bad_report" and field.split("_")[0] in str(info.value), info.value
            assert pool.refused_reports == 1

    asyncio.run(main())


def test_an_honest_think_is_not_refused(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny.gguf")

    async def body(pool: WorkerPool) -> None:
        for max_tokens in (1, 2, 3, 4, 8, 32):
            spec = p.Think(system="s", prompt="hi", max_tokens=max_tokens, model=str(model), seed=max_tokens)
            report = p.decode_think((await pool.run(spec)).output)
            assert report.completion_tokens >= 1
        assert pool.refused_reports == 0

    with_pool(body, size=1)


@pytest.mark.parametrize("cgroups", ["auto", "off"], ids=["cgroups", "proc"])
def test_a_report_of_more_cpu_than_the_kernel_saw_is_cut_to_the_kernels_count(cgroups: Literal["auto", "off"]) -> None:
    # 0.25 CPU-s in 300 ms of wall time is possible on this host, so not refused; but the worker slept.
    command = _forger("cpu_seconds", "0.25")

    async def main() -> None:
        async with WorkerPool(PoolConfig(cgroups=cgroups), size=1, worker_command=command) as pool:
            out = await pool.run(p.Sleep(ms=300), agent="victim")
            assert out.usage.cpu_seconds < 0.05, out.usage
            assert pool.capped_reports == 1 and pool.refused_reports == 0
            assert pool.accounts.agents["victim"].cpu_seconds == out.usage.cpu_seconds

    asyncio.run(main())


@pytest.mark.parametrize("cgroups", ["auto", "off"], ids=["cgroups", "proc"])
def test_honest_reports_are_not_cut(cgroups: str) -> None:
    """Burns, threads and confined code (whose processes the sandbox's zygote reaps, not the worker)
    are charged what the worker measured: the kernel's count never falls below it."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\nworld.result(1)"

    async def body(pool: WorkerPool) -> None:
        outs = [
            await pool.run(p.Burn(ms=100)),
            await pool.run(p.Burn(ms=50, threads=2)),
            await pool.run(p.Invoke(code=spin)),
            await pool.run(p.Invoke(code=spin)),
        ]
        assert pool.capped_reports == 0 and pool.refused_reports == 0
        assert outs[0].usage.cpu_seconds >= 0.1 and outs[1].usage.cpu_seconds >= 0.1
        assert all(o.usage.cpu_seconds >= 0.2 for o in outs[2:])

    with_pool(body, size=1, cgroups=cgroups)


def test_a_node_starts_past_forged_in_flight_records_and_charges_the_good_one_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(CONFIG.format(data=data, cgroups="off", think=20, prefetch=0))
    good = finished_task("dead-run-1", "think", 0.125)
    forged = {
        b"dead-run-2": msgspec.structs.replace(good, task_id="dead-run-2", finished=Finished(math.nan, 0, 0, 0.5)),
        b"dead-run-3": msgspec.structs.replace(good, task_id="dead-run-3", finished=Finished(-5.0, 0, 0, 0.5)),
        b"dead-run-4": msgspec.structs.replace(good, task_id="dead-run-4", finished=None, sampled_cpu=math.inf),
        b"dead-run-5": msgspec.structs.replace(good, task_id="dead-run-5", finished=Finished(1e300, 0, 0, 0.5)),
    }
    leave_in_flight(data, [good, *forged.values()], raw={b"dead-run-6": b"\xc1 not msgpack"})

    first = _start("--config", str(cfg), "--duration", "2", "--no-live")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    aside = [line for line in out.splitlines() if line.startswith("set aside in-flight record ")]
    assert len(aside) == 5, out
    for key in [*forged, b"dead-run-6"]:
        assert sum(repr(key) in line for line in aside) == 1, (key, aside)
    assert "recovered task dead-run-1 " in out and "charged 0.125 CPU-s" in out
    kept = [msgspec.json.decode(f.read_bytes(), type=Spoiled) for f in (data / "run" / "inflight.quarantine").iterdir()]
    assert sorted(k.key for k in kept) == sorted([*forged, b"dead-run-6"])
    assert {k.key: k.raw for k in kept}[b"dead-run-6"] == b"\xc1 not msgpack"  # kept as it was, for the operator
    with LmdbLedger(data / "ledger") as ledger:
        report = check(ledger)
        assert report.ok, report.problems
        u = ledger.usage("dead-run-1")
        assert u is not None and u.cpu_seconds == 0.125 and u.error == CRASH_CODE
        for key in [*forged, b"dead-run-6"]:
            assert ledger.usage(key.decode()) is None
        levels = [lvl.level for a in ("alpha", "beta", "gamma") for lvl in ledger.buckets(a).values()]
        assert all(math.isfinite(x) for x in levels)
        charged = Counter(r.task_id for r in ledger.usage_records())
    assert charged["dead-run-1"] == 1

    again = _start("--config", str(cfg), "--duration", "1", "--no-live")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "set aside" not in out and "recovered task" not in out, out
    with LmdbLedger(data / "ledger") as ledger:
        assert Counter(r.task_id for r in ledger.usage_records())["dead-run-1"] == 1


def test_the_process_tree_counts_children_that_are_not_reaped_yet() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    before = proc_tree_cpu_seconds(os.getpid())
    assert before is not None
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        end = time.monotonic() + 20
        while True:  # until the child has spun its 0.3 s (it then sleeps, not yet reaped)
            now = proc_tree_cpu_seconds(os.getpid())
            assert now is not None and now[1] >= before[1] + 1
            if now[0] - before[0] >= 0.3 or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert now[0] - before[0] >= 0.3
    finally:
        child.kill()
        child.wait()
    assert proc_tree_cpu_seconds(2**22 + 12345) is None  # no such process
