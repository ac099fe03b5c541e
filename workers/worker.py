"""A pool worker: ``python -m workers.worker``, started by the supervisor's pool.

It arranges to die with the supervisor first (the pool has already put it in its child cgroups, if
any), then runs one task at a time from its DEALER socket (the next may already wait there: the pool's
``prefetch``, several to a frame), measuring each. Its CPU life is cut into contiguous segments —
start-up, idle (waiting, messaging), measurement, tasks — so that every CPU-second it uses is reported
under exactly one name (``runtime.protocol.Counters``).

The supervisor stops a running ``think`` or ``invoke`` with SIGUSR1 (``runtime.pool``): the handler
raises ``TaskCancelled`` in a generation (Python runs it between bytecodes, so between two calls
into llama.cpp: between tokens), and wakes the sandbox's watch loop through the signal wakeup pipe,
which then kills the confined child. Either way the task answers ``cancelled`` with its measured usage.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Literal

import msgspec
import zmq

from runtime import protocol as p
from runtime.host.tally import TaskTally
from workers import measure, tasks
from workers.measure import MemoryMeter

_PR_SET_PDEATHSIG = 1
#: How long confined code may wait for the supervisor to answer one request.
_REPLY_TIMEOUT_S = 30.0
_report_encoder = msgspec.msgpack.Encoder()


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the supervisor dies; exit now if it already has.

    The parent is checked after the death signal is armed, so a supervisor that died at any moment
    before is noticed here.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        os._exit(1)


class Worker:
    """The worker's loop and books. One instance per process."""

    def __init__(
        self, boot: p.WorkerBoot, sock: zmq.Socket[bytes], meter: MemoryMeter, tally: TaskTally | None = None
    ) -> None:

        self.boot, self.sock, self.meter = boot, sock, meter
        #: Where it counts each task before beginning it, for its pool to read should it die (None: no pool).
        self.tally = tally
        self.log = logging.getLogger(f"worker.{boot.worker_id}")
        self._rusage_cpu = measure.cpu_seconds
        #: CPU of confined processes that the kernel counted in their cgroup but that no wait4
        #: returned to this process (descendants killed with their sandbox); part of this worker's use.
        self.unreaped = 0.0
        self.startup = self.cpu()
        self.idle = self.measurement = self.task_total = 0.0
        self.done = 0
        #: Peak memory of the confined tree of the last ``Invoke`` (its own processes, not this worker's).
        self.confined_peak = 0
        self.mark = self.startup
        self.last = self.counters(self.startup)
        self.shutdown_requested = False
        #: The supervisor asked to stop the task in hand (SIGUSR1 since it began).
        self.stop_asked = False
        #: While true, SIGUSR1 raises ``TaskCancelled`` where this thread is (a generation: nothing of
        #: this worker's own books is being written meanwhile).
        self.interruptible = False
        #: Readable once SIGUSR1 arrived (the signal wakeup fd): the sandbox's watch loop polls it.
        self.stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: The thinks of the running ``think_batch`` the supervisor asked to stop (``StopThink``).
        self._stopped_thinks: set[int] = set()

    def cpu(self) -> float:
        """All CPU this worker is responsible for so far."""
        return self._rusage_cpu() + self.unreaped

    def counters(self, now: float, memory: int | None = None) -> p.Counters:
        """The books as of CPU reading ``now`` (``memory``: the current use, if just read)."""

        memory = self.meter.current() if memory is None else memory
        return p.Counters(now, self.startup, self.idle, self.measurement, self.task_total, self.done, memory)

    def send(self, msg: p.Message) -> None:
        """Send one message to the supervisor."""

        self.sock.send(p.encode(msg))

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_asked = True
        if self.interruptible:
            self.interruptible = False  # raised once, never again inside the handling of this one
            raise tasks.TaskCancelled("the generation was stopped between two tokens, as its supervisor asked")

    def _begin_task(self) -> None:
        """Forget a stop asked for an earlier task: the supervisor sends one only while a task runs,
        and sends no task to wait behind one it may stop so (see ``WorkerPool._prefetch``), so any
        signal so far was for an earlier task."""
        self.stop_asked = False
        self._stopped_thinks = set()
        with contextlib.suppress(BlockingIOError):
            while os.read(self.stop_r, 64):
                pass

    def serve(self, secret: bytes) -> None:
        """Say hello with ``secret`` (the proof that the supervisor spawned us), then answer tasks
        until told to shut down."""
        signal.signal(signal.SIGUSR1, self._on_stop_signal)
        signal.set_wakeup_fd(self._stop_w, warn_on_full_buffer=False)
        init_error = tasks.initialize(self.boot.initializer) if self.boot.initializer else ""
        self.send(
            p.Hello(
                worker_id=self.boot.worker_id,
                pid=os.getpid(),
                memory_probe=self.meter.name,
                counters=self.last,
                secret=secret,
                init_error=init_error,
            )
        )
        if init_error:  # the pool fails, as ProcessPoolExecutor's does: no task may run uninitialized
            return
        # A receive timeout rather than poll + recv: one call per frame, a heartbeat when it times out.
        self.sock.setsockopt(zmq.RCVTIMEO, int(self.boot.heartbeat_s * 1000))
        # Tasks that came several to a frame (``Tasks``), run in order before the next frame is read.
        queued: collections.deque[p.Task] = collections.deque()
        while not self.shutdown_requested:
            if queued:
                task = queued.popleft()
                self.send(self._run_counted(task))
                continue
            try:
                frame = self.sock.recv()
            except zmq.Again:
                now = self.cpu()
                self.idle += now - self.mark
                self.mark = now
                self.last = self.counters(now)
                self.send(p.Heartbeat(counters=self.last))
                continue
            msg = self._decode(frame)
            if isinstance(msg, p.Shutdown):
                break
            if isinstance(msg, p.Task):
                self.send(self._run_counted(msg))
            elif isinstance(msg, p.Tasks):
                queued.extend(msg.tasks)
            elif msg is not None and not isinstance(msg, p.StopThink):  # a stop for a batch that ended: moot
                self.log.warning("dropped unexpected %s message", type(msg).__name__)

    def _run_counted(self, task: p.Task) -> p.Result:
        """Count ``task`` begun (see ``runtime.host.tally``), then run it."""
        if self.tally is not None:
            self.tally.begin()
        return self._run(task) if task.measure else self._run_unmeasured(task)

    def _decode(self, frame: bytes) -> p.Message | None:

        try:
            return p.decode(frame)
        except p.ProtocolError as exc:
            self.log.warning("dropped frame: %s", exc)
            return None

    def _execute(self, msg: p.Task) -> tuple[bytes, str | None, Literal["", "memory_exceeded", "cancelled"]]:

        self._begin_task()
        try:
            if isinstance(msg.spec, p.Invoke):
                return self._invoke(msg), None, ""
            if isinstance(msg.spec, p.Think | p.ThinkBatch):
                from workers import think  # llama.cpp is loaded only by workers that think

                self.interruptible = True
                try:
                    if self.stop_asked:  # asked before it could be interrupted
                        raise tasks.TaskCancelled("the generation was stopped before it began, as its supervisor asked")
                    if isinstance(msg.spec, p.Think):
                        return think.think(msg.spec), None, ""
                    return think.think_batch(msg.spec, lambda: self._stops_asked(msg.id)), None, ""
                finally:
                    self.interruptible = False
            if isinstance(msg.spec, p.Embed):
                from native import embed

                return embed.embed(msg.spec), None, ""
            return tasks.run(msg.spec), None, ""
        except tasks.TaskCancelled as exc:
            return exc.payload, str(exc), "cancelled"
        except tasks.TaskError as exc:
            over = bool(msg.memory_limit) and exc.raised == "MemoryError"
            return exc.payload, str(exc), "memory_exceeded" if over else ""
        except MemoryError:
            text = f"MemoryError: the task went over its {msg.memory_limit} byte memory limit"
            return b"", text, "memory_exceeded" if msg.memory_limit else ""
        except Exception as exc:  # a handler bug must not kill the worker
            return b"", f"{type(exc).__name__}: {exc}", ""

    def _stops_asked(self, task_id: int) -> set[int]:
        """The thinks of batch ``task_id`` asked to stop so far: the ``StopThink`` frames waiting in the
        socket are read now, without waiting (a decode step asks; nothing else arrives during a batch
        but a shutdown, kept for after it)."""
        while self.sock.poll(0):
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self._decode(frame)
            if isinstance(msg, p.StopThink) and msg.task_id == task_id:
                self._stopped_thinks.add(msg.index)
            elif isinstance(msg, p.Shutdown):
                self.shutdown_requested = True  # after this task
            elif msg is not None:
                self.log.warning("dropped %s during a think batch", type(msg).__name__)
        return self._stopped_thinks

    def _run_unmeasured(self, msg: p.Task) -> p.Result:

        out, err, code = self._execute(msg)
        return p.Result(
            task_id=msg.id, ok=err is None, output=out, error=err, usage=None, counters=self.last, error_code=code
        )

    def _run(self, msg: p.Task) -> p.Result:

        c1 = self.cpu()
        self.idle += c1 - self.mark
        w0 = time.perf_counter()
        baseline = self.meter.start()
        if msg.memory_limit:
            self.meter.limit(msg.memory_limit)
        self.confined_peak = 0
        c2 = self.cpu()
        out, err, code = self._execute(msg)
        c3 = self.cpu()
        if msg.memory_limit:
            self.meter.unlimit()
        peak, current = self.meter.peak_and_current()
        # Confined code runs in processes of its own: without a cgroup around both, this worker's
        # meter does not see them, and their peak is added to what the worker held when it began.
        peak = max(peak, baseline + self.confined_peak)
        wall = time.perf_counter() - w0
        task_cpu = c3 - c2
        self.task_total += task_cpu
        self.done += 1
        self.mark = self.cpu()
        self.measurement += (c2 - c1) + (self.mark - c3)
        self.last = self.counters(self.mark, current)
        usage = p.Usage(task_cpu, peak, baseline, wall)
        return p.Result(
            task_id=msg.id, ok=err is None, output=out, error=err, usage=usage, counters=self.last, error_code=code
        )

    # ------------------------------------------------------------------------- confined code

    def _invoke(self, msg: p.Task) -> bytes:
        """Run an ``Invoke`` task's code confined; return its ``InvokeReport`` (msgpack)."""
        from workers import sandbox  # only workers that run agent code need it

        spec = msg.spec
        assert isinstance(spec, p.Invoke)
        seq = 0

        def handle(op: str, params: dict[str, object]) -> dict[str, object]:
            # The sandbox's child speaks op + params; the supervisor, typed calls.
            nonlocal seq
            seq += 1
            try:
                call = msgspec.convert({"call": op, **params}, p.WorldCall)
            except msgspec.ValidationError as exc:
                return {"ok": False, "error": f"{op}: {exc}"}
            match self._request(msg.id, seq, call):
                case p.ArtifactAnswer(content=content):
                    return {"ok": True, "value": content}
                case p.DoneAnswer():
                    return {"ok": True, "value": None}
                case p.RefusedAnswer(error=error):
                    return {"ok": False, "error": error}

        limits = sandbox.Limits(
            cpu_seconds=spec.cpu_seconds, wall_seconds=spec.wall_seconds, memory_bytes=spec.memory_bytes
        )
        children_before = self._rusage_cpu()
        res = sandbox.run_confined(
            spec.code,
            json.loads(spec.args),
            limits,
            handle,
            hide=self.boot.sandbox_hide,
            cgroup_parents=self.boot.cgroup_dirs or None,
            stop_fd=self.stop_r,
        )
        # The confined tree is the sandbox zygote's child, reaped there: its CPU (the zygote's wait4,
        # the cgroup's count where larger, and the zygote's fork of it) is not in this process's
        # RUSAGE_CHILDREN until the zygote is reaped (sandbox.shutdown): book it as ours now.
        reaped = self._rusage_cpu() - children_before
        self.unreaped += max(0.0, res.cpu_seconds - reaped)
        self.confined_peak = res.peak_memory_bytes
        if res.error_code == "cancelled":
            raise tasks.TaskCancelled(res.error)
        report = p.InvokeReport(
            ok=res.ok,
            value=res.value if res.ok else b"",  # strict JSON: checked by run_confined
            error=res.error,
            error_code=res.error_code,
            stdout=res.stdout.decode("utf-8", "replace"),
            cpu_seconds=res.cpu_seconds,
            peak_memory_bytes=res.peak_memory_bytes,
            isolation=list(res.isolation),
        )
        return _report_encoder.encode(report)

    def _request(self, task_id: int, seq: int, call: p.WorldCall) -> p.WorldAnswer:
        """Ask the supervisor (which answers as the invoker) and wait for its reply."""

        self.send(p.Request(task_id=task_id, seq=seq, call=call))
        deadline = time.monotonic() + _REPLY_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            msg = self._decode(frame)
            if isinstance(msg, p.Reply) and msg.task_id == task_id and msg.seq == seq:
                return msg.answer
            if isinstance(msg, p.Shutdown):
                self.shutdown_requested = True  # after this task
            elif msg is not None:
                self.log.warning("dropped %s while waiting for reply %d", type(msg).__name__, seq)
        return p.RefusedAnswer(error=f"no answer to `{p.kind_of(call)}` within {_REPLY_TIMEOUT_S:g} s")


