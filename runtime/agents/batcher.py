"""The think batcher: agents' thinks gathered into ``think_batch`` tasks, one per worker at a time.

Thinking is most of this runtime's CPU, and a decode step that holds the next token of 8 sequences
costs about half the CPU per token of 8 steps of one (``native.batch``). So an LLM agent's think does
not go to the pool alone: it waits here, admitted, and leaves in a batch::

    LlmBrain.think ─► admit_think (its own buckets) ─► pending ─► _form ─► Economy.run_batch ─► a worker
         ▲                                                                        │
         └──────────── its own ThinkReport, or the batch's TaskFailed ◄───────────┘

- **Lanes.** At most one batch runs per worker (``lanes``: the pool's size), so the batches in flight
  hold every worker; thinks admitted while they run wait and join the next batch.
- **When a batch leaves.** A worker is free, and either its batch is full (``think_batch``), or every
  agent expected soon has asked (``expect``: the node's agents that are acting or about to think, not
  those asleep, blocked by a bucket or paused), or the oldest pending think has waited ``wait_s``. A
  batch of one is a think alone, as before.
- **Affinity.** A worker keeps each agent's last prompt (``ThinkBatch.keys``), so an agent's next
  think evaluates only what changed — on that worker. An agent's home is the worker its last batch
  ran on: it goes there when that worker is free (``prefer``, the pool's hint), waits up to ``wait_s``
  for it while it runs one of these batches (soon free), and goes to any free worker when it has no
  home, its home is gone, or that wait ran out (evaluating its whole prompt again there, rather than
  leaving a worker idle). Agents without a home are spread evenly over the free workers.
- **Results and charges.** ``Economy.run_batch`` charges each agent its share, a usage record naming
  the batch; each agent gets its own report, or, when the batch failed, a ``TaskFailed`` with the
  batch's code, exactly as a think alone would.
- **Cancelling one agent** (its loop stopped) while it is pending takes it out of the queue; once its
  think is in a running batch, its sequence alone is stopped (``WorkerPool.stop_think``), the batch
  goes on for the others, and the agent is charged its share (the work its sequence did) when it ends.
  Pausing an agent never interrupts a think: it pauses between turns.

Thinks against a remote server (``Think.endpoint``) are not batched here: the server batches. They run
from the supervisor (``Economy.run_here``) in a thread pool of ``remote_inflight`` threads, so that many
requests are in flight without holding a worker each.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from runtime.economy.charging import Economy
from runtime.pool import TaskFailed
from runtime.protocol import Think, ThinkBatch, ThinkReport, decode_think

__all__ = ["ThinkBatcher"]

log = logging.getLogger("runtime.agents.batcher")


@dataclass(eq=False, slots=True)
class _Pending:
    """An admitted think waiting for its batch."""

    agent: str
    spec: Think
    since: float
    done: asyncio.Future[ThinkReport] = field(repr=False)
    #: Once its batch is queued: the pool's task id of the batch, and its index in it.
    sent: tuple[int, int] | None = None


def _remote_think(spec: Think) -> bytes:
    """The worker's own ``think`` handler, run in the supervisor for a remote server (imported when
    first needed: it names the local model's modules too)."""
    from workers.think import think

    return think(spec)


