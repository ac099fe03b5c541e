"""A pool worker: ``python -m workers.worker``, started by the supervisor's pool.

It arranges to die with the supervisor before importing anything heavy (the pool has already put
it in its child cgroups, if any), then runs one task at a time from its DEALER socket, measuring
each. Its CPU life is cut into contiguous segments — start-up, idle (waiting, messaging),
measurement, tasks — so that every CPU-second it uses is reported under exactly one name
(``runtime.protocol.Counters``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from typing import Literal

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the supervisor dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        os._exit(1)


def main() -> int:
    """Run the worker loop until the supervisor says shut down (or dies)."""
    import msgspec

    from runtime.protocol import WorkerBoot

    boot = msgspec.json.decode(os.environ["AECO_WORKER_BOOT"], type=WorkerBoot)
    _die_with_parent(boot.parent_pid)

    import zmq

    from runtime import protocol as p
    from workers import measure, tasks

    log = logging.getLogger(f"worker.{boot.worker_id}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    meter = measure.open_meter(boot.memory_cgroup)
    cpu = measure.cpu_seconds

    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.IDENTITY, f"w{boot.worker_id}-{os.getpid()}".encode())
    sock.connect(boot.endpoint)

    startup = cpu()
    idle = measurement = task_total = 0.0
    done = 0
    mark = startup

    def counters(now: float) -> p.Counters:
        return p.Counters(now, startup, idle, measurement, task_total, done, meter.current())

    sock.send(
        p.encode(
            p.Hello(worker_id=boot.worker_id, pid=os.getpid(), memory_probe=meter.name, counters=counters(startup))
        )
    )
    # A receive timeout rather than poll + recv: one call per frame, a heartbeat when it times out.
    sock.setsockopt(zmq.RCVTIMEO, int(boot.heartbeat_s * 1000))
    last = counters(startup)
    while True:
        try:
            frame = sock.recv()
        except zmq.Again:
            now = cpu()
            idle += now - mark
            mark = now
            last = counters(now)
            sock.send(p.encode(p.Heartbeat(counters=last)))
            continue
        try:
            msg = p.decode(frame)
        except p.ProtocolError as exc:
            log.warning("dropped frame: %s", exc)
            continue
        if isinstance(msg, p.Shutdown):
            break
        if not isinstance(msg, p.Task):
            log.warning("dropped unexpected %s message", type(msg).__name__)
            continue
        if not msg.measure:
            try:
                out, err = tasks.run(msg.spec), None
            except Exception as exc:
                out, err = getattr(exc, "payload", b""), f"{type(exc).__name__}: {exc}"
            sock.send(
                p.encode(p.Result(task_id=msg.id, ok=err is None, output=out, error=err, usage=None, counters=last))
            )
            continue

        c1 = cpu()
        idle += c1 - mark
        w0 = time.perf_counter()
        baseline = meter.start()
        if msg.memory_limit:
            meter.limit(msg.memory_limit)
        code: Literal["", "memory_exceeded"] = ""
        c2 = cpu()
        try:
            out, err = tasks.run(msg.spec), None
        except tasks.TaskError as exc:
            out, err = exc.payload, str(exc)
            code = "memory_exceeded" if msg.memory_limit and exc.raised == "MemoryError" else ""
        except MemoryError:
            out, err = b"", f"MemoryError: the task went over its {msg.memory_limit} byte memory limit"
            code = "memory_exceeded" if msg.memory_limit else ""
        except Exception as exc:  # a handler bug must not kill the worker
            out, err = b"", f"{type(exc).__name__}: {exc}"
        c3 = cpu()
        if msg.memory_limit:
            meter.unlimit()
        peak = meter.peak()
        wall = time.perf_counter() - w0
        task_cpu = c3 - c2
        task_total += task_cpu
        done += 1
        mark = cpu()
        measurement += (c2 - c1) + (mark - c3)
        last = counters(mark)
        usage = p.Usage(task_cpu, peak, baseline, wall)
        result = p.Result(
            task_id=msg.id, ok=err is None, output=out, error=err, usage=usage, counters=last, error_code=code
        )
        sock.send(p.encode(result))
    sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