def _read_keys(boot: p.WorkerBoot) -> p.WorkerKeys:
    """Read this worker's identity and secret from the pipe the supervisor left open, and close it, so
    that nothing started later (the sandbox's zygote, confined code) can inherit it. A worker started
    by hand has none: its identity is its id and pid, and no pool will give it a task."""
    if boot.keys_fd < 0:
        return p.WorkerKeys(identity=f"w{boot.worker_id}-{os.getpid()}".encode(), secret=b"")
    with os.fdopen(boot.keys_fd, "rb") as pipe:
        return msgspec.msgpack.decode(pipe.read(), type=p.WorkerKeys)


def main() -> int:
    """Run the worker loop until the supervisor says shut down (or dies)."""
    boot = msgspec.json.decode(os.environ["AECO_WORKER_BOOT"], type=p.WorkerBoot)
    keys = _read_keys(boot)
    _die_with_parent(boot.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    meter = measure.open_meter(boot.memory_cgroup)
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.IDENTITY, keys.identity)
    sock.connect(boot.endpoint)
    tally = TaskTally.attach(boot.tally_fd) if boot.tally_fd >= 0 else None
    Worker(boot, sock, meter, tally).serve(keys.secret)
    if (sandbox := sys.modules.get("workers.sandbox")) is not None:
        # Reap the sandbox's zygote: its CPU (and its outers', already booked as tasks) is then in
        # what the kernel counts for this worker when the pool reaps it.
        sandbox.shutdown()
    sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