class ThinkBatcher:
    """Gathers LLM agents' thinks into batches (see the module docstring). One per node."""

    def __init__(
        self,
        economy: Economy,
        *,
        think_batch: int,
        lanes: int,
        wait_s: float = 1.0,
        remote_inflight: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if think_batch < 1 or lanes < 1:
            raise ValueError(f"think_batch ({think_batch}) and lanes ({lanes}) must be at least 1")
        self.economy = economy
        self.think_batch = think_batch
        self.lanes = lanes
        self.wait_s = wait_s
        self.remote_inflight = remote_inflight
        self._clock = clock
        #: The agents expected to ask for a think soon (see ``expect``).
        self._expected: Callable[[], Iterable[str]] = tuple
        self._pending: collections.deque[_Pending] = collections.deque()
        #: Worker pid -> the agents of the batch running for it (the pid the batch was sent to prefer).
        self._lanes: dict[int, list[str]] = {}
        self._running: set[asyncio.Task[None]] = set()
        #: Agent -> the pid of the worker its last batch ran on (which keeps its last prompt).
        self.home: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._former: asyncio.Task[None] | None = None
        self._remote: cf.ThreadPoolExecutor | None = None
        self._closed = False

    def expect(self, agents: Iterable[str] | Callable[[], Iterable[str]]) -> None:
        """Who may ask for a think soon: these ids, or a callable that says who now. A batch leaves as
        soon as every one of them not in a running batch has asked (else after ``wait_s``)."""
        if callable(agents):
            self._expected = agents
        else:
            ids = tuple(agents)
            self._expected = lambda: ids

    async def think(self, agent: str, spec: Think) -> ThinkReport:
        """``agent``'s think: in the next batch of a worker (local model) or a request from here (remote
        server). Raises ``TaskFailed`` as a think alone would."""
        if self._closed:
            raise TaskFailed("pool_closed", "the node is stopping: no more thinks")
        if spec.endpoint:
            if self._remote is None:
                self._remote = cf.ThreadPoolExecutor(self.remote_inflight, thread_name_prefix="aeco-remote")
            return await self.economy.run_here(agent, spec, _remote_think, self._remote)
        if self.think_batch == 1:  # each think alone, a ``think`` task as without a batcher
            return decode_think((await self.economy.run(agent, spec)).output)
        await self.economy.admit_think(agent)
        loop = asyncio.get_running_loop()
        item = _Pending(agent, spec, self._clock(), loop.create_future())
        # Looked at here, so that one whose agent stopped waiting never warns of an exception unretrieved.
        item.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append(item)
        self._kick()
        try:
            return await asyncio.shield(item.done)
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):  # not yet in a batch: it leaves the queue
                self._pending.remove(item)
            if item.sent is not None:  # in a batch: its sequence stops (once running), the others go on
                self.economy.pool.stop_think(*item.sent)
            raise

    # ------------------------------------------------------------------------- forming batches

    def _kick(self) -> None:
        if self._former is None:
            self._wake = asyncio.Event()
            self._former = asyncio.create_task(self._form_batches(), name="think-batcher")
        assert self._wake is not None
        self._wake.set()

    async def _form_batches(self) -> None:
        """Send batches whenever they may leave; sleep until a think arrives, a batch ends or a pending
        think has waited ``wait_s``."""
        assert self._wake is not None
        while not self._closed:
            self._wake.clear()
            for pid, members in self._form(self._clock()):
                self._start(pid, members)
            # Woken when the next pending think's wait runs out; once all have, only a batch ending (or a
            # new think) can change anything.
            timeout = None
            if self._pending and len(self._lanes) < self.lanes:
                now = self._clock()
                timeout = min((t for p in self._pending if (t := p.since + self.wait_s - now) > 0), default=None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _form(self, now: float) -> list[tuple[int, list[_Pending]]]:
        """The batches that may leave now, each with the worker it prefers (see the module docstring)."""
        pool = self.economy.pool
        if pool.failed:  # as a think alone fails at once
            while self._pending:
                p = self._pending.popleft()
                if not p.done.done():
                    p.done.set_exception(TaskFailed("pool_failed", pool.failed))
            return []
        live = pool.pids()
        free = [pid for pid in live if pid not in self._lanes][: self.lanes - len(self._lanes)]
        if not self._pending or not free:
            return []
        waiting = {p.agent for p in self._pending}
        thinking = {a for members in self._lanes.values() for a in members}
        everyone_in = not (set(self._expected()) - waiting - thinking)
        full = len(self._pending) >= self.think_batch * len(free)
        if not (everyone_in or full or now - self._pending[0].since >= self.wait_s):
            return []
        batches: dict[int, list[_Pending]] = {pid: [] for pid in free}
        homeless: list[_Pending] = []
        for p in self._pending:
            home = self.home.get(p.agent)
            if home in batches:
                self._join(batches[home], p)
            elif home not in self._lanes or now - p.since >= self.wait_s:  # none, gone, or waited enough
                homeless.append(p)
            # else its home runs a batch now: it waits for it (soon free)
        for p in homeless:  # each to the free worker with the smallest batch so far
            room = [pid for pid in free if self._fits(batches[pid], p)]
            if room:
                self._join(batches[min(room, key=lambda pid: len(batches[pid]))], p)
        chosen = {id(p) for members in batches.values() for p in members}
        self._pending = collections.deque(p for p in self._pending if id(p) not in chosen)
        return [(pid, members) for pid, members in batches.items() if members]

    def _fits(self, members: list[_Pending], p: _Pending) -> bool:
        """Whether ``p`` may join ``members``: room left, and the same model (a batch has one)."""
        return len(members) < self.think_batch and (not members or members[0].spec.model == p.spec.model)

    def _join(self, members: list[_Pending], p: _Pending) -> None:
        if self._fits(members, p):
            members.append(p)

    def _start(self, pid: int, members: list[_Pending]) -> None:
        self._lanes[pid] = [m.agent for m in members]
        task = asyncio.create_task(self._run(pid, members), name=f"think-batch:{pid}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, pid: int, members: list[_Pending]) -> None:
        """Run one batch and hand each agent its own result; the batch's failure fails each one's think."""
        agents = [m.agent for m in members]
        spec = ThinkBatch([m.spec for m in members], keys=agents)
        try:

            def sent(task_id: int) -> None:
                for i, m in enumerate(members):
                    m.sent = (task_id, i)

            out, report = await self.economy.run_batch(agents, spec, admitted=True, prefer=pid, sent=sent)
        except TaskFailed as exc:
            for a in agents:  # its worker dropped the prompts it kept for them (or is gone)
                self.home.pop(a, None)
            for m in members:
                if not m.done.done():
                    m.done.set_exception(TaskFailed(exc.code, exc.message, exc.usage, exc.payload))
        except asyncio.CancelledError:
            for m in members:
                m.done.cancel()
            raise
        else:
            for a in agents:
                self.home[a] = out.usage.worker_pid
            for m, r in zip(members, report.reports, strict=True):
                if not m.done.done():
                    m.done.set_result(r)
        finally:
            del self._lanes[pid]
            if self._wake is not None:
                self._wake.set()

    async def close(self) -> None:
        """Stop forming batches and wait for those running (the pool's close ends them, charged); thinks
        still pending fail with ``pool_closed``."""
        self._closed = True
        if self._former is not None:
            self._former.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._former
        while self._pending:
            p = self._pending.popleft()
            if not p.done.done():
                p.done.set_exception(TaskFailed("pool_closed", "the node stopped before this think was batched"))
        if self._running:
            await asyncio.wait(set(self._running))
        if self._remote is not None:
            self._remote.shutdown(wait=False, cancel_futures=True)
