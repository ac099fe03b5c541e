"""Charging every task: ``Economy.run`` is the one path by which an agent's task reaches the pool.

``Economy.run`` is the one path by which an agent's task reaches the pool: wait for the bucket to
admit the estimate, run, then charge the measured cost — the usage record and the new bucket levels
in one ledger operation keyed by the task id, so a replay never charges twice. The supervisor's own
CPU spent for the agent since its last charge (``runtime.economy.metering``) rides in the same
operation; what waits too long for a task is charged on its own by ``flush_supervisor``.

``Economy.run_batch`` runs several agents' thinks as one ``think_batch`` task: each agent is admitted
by its own buckets first; the batch's measured CPU, occupancy and memory are split among them by the
work each sequence caused (``runtime.economy.split``), exactly, and each agent's usage record names
the batch. ``Economy.admit_think`` admits one agent's think ahead of a batch formed later
(``runtime.agents.batcher``).

``Economy.run_here`` runs a think against a remote server from the supervisor (a thread of a bounded
executor: a worker waiting on a socket is not thinking): charged the tokens and dollars the server
reports and, as supervisor CPU attributed to the agent, what the request cost here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import contextvars
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec

from runtime.economy.buckets import Buckets, BucketState, Estimator
from runtime.economy.dollars import DollarCap, worst_case_microusd
from runtime.economy.ledger import Asset, Ledger, LedgerError, Receipt, RecordUsage, SetBuckets, Transfer
from runtime.economy.metering import AgentMeter
from runtime.economy.rights import RATE_RIGHTS
from runtime.economy.split import split_exact, weights
from runtime.economy.thinking import ThinkFigures
from runtime.pool import Outcome, Serve, TaskFailed, WorkerPool
from runtime.pool.accounting import TaskUsage
from runtime.protocol import (
    Invoke,
    SeqWork,
    TaskSpec,
    Think,
    ThinkBatch,
    ThinkBatchReport,
    ThinkReport,
    decode_think,
    decode_think_batch,
    kind_of,
)

log = logging.getLogger("runtime.economy.charging")

T = TypeVar("T")


def charge(
    buckets: Buckets,
    agent: str,
    kind: str,
    task_id: str,
    usage: TaskUsage,
    ok: bool,
    llm_tokens: int = 0,
    llm_cost_microusd: int = 0,
    error: str = "",
    supervisor_cpu_seconds: float = 0.0,
    batch: str = "",
) -> RecordUsage:
    """Charge a finished task (and the supervisor's CPU spent for the agent since its last charge) to
    its agent's buckets; return the one ledger operation that records it.

    The operation carries the bucket levels after the charge and is keyed by the task id: applying
    it again (a retry after a crash) changes nothing, and a restart restores exactly those levels.
    """
    levels: dict[str, BucketState] = {}
    if agent in buckets:  # else an agent no longer configured (a recovery): its account pays, no bucket
        levels["cpu"] = buckets.charge(agent, "cpu", usage.charged_seconds + supervisor_cpu_seconds)
        if llm_tokens:
            levels["llm_tokens"] = buckets.charge(agent, "llm_tokens", float(llm_tokens))
    return RecordUsage(
        id=f"usage:{task_id}",
        task_id=task_id,
        agent=agent,
        kind=kind,
        ok=ok,
        error=error,
        cpu_seconds=usage.cpu_seconds,
        occupancy_seconds=usage.occupancy_seconds,
        memory_bytes=usage.task_memory_bytes,
        llm_tokens=llm_tokens,
        llm_cost_microusd=llm_cost_microusd,
        wall_seconds=usage.wall_seconds,
        buckets=levels,
        supervisor_cpu_seconds=supervisor_cpu_seconds,
        batch=batch,
    )


def _micro(seconds: float) -> int:
    return round(seconds * 1_000_000)


def split_usage(usage: TaskUsage, report: ThinkBatchReport) -> list[TaskUsage]:
    """A ``think_batch``'s measured usage split among its sequences by the work each caused
    (``runtime.economy.split``): CPU and occupancy in integer microseconds, the memory the batch added
    in bytes, each summing exactly to the batch's; wall time and the worker are everyone's."""
    w = weights(report.work)
    cpu = split_exact(_micro(usage.cpu_seconds), w)
    occupancy = split_exact(_micro(usage.occupancy_seconds), w)
    memory = split_exact(usage.task_memory_bytes, w)
    return [
        TaskUsage(
            cpu_seconds=cpu[i] / 1_000_000,
            peak_memory_bytes=usage.baseline_memory_bytes + memory[i],
            baseline_memory_bytes=usage.baseline_memory_bytes,
            wall_seconds=usage.wall_seconds,
            worker_pid=usage.worker_pid,
            memory_probe=usage.memory_probe,
            attempts=usage.attempts,
            occupancy_seconds=occupancy[i] / 1_000_000,
        )
        for i in range(len(w))
    ]


def _tokens(spec: TaskSpec | None, output: bytes) -> tuple[int, int]:
    """Prompt + completion tokens a ``think`` task reported (the model's own counts), and what they
    cost in micro-dollars (paid servers only)."""
    if not isinstance(spec, Think) or not output:
        return 0, 0
    report = decode_think(output)
    return report.tokens, round(report.cost_usd * 1e6)


def _spent(spec: TaskSpec, exc: TaskFailed) -> tuple[int, int]:
    """The tokens of a failed task: a generation stopped by a cancel reports what it spent."""
    return _tokens(spec, exc.payload) if exc.code == "cancelled" else (0, 0)


def _batch_spent(spec: ThinkBatch, exc: TaskFailed) -> ThinkBatchReport:
    """What a failed batch's sequences spent: a cancelled batch reports it; otherwise nothing is
    known per sequence, and the batch is split equally (all weights zero)."""
    if exc.code == "cancelled" and exc.payload:
        return decode_think_batch(exc.payload)
    return ThinkBatchReport([], [SeqWork(own_tokens=0) for _ in spec.thinks])


#: What the charges of the current paid think cost (micro-dollars), for ``Economy.run`` to settle its
#: reservation with: set by ``run`` in its own task, and taken from there when the task is dispatched
#: (its charge is made by the pool's callback, outside that task), so no other task's charge lands in it.
_paid: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("paid", default=None)


class _Charged:
    """Where a task's charge lands (``Economy._charge_ended``, from the pool's callback): the caller's
    future (which the caller may cancel: the charge goes on), and the future of a cancelled caller that
    waits for the charge to land before it goes."""

    __slots__ = ("caller", "landed", "paid", "waiting")

    def __init__(self, caller: asyncio.Future[Outcome], paid: list[int] | None) -> None:
        self.caller = caller
        self.paid = paid
        self.landed = False
        self.waiting: asyncio.Future[None] | None = None

    def land(self, out: Outcome | None, exc: BaseException | None) -> None:
        """The charge is durable (or refused, or there was none): the caller gets ``out`` or ``exc``."""
        self.landed = True
        if not self.caller.done():
            if exc is not None:
                self.caller.set_exception(exc)
            else:
                assert out is not None
                self.caller.set_result(out)
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)


class Economy:
    """Charges every task of every agent: admission on an estimate, charge on the measurement."""

    def __init__(
        self,
        pool: WorkerPool,
        ledger: Ledger,
        buckets: Buckets,
        estimator: Estimator,
        node: str = "",
        meter: AgentMeter | None = None,
    ) -> None:
        self.pool, self.ledger, self.buckets, self.estimator = pool, ledger, buckets, estimator
        #: The supervisor's CPU per agent, charged with the agent's tasks (off: ``AgentMeter(enabled=False)``).
        self.meter = meter if meter is not None else AgentMeter()
        if self.meter.enabled:  # answering confined code's world calls (reading, encoding, sending) included
            pool.for_agent = self.meter.run
        #: Tokens an agent's next think is expected to use (prompt + completion).
        self.token_estimator = Estimator(default=256.0)
        #: LLM tokens charged per agent in this run (the ledger's usage records hold them durably).
        self.tokens: dict[str, int] = {}
        #: What paid models charged each agent in this run, in micro-dollars, counted when the charge is
        #: durable (the usage records hold it; the ledger burns it from ``llm_budget`` up to what is left).
        self.spent_microusd: dict[str, int] = {}
        #: Task ids are ``<run>-<n>``: unique across restarts without asking the ledger; a node's runs
        #: carry its name (``n1-50.<hex>``), so ids are unique across nodes and tell where a task ran.
        self.run_id = f"{node}.{uuid.uuid4().hex[:12]}" if node else uuid.uuid4().hex[:12]
        self._n = itertools.count(1)
        #: The run's dollar cap on paid models (``budget.max_usd``), when there is one.
        self.dollars: DollarCap | None = None
        #: Per agent: the memory limits of its tasks admitted and not yet ended (limit -> how many), the
        #: bytes of its ``memory_quota`` that trades in progress are giving away, and a lock held while a
        #: task takes its limit or a trade checks and reserves what it gives.
        self._memory_held: dict[str, collections.Counter[int]] = {}
        self._memory_leaving: dict[str, int] = {}
        self._memory_locks: dict[str, asyncio.Lock] = {}
        #: Batches, thinks at once, prefix reuse and remote requests in flight (status and metrics).
        self.thinking = ThinkFigures()

    def _memory_lock(self, agent: str) -> asyncio.Lock:
        lock = self._memory_locks.get(agent)
        if lock is None:
            lock = self._memory_locks[agent] = asyncio.Lock()
        return lock

    async def memory_available(self, agent: str, *, fresh: bool = False) -> int:
        """``agent``'s ``memory_quota`` as the ledger holds it now (``fresh``: read past any cache), less
        what trades in progress are giving away: the most memory one of its tasks may be given."""
        quota = await self.ledger.balance_async(agent, "memory_quota", fresh=fresh)
        return quota - self._memory_leaving.get(agent, 0)

    def memory_in_use(self, agent: str) -> int:
        """The bytes of ``agent``'s ``memory_quota`` in use: the largest memory limit one of its tasks was
        given that has not ended (queued or running; each task may use up to its limit until it ends)."""
        held = self._memory_held.get(agent)
        return max(held) if held else 0

    @contextlib.asynccontextmanager
    async def memory_kept(self, agent: str, giving: int) -> AsyncIterator[None]:
        """Around a trade that moves ``giving`` bytes of ``agent``'s ``memory_quota`` away: refused
        (``quota_exceeded``) when that leaves less than ``memory_in_use`` (other trades in progress
        counted as gone), else reserved until the trade is done, so that a task taking its limit
        meanwhile takes it from the quota less what is leaving (none is given memory a trade is giving
        away) — without waiting for the trade's durable commit, as it would behind a lock held that long."""
        async with self._memory_lock(agent):
            quota = await self.memory_available(agent, fresh=True)
            used = self.memory_in_use(agent)
            if quota - giving < used:
                raise LedgerError(
                    "quota_exceeded",
                    f"`{agent}` has a task running with {used} bytes of its {quota} of memory_quota; it can give "
                    f"away at most {max(quota - used, 0)}, not {giving} (trade it when its tasks have ended)",
                )
            self._memory_leaving[agent] = self._memory_leaving.get(agent, 0) + giving
        try:
            yield
        finally:
            # Once the trade is durable the ledger's balance says it (until then, counted twice: stricter).
            left = self._memory_leaving[agent] - giving
            if left:
                self._memory_leaving[agent] = left
            else:
                del self._memory_leaving[agent]

    async def run(
        self, agent: str, spec: TaskSpec, *, timeout_s: float | None = None, serve: Serve | None = None
    ) -> Outcome:
        """Run one task for ``agent`` once its CPU bucket admits it, and charge what it used.

        Raises ``TaskFailed`` (after charging) when the task failed. If the caller is cancelled while
        the task runs, the task is stopped (``WorkerPool.cancel``) and what it used is recorded (as
        ``cancelled``, unless it finished first) before the cancellation propagates. A think on a paid
        model first reserves its worst case under the run's dollar cap (``RunBudgetSpent`` when it does
        not fit), and settles it with what the charge recorded.
        """
        return await self._capped(agent, spec, lambda: self._run(agent, spec, timeout_s, serve))

    async def _capped(self, agent: str, spec: TaskSpec, run: Callable[[], Awaitable[T]]) -> T:
        """``run()``; for a think on a paid model, inside a reservation of its worst case under the run's
        dollar cap (``RunBudgetSpent`` when it does not fit), settled with what its charges recorded."""
        cap = self.dollars
        if cap is None or not isinstance(spec, Think) or not (spec.price_prompt_per_1k or spec.price_completion_per_1k):
            return await run()
        hold = worst_case_microusd(spec)
        await cap.reserve(agent, hold)
        paid: list[int] = []
        token = _paid.set(paid)
        try:
            return await run()
        finally:
            _paid.reset(token)
            await asyncio.shield(cap.settle(hold, sum(paid)))

    async def admit_think(self, agent: str) -> None:
        """Wait until ``agent``'s buckets admit a think (CPU and LLM tokens, on their estimates)."""
        await self.buckets.acquire(agent, "cpu", self.estimator.estimate(agent, "think"))
        await self.buckets.acquire(agent, "llm_tokens", self.token_estimator.estimate(agent, "think"))

    async def run_here(
        self, agent: str, spec: Think, generate: Callable[[Think], bytes], executor: cf.Executor
    ) -> ThinkReport:
        """Run a think against a remote server (``spec.endpoint``) in the supervisor, as ``generate(spec)``
        (a ``ThinkReport``, msgpack) in a thread of ``executor`` (its size bounds the requests in flight),
        once the agent's buckets admit it and its worst case fits the dollar cap.

        No worker is held. The CPU the call uses in its thread is the agent's (``AgentMeter.to_thread``)
        and rides in its usage record (``<run>-<n>``, kind ``think``, no worker CPU) with the tokens and
        dollars the server reported. A call that raises fails with ``TaskFailed`` (``task_error``), charged
        what it cost here. Cancelled, the request is left to finish in its thread (its CPU there is then
        the supervisor's overhead) and nothing else is charged.
        """
        return await self._capped(agent, spec, lambda: self._here(agent, spec, generate, executor))

    async def _here(
        self, agent: str, spec: Think, generate: Callable[[Think], bytes], executor: cf.Executor
    ) -> ThinkReport:
        await self.admit_think(agent)
        task_id = f"{self.run_id}-{next(self._n)}"
        nothing = TaskUsage(0.0, 0, 0, 0.0, 0, "none")

        def counted(spec: Think) -> bytes:  # in flight while its thread makes it, not while it waits for one
            self.thinking.remote_started()
            try:
                return generate(spec)
            finally:
                self.thinking.remote_ended()

        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            output = await self.meter.to_thread(agent, counted, spec, executor=executor)
        except Exception as exc:  # the backend's own error (unreachable, malformed answer) says why
            usage = msgspec.structs.replace(nothing, wall_seconds=loop.time() - start)
            await self._charged(
                self._record(agent, "think", task_id, usage, False, error="task_error", paid=_paid.get())
            )
            raise TaskFailed("task_error", f"{type(exc).__name__}: {exc}", usage) from None
        usage = msgspec.structs.replace(nothing, wall_seconds=loop.time() - start)
        await self._charged(
            self._record(agent, "think", task_id, usage, True, *_tokens(spec, output), paid=_paid.get())
        )
        return decode_think(output)

    async def _run(self, agent: str, spec: TaskSpec, timeout_s: float | None, serve: Serve | None) -> Outcome:
        kind = kind_of(spec)
        await self.buckets.acquire(agent, "cpu", self.estimator.estimate(agent, kind))
        if isinstance(spec, Think):
            await self.buckets.acquire(agent, "llm_tokens", self.token_estimator.estimate(agent, kind))
        task_id = f"{self.run_id}-{next(self._n)}"
        # A task's memory limit is its agent's memory_quota, as the ledger holds it now, less what trades
        # in progress are giving away (``memory_kept``). Confined code gets its limit from the sandbox's
        # own cgroup instead: a second limit on the worker around it could make the kernel pick the
        # worker, not the sandbox, when memory runs out.
        async with self._memory_lock(agent):
            quota = 0 if isinstance(spec, Invoke) else await self.memory_available(agent)
            if not isinstance(spec, Invoke) and quota <= 0:
                # The worker reads a limit of 0 as none: an agent that sold all its memory_quota would
                # run unlimited.
                raise TaskFailed(
                    "quota_exceeded",
                    f"`{agent}` holds no memory_quota (traded away or leaving in a trade): a task needs some; "
                    "acquire memory_quota before running one",
                )
            limit = spec.memory_bytes if isinstance(spec, Invoke) else quota
            held = self._memory_held.get(agent)
            if held is None:  # not setdefault: that would build a Counter for every task
                held = self._memory_held[agent] = collections.Counter()
            held[limit] += 1
        try:
            return await self._dispatched(agent, spec, kind, task_id, quota, timeout_s, serve)
        finally:
            held[limit] -= 1
            if not held[limit]:
                del held[limit]

    async def _dispatched(
        self,
        agent: str,
        spec: TaskSpec,
        kind: str,
        task_id: str,
        quota: int,
        timeout_s: float | None,
        serve: Serve | None,
    ) -> Outcome:
        charged = _Charged(asyncio.get_running_loop().create_future(), _paid.get())

        def ended(out: Outcome | None, err: TaskFailed | None) -> None:
            # On the pool's loop, once, when the task ends: charged there and then, whether or not its
            # caller still waits (no hop through the caller's task, nothing lost if it was cancelled).
            # Charging is the economy's own work, named overhead of the loop as the pool's receive path
            # that calls it: timing it for the agent would cost more than the work.
            self._charge_ended(agent, spec, kind, task_id, out, err, charged)

        # The pool's encoding and dispatch of this task is work done for the agent.
        pool_id = self.meter.call(
            agent,
            lambda: self.pool.submit(
                spec, ended, agent=agent, timeout_s=timeout_s, memory_limit=quota, serve=serve, track=task_id
            ),
        )
        try:
            return await charged.caller
        except asyncio.CancelledError:
            if not charged.landed:  # stopped (the worker is free again at once), then charged as it ended
                charged.waiting = asyncio.get_running_loop().create_future()
                self.pool.cancel(pool_id)
                await charged.waiting
            raise

    def _charge_ended(
        self,
        agent: str,
        spec: TaskSpec,
        kind: str,
        task_id: str,
        out: Outcome | None,
        err: TaskFailed | None,
        charged: _Charged,
    ) -> None:
        """Charge a task that ended (the pool's callback): queue its usage record and, once that is durable,
        hand the caller the outcome (or the task's ``TaskFailed``, or the ledger's refusal)."""
        try:
            if out is not None:
                record = self._record(
                    agent, kind, task_id, out.usage, True, *_tokens(spec, out.output), paid=charged.paid
                )
            else:
                assert err is not None
                record = self._record(
                    agent, kind, task_id, err.usage, False, *_spent(spec, err), error=err.code, paid=charged.paid
                )
        except Exception as exc:  # never into the pool's callback: the caller hears of it
            charged.land(None, exc)
            return
        failure: BaseException | None = err
        if record is None:  # the task never reached a worker: nothing was used
            charged.land(out, failure)
            return

        def durable(f: asyncio.Future[Receipt]) -> None:
            charged.land(out, failure if f.cancelled() or f.exception() is None else f.exception())

        self._queue_usage(record, durable)

    async def run_batch(
        self,
        agents: Sequence[str],
        spec: ThinkBatch,
        *,
        timeout_s: float | None = None,
        admitted: bool = False,
        prefer: int = 0,
        sent: Callable[[int], None] | None = None,
    ) -> tuple[Outcome, ThinkBatchReport]:
        """Run ``spec`` (one think per agent, in order) as one task once every agent's buckets admit
        its think (``admitted``: the caller had each admitted already, ``admit_think``), and charge each
        agent its share of what the batch used (``split_usage``): one usage record per agent,
        ``<batch>.<i>``, naming the batch ``<run>-b<n>``. ``prefer``: the pid of the worker to run on
        if it is idle (the one that kept these agents' last prompts). ``sent`` is called with the pool's
        task id of the batch once it is queued (to stop one of its thinks: ``WorkerPool.stop_think``).

        Raises ``TaskFailed`` (after charging what it used: a cancelled batch reports each
        sequence's work so far; a batch that reports nothing is split equally) when the batch failed.
        Cancelling the caller stops the batch, charges it, and propagates.
        """
        if len(agents) != len(spec.thinks):
            raise ValueError(f"{len(agents)} agents for a batch of {len(spec.thinks)} thinks")
        if not admitted:
            for agent in agents:
                await self.admit_think(agent)
        batch = f"{self.run_id}-b{next(self._n)}"
        # Queued as the first agent's (the pool's fair queue has one owner per task); the books
        # charge it to all of them below (``_charge_batch``).
        # Tracked under the batch's name: a supervisor killed meanwhile leaves a record that recovery
        # splits among ``agents`` (``runtime.economy.recovery``), cleared once every share is durable.
        task = self.pool.begin(
            spec, agent=agents[0], timeout_s=timeout_s, prefer=prefer, track=batch, sharers=tuple(agents)
        )
        if sent is not None:
            sent(task.task_id)
        self.thinking.started(len(agents))
        try:
            out = await asyncio.shield(task.ended)
        except asyncio.CancelledError:
            await task.stop()
            try:
                out = await task.ended
            except TaskFailed as exc:
                await self._charge_batch(agents, batch, exc.usage, _batch_spent(spec, exc), False, exc.code)
            else:
                await self._charge_batch(agents, batch, out.usage, decode_think_batch(out.output), True)
            raise
        except TaskFailed as exc:
            await self._charge_batch(agents, batch, exc.usage, _batch_spent(spec, exc), False, exc.code)
            raise
        report = decode_think_batch(out.output)
        await self._charge_batch(agents, batch, out.usage, report, True)
        return out, report

    async def _charge_batch(
        self,
        agents: Sequence[str],
        batch: str,
        usage: TaskUsage | None,
        report: ThinkBatchReport,
        ok: bool,
        error: str = "",
    ) -> None:
        self.thinking.ended(report.work if usage is not None else [SeqWork(own_tokens=0) for _ in agents])
        if usage is None:
            return  # never reached a worker
        shares = split_usage(usage, report)
        self.pool.accounts.share(agents[0], usage, list(zip(agents, shares, strict=True)), ok)
        records = []
        for i, (agent, share) in enumerate(zip(agents, shares, strict=True)):
            tokens = report.reports[i].tokens if i < len(report.reports) else 0
            record = self._record(agent, "think", f"{batch}.{i}", share, ok, tokens, error=error, batch=batch)
            assert record is not None  # a share of a measured usage
            records.append(record)
        await asyncio.gather(*(self._submit_usage(r) for r in records))
        if self.pool.inflight is not None:
            self.pool.inflight.clear(batch)

    def _record(
        self,
        agent: str,
        kind: str,
        task_id: str,
        usage: TaskUsage | None,
        ok: bool,
        llm_tokens: int = 0,
        llm_cost_microusd: int = 0,
        error: str = "",
        paid: list[int] | None = None,
        batch: str = "",
    ) -> RecordUsage | None:
        """The usage record of a task that ended (None when it never reached a worker: nothing was used),
        its agent's buckets charged and its estimates updated; ``paid`` collects what a paid think cost,
        ``batch`` names the ``think_batch`` the task was a share of."""
        if usage is None:
            return None
        self.estimator.observe(agent, kind, usage.charged_seconds)
        if llm_tokens:
            self.token_estimator.observe(agent, kind, float(llm_tokens))
            self.tokens[agent] = self.tokens.get(agent, 0) + llm_tokens
        if paid is not None:
            paid.append(llm_cost_microusd)
        return charge(
            self.buckets,
            agent,
            kind,
            task_id,
            usage,
            ok,
            llm_tokens,
            llm_cost_microusd,
            error,
            self.meter.take(agent),
            batch,
        )

    async def flush_supervisor(self, older_than_s: float = 0.0) -> int:
        """Charge, each as its own ``supervisor`` usage record, the supervisor CPU measured for agents that
        has waited at least ``older_than_s`` for a task to ride with; return how many records were written."""
        records = []
        local = set(self.buckets.agents())
        for agent in self.meter.waiting(older_than_s):
            seconds = self.meter.take(agent)
            if agent not in local:  # acted for without a bucket here (a test's or a tool's account)
                continue
            task_id = f"{self.run_id}-s{next(self._n)}"
            records.append(
                RecordUsage(
                    id=f"usage:{task_id}",
                    task_id=task_id,
                    agent=agent,
                    kind="supervisor",
                    ok=True,
                    cpu_seconds=0.0,
                    supervisor_cpu_seconds=seconds,
                    buckets={"cpu": self.buckets.charge(agent, "cpu", seconds)},
                )
            )
        await asyncio.gather(*(self._submit_usage(r) for r in records))
        return len(records)

    async def flush_supervisor_every(self, period_s: float) -> None:
        """``flush_supervisor`` what has waited ``period_s`` or more, every ``period_s``, until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            await self.flush_supervisor(period_s)

    async def _charged(self, record: RecordUsage | None) -> None:
        """Record ``record`` durably (None: the task used nothing, there is nothing to record)."""
        if record is not None:
            await self._submit_usage(record)

    async def _submit_usage(self, record: RecordUsage) -> None:
        # Shielded: even if we are cancelled meanwhile (which is how agents are stopped), the record's
        # callbacks run once it is durable.
        await asyncio.shield(self._queue_usage(record))

    def _queue_usage(
        self, record: RecordUsage, then: Callable[[asyncio.Future[Receipt]], None] | None = None
    ) -> asyncio.Future[Receipt]:
        """Queue ``record``; once durable, its in-flight record is cleared (a recovery must not charge it
        again), what it cost a paid model is counted, and then ``then`` is called with the future, which
        says when. One callback does all three: each callback of a future is a handle of the loop, and
        every task's charge comes here."""
        durable = self.ledger.submit_async(record)
        inflight = self.pool.inflight

        def settled(f: asyncio.Future[Receipt]) -> None:
            if not f.cancelled() and f.exception() is None:
                if inflight is not None:
                    inflight.clear(record.task_id)
                if record.llm_cost_microusd:  # counted once burnt from the budget, as displays read both
                    self._spent(record)
            if then is not None:
                then(f)

        durable.add_done_callback(settled)
        return durable

    def _spent(self, record: RecordUsage) -> None:
        self.spent_microusd[record.agent] = self.spent_microusd.get(record.agent, 0) + record.llm_cost_microusd

    async def transfer_right(self, op: Transfer) -> Receipt:
        """Transfer an asset; a rate right moves both agents' bucket rates with it, at once (for the
        agents whose buckets are here: another node re-rates its own, see ``World.follow_rates``)."""
        receipt = await self.ledger.submit_async(op)
        if receipt.fresh:
            await self.rerate_parties(op.asset, (op.src, op.dst), op.id)
        return receipt

    async def rerate_parties(self, asset: Asset, agents: tuple[str, ...], op_id: str) -> None:
        """After the trade ``op_id`` moved ``asset`` between ``agents``: re-rate those whose buckets are
        here, when ``asset`` is a rate right (anything else changes no bucket)."""
        if asset not in RATE_RIGHTS:
            return
        here = self.buckets.agents()
        await asyncio.gather(*(self.rerate(agent, asset, op_id) for agent in agents if agent in here))

    async def rerate(self, agent: str, asset: Asset, op_id: str) -> None:
        """Set ``agent``'s bucket rate to its holding of the rate right ``asset`` in the ledger, and
        persist the bucket under an id derived from the trade ``op_id`` (so a replay changes nothing)."""
        resource, per_unit = RATE_RIGHTS[asset]
        # Fresh: the trade that calls for this may be another node's, newer than any cached holding.
        rate = await self.ledger.balance_async(agent, asset, fresh=True) * per_unit
        if rate == self.buckets.get(agent, resource).rate:
            return
        state: BucketState = self.buckets.set_rate(agent, resource, rate)
        await self.ledger.submit_async(SetBuckets(id=f"rate:{op_id}:{agent}", agent=agent, buckets={resource: state}))
