"""Unit tests for ``runtime.pool.scheduler``: every rule of the pool on a hand-driven clock, and its
invariants (one task per worker, a task in exactly one place) under random sequences of events."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.config import PoolConfig
from runtime.pool.scheduler import (
    ArmDeadline,
    AskStop,
    Command,
    Fail,
    Job,
    Kill,
    PoolFailed,
    Scheduler,
    Send,
    Shutdown,
    Spawn,
    Start,
)


class Sim:
    """A scheduler driven by hand, with the pool's side of each command played out: ``Spawn`` adds a
    worker, ``Fail`` ends a task; deaths and answers happen when a test says so."""

    def __init__(self, workers: int = 1, **cfg: object) -> None:
        self.s: Scheduler[Job] = Scheduler(PoolConfig(**cfg), workers)  # type: ignore[arg-type]
        self.now = 0.0
        self.ids = itertools.count(1)
        self.wids = itertools.count(1)
        self.ended: Counter[int] = Counter()
        self.failed: dict[int, str] = {}
        self.log: list[Command[Job]] = []
        for _ in range(workers):
            self.spawn(hello=True)

    def spawn(self, hello: bool = False) -> int:
        wid = next(self.wids)
        self.s.add(wid, self.now)
        if hello:
            self.do(self.s.hello(wid, 0, self.now))
        return wid

    def do(self, cmds: list[Command[Job]]) -> list[Command[Job]]:
        self.log += cmds
        for cmd in cmds:
            if isinstance(cmd, Spawn):
                self.spawn()
            elif isinstance(cmd, Fail):
                self.ended[cmd.job.id] += 1
                self.failed[cmd.job.id] = cmd.code
        self.s.check()
        return cmds

    def job(self, agent: str = "a", **kw: object) -> Job:
        return Job(id=next(self.ids), agent=agent, timeout_s=kw.pop("timeout_s", 10.0), **kw)  # type: ignore[arg-type]

    def submit(self, job: Job) -> list[Command[Job]]:
        return self.do(self.s.submit(job, self.now))

    def answer(self, wid: int) -> Job:
        job = self.s.answered(wid)
        self.ended[job.id] += 1
        self.do(self.s.resume(wid, self.now))
        return job

    def die(self, wid: int, over_memory: bool = False, begun: int = 1) -> bool:
        """The worker dies having begun ``begun`` of the tasks it held (its task, then those waiting);
        True if its task was retried."""
        lost = self.s.died(wid, self.now, begun=begun, over_memory=over_memory)
        self.do(lost.first)
        retried = self.s.retry(lost)
        if lost.job is not None and not retried:
            self.ended[lost.job.id] += 1
        self.do(self.s.replace(lost, self.now))
        return retried

    def running(self, wid: int) -> int | None:
        job = self.s.workers[wid].job
        return job.id if job is not None else None

    def waiting(self, wid: int) -> list[int]:
        return [j.id for j in self.s.workers[wid].waiting]


def sends(cmds: list[Command[Job]]) -> list[tuple[int, int, bool]]:
    return [(c.wid, c.job.id, c.runs_now) for c in cmds if isinstance(c, Send)]


# --- one task per worker, fairness --------------------------------------------------------------------


def test_a_task_goes_to_a_free_worker_and_the_rest_wait_in_the_queue() -> None:
    sim = Sim(workers=2)
    cmds = [c for j in (sim.job(), sim.job(), sim.job()) for c in sim.submit(j)]
    assert sends(cmds) == [(1, 1, True), (2, 2, True)]
    assert [type(c) for c in cmds[:3]] == [Start, ArmDeadline, Send]  # the clock starts before the send
    assert len(sim.s.queue) == 1
    sim.answer(2)
    assert sim.running(2) == 3 and not sim.s.queue


def test_agents_are_served_round_robin() -> None:
    sim = Sim(workers=1)
    for agent in ("z", "a", "a", "a", "b"):
        sim.submit(sim.job(agent))
    order = [sim.answer(1).id for _ in range(5)]
    assert order == [1, 2, 5, 3, 4]  # b's only task does not wait behind a's backlog


def test_a_cancelled_claim_leaves_the_worker_free_for_the_next_task() -> None:
    sim = Sim(workers=1)
    sim.submit(sim.job())
    sim.submit(sim.job(claim=lambda: False))
    sim.submit(sim.job())
    sim.answer(1)
    assert sim.running(1) == 3 and not sim.s.queue and sim.ended[2] == 0  # its owner ended it, not the pool


# --- prefetch ---------------------------------------------------------------------------------------


def test_prefetch_sends_plain_tasks_to_wait_behind_the_running_one() -> None:
    sim = Sim(workers=1, prefetch=1)
    cmds = [c for j in (sim.job(), sim.job(), sim.job()) for c in sim.submit(j)]
    assert sends(cmds) == [(1, 1, True), (1, 2, False)]
    sim.now = 3.0
    done = sim.answer(1)
    assert done.id == 1 and sim.running(1) == 2 and sim.waiting(1) == [3]
    assert sim.s.workers[1].job_started == 3.0 and sim.s.workers[1].deadline_at == 13.0  # from its start


def test_prefetch_keeps_fair_order_when_the_next_task_may_not_wait() -> None:
    sim = Sim(workers=1, prefetch=2)
    sim.submit(sim.job())
    sim.submit(sim.job(plain=False))  # e.g. a think or an invocation
    assert sim.submit(sim.job()) == []  # may wait, but the task ahead of it may not: nothing waits
    assert sim.waiting(1) == []


def test_nothing_waits_behind_a_task_that_is_not_plain() -> None:
    sim = Sim(workers=1, prefetch=1)
    sim.submit(sim.job(plain=False))
    assert sim.submit(sim.job()) == [] and len(sim.s.queue) == 1


def test_a_burst_waits_as_deep_as_its_tasks_ask_and_other_tasks_as_prefetch_says() -> None:
    sim = Sim(workers=1, prefetch=0)
    cmds = [c for j in [sim.job(depth=3) for _ in range(5)] for c in sim.submit(j)]
    assert sends(cmds) == [(1, 1, True), (1, 2, False), (1, 3, False), (1, 4, False)]
    assert len(sim.s.queue) == 1
    sim.answer(1)
    sim.answer(1)  # two answers drained at once: their two successors go together
    assert sim.running(1) == 3 and sim.waiting(1) == [4, 5]
    sim.submit(sim.job())  # depth 0 and no prefetch: it waits in the queue, not at the worker
    assert sim.waiting(1) == [4, 5] and len(sim.s.queue) == 1


def test_waiting_tasks_a_dead_worker_began_fail_and_are_not_run_again_unless_idempotent() -> None:
    sim = Sim(workers=1, prefetch=3)
    jobs = [sim.job(), sim.job(), sim.job(idempotent=True), sim.job()]
    for job in jobs:
        sim.submit(job)
    sim.die(1, begun=3)  # its tally: it began 1, 2 and 3 (their answers lost with it), never 4
    assert sim.ended[1] == 1  # the task it ran, settled by the pool (charged from the kernel)
    assert sim.failed == {2: "worker_crashed"}  # 2 may have run: not again
    assert [j.id for j in sim.s.queue] == [3, 4]  # 3 is retried (idempotent), 4 never began
    assert jobs[2].attempts == 1 and jobs[3].attempts == 0


def test_waiting_tasks_a_dead_worker_never_began_go_back_uncounted_whatever_their_frame() -> None:
    sim = Sim(workers=1, prefetch=3)
    jobs = [sim.job(), sim.job(), sim.job()]
    for job in jobs:
        sim.submit(job)
    sim.die(1, begun=1)  # it died in its task: what waited behind it never began
    assert sim.failed == {} and [j.id for j in sim.s.queue] == [2, 3]
    assert [j.attempts for j in jobs[1:]] == [0, 0]


def test_a_task_in_hand_the_dead_worker_never_began_goes_back_uncounted_and_uncharged() -> None:
    sim = Sim(workers=1, prefetch=2)
    jobs = [sim.job(), sim.job(), sim.job()]
    for job in jobs:
        sim.submit(job)
    lost = sim.s.died(1, sim.now, begun=0)  # it died between its last answer and this task
    assert lost.job is None and lost.unbegun is jobs[0] and lost.crash  # nothing for the pool to charge
    assert lost.first == [] and [j.id for j in sim.s.queue] == [1, 2, 3]  # in order, at the head
    assert [j.attempts for j in jobs] == [0, 0, 0] and sim.s.crashed == 1
    sim.do(sim.s.replace(lost, sim.now))
    sim.do(sim.s.hello(2, 0, sim.now))  # its replacement runs them all, in order
    assert sim.running(2) == 1 and sim.waiting(2) == [2, 3] and jobs[0].attempts == 1


def test_a_task_in_hand_never_begun_fails_as_the_pool_or_a_cancel_says_not_as_a_crash() -> None:
    sim = Sim(workers=1, prefetch=0)
    job = sim.job(idempotent=True)
    sim.submit(job)
    sim.do(sim.s.kill(1, "cancelled"))  # a cancel of a task the worker had not begun yet
    lost = sim.s.died(1, sim.now, begun=0, over_memory=True)  # not its memory limit: it never ran
    sim.do(lost.first)
    assert lost.job is None and lost.reason == "cancelled" and sim.failed == {1: "cancelled"}
    assert not lost.crash and job.attempts == 0 and not sim.s.queue  # not retried, idempotent or not
    sim.do(sim.s.replace(lost, sim.now))  # its replacement, at once
    sim.do(sim.s.hello(2, 0, sim.now))
    other = sim.job()
    sim.submit(other)
    sim.do(sim.s.close())
    lost = sim.s.died(2, sim.now, begun=0)  # it died before it began its last task
    sim.do(lost.first)
    assert lost.job is None and sim.failed[other.id] == "pool_closed" and other.attempts == 0


def test_prefetch_stops_where_the_worker_would_be_recycled() -> None:
    sim = Sim(workers=1, prefetch=3, max_tasks_per_worker=3)
    sim.do(sim.s.report(1, 0, 0))
    for _ in range(5):
        sim.submit(sim.job())
    assert sim.running(1) == 1 and sim.waiting(1) == [2, 3]  # it does three tasks, then it is recycled


# --- retry once, crash window -----------------------------------------------------------------------


def test_an_idempotent_task_is_retried_once_ahead_of_the_tasks_that_waited() -> None:
    sim = Sim(workers=1, prefetch=1)
    sim.submit(sim.job(idempotent=True))
    sim.submit(sim.job())
    assert sim.die(1)
    assert [j.id for j in sim.s.queue] == [1, 2] and [j.attempts for j in sim.s.queue] == [1, 0]
    sim.do(sim.s.hello(2, 0, sim.now))  # its replacement (spawned after a back-off) is up
    assert sim.running(2) == 1 and sim.waiting(2) == [2]
    assert not sim.die(2)  # second crash: it fails
    assert sim.ended[1] == 1 and sim.s.crashed == 2


def test_a_task_that_is_not_idempotent_is_not_retried() -> None:
    sim = Sim(workers=1)
    sim.submit(sim.job())
    assert not sim.die(1) and sim.ended[1] == 1


def test_a_crashed_worker_is_replaced_after_a_growing_back_off() -> None:
    sim = Sim(workers=1, restart_backoff_s=0.5, restart_backoff_max_s=1.5, max_restarts=10)
    delays = []
    for _ in range(4):
        wid = max(sim.s.workers)
        lost = sim.s.died(wid, sim.now, begun=0)
        delays += [c.delay for c in sim.s.replace(lost, sim.now) if isinstance(c, Spawn)]
        sim.spawn(hello=True)
    assert delays == [0.5, 1.0, 1.5, 1.5]
    sim.submit(sim.job())
    sim.answer(max(sim.s.workers))  # an answer ends the streak
    lost = sim.s.died(max(sim.s.workers), sim.now, begun=0)
    assert [c.delay for c in sim.s.replace(lost, sim.now) if isinstance(c, Spawn)] == [0.5]


def test_too_many_crashes_in_the_window_fail_the_pool() -> None:
    sim = Sim(workers=2, max_restarts=2, restart_window_s=10.0)
    sim.die(1)
    sim.now = 11.0  # the first crash leaves the window
    sim.die(2)
    sim.die(sim.spawn(hello=True))
    assert not any(isinstance(c, PoolFailed) for c in sim.log)  # two in the window: not more than 2
    sim.submit(sim.job())
    sim.submit(sim.job())
    sim.now = 12.0
    busy = sim.spawn(hello=True)
    sim.die(busy)
    assert sim.s.failed == "3 worker crashes within 10 s (limit 2)"
    assert any(isinstance(c, PoolFailed) for c in sim.log)
    assert set(sim.failed.values()) == {"pool_failed"}
    assert all(w.kill_reason == "pool_failed" for w in sim.s.workers.values())
    refused = sim.submit(sim.job())[0]
    assert isinstance(refused, Fail) and refused.code == "pool_failed"


def test_a_death_that_was_the_tasks_fault_is_replaced_at_once_and_not_counted() -> None:
    sim = Sim(workers=1)
    sim.submit(sim.job())
    lost = sim.s.died(1, sim.now, begun=1, over_memory=True)
    assert lost.reason == "memory_exceeded" and not lost.crash and not sim.s.retry(lost)
    assert sim.s.replace(lost, sim.now) == [Spawn(0.0)] and sim.s.crashed == 0


# --- deadlines ----------------------------------------------------------------------------------------


def test_a_task_past_its_deadline_has_its_worker_killed() -> None:
    sim = Sim(workers=2)
    assert ArmDeadline(5.0) in sim.submit(sim.job(timeout_s=5.0))
    sim.now = 1.0
    assert ArmDeadline(5.0) not in sim.submit(sim.job(timeout_s=8.0))  # a later deadline arms nothing
    assert sim.do(sim.s.check_deadlines(4.9)) == [ArmDeadline(5.0)]
    assert sim.do(sim.s.check_deadlines(5.0)) == [Kill(1), ArmDeadline(9.0)]
    assert sim.s.workers[1].kill_reason == "deadline_exceeded"
    assert sim.do(sim.s.check_deadlines(5.5)) == [ArmDeadline(9.0)]  # being killed: not again
    assert not sim.die(1) and sim.s.crashed == 0


# --- cancelling -------------------------------------------------------------------------------------


def test_cancelling_a_queued_task_fails_it_at_once() -> None:
    sim = Sim(workers=1)
    sim.submit(sim.job())
    sim.submit(sim.job())
    queued = sim.s.queue.peek()
    assert sim.s.cancel(2, sim.now) == (True, [Fail(queued, "cancelled", "task 2 was cancelled before it ran")])
    assert not sim.s.queue and queued.cancelled
    assert sim.s.cancel(99, sim.now) == (False, [])


def test_cancelling_a_running_task_kills_its_worker_unless_it_stops_when_asked() -> None:
    sim = Sim(workers=2, cancel_grace_s=2.0)
    sim.submit(sim.job())
    sim.submit(sim.job(stops_when_asked=True))
    assert sim.s.cancel(1, sim.now) == (True, [Kill(1)]) and sim.s.workers[1].kill_reason == "cancelled"
    sim.now = 1.0
    assert sim.s.cancel(2, sim.now) == (True, [AskStop(2), ArmDeadline(3.0)])
    assert sim.s.cancel(2, sim.now) == (True, [])  # asked once
    assert sim.do(sim.s.check_deadlines(3.0)) == [Kill(2)] and sim.s.workers[2].kill_reason == "cancelled"


def test_cancelling_a_waiting_task_stops_it_when_it_starts() -> None:
    sim = Sim(workers=1, prefetch=1)
    sim.submit(sim.job())
    sim.submit(sim.job())
    assert sim.s.cancel(2, sim.now) == (True, [])
    job = sim.s.answered(1)
    assert job.id == 1
    assert Kill(1) in sim.do(sim.s.resume(1, sim.now)) and sim.s.workers[1].kill_reason == "cancelled"


def test_a_cancelled_task_that_waited_at_a_dead_worker_fails_instead_of_going_back() -> None:
    sim = Sim(workers=1, prefetch=1)
    sim.submit(sim.job())
    sim.submit(sim.job())
    sim.s.cancel(2, sim.now)
    sim.die(1)
    assert sim.failed[2] == "cancelled" and not sim.s.queue


# --- recycling, liveness, sending, closing ------------------------------------------------------------


def test_an_idle_worker_that_did_its_share_is_recycled() -> None:
    sim = Sim(workers=1, max_tasks_per_worker=2)
    assert sim.do(sim.s.report(1, 1, 0)) == []
    assert sim.do(sim.s.report(1, 2, 0)) == [Shutdown(1), Spawn(0.0)]
    assert sim.s.workers[1].state == "stopping" and sim.s.workers[1].kill_reason == "recycled"
    assert sim.submit(sim.job()) == []  # not to the one stopping; the new one is not up yet


def test_an_idle_worker_that_grew_too_much_is_recycled() -> None:
    sim = Sim(workers=0, max_memory_growth_mb=1)
    wid = sim.spawn()
    sim.s.report(wid, 0, 100 << 20)  # the counters of its hello
    sim.do(sim.s.hello(wid, 100 << 20, 0.0))
    assert sim.do(sim.s.report(wid, 1, 101 << 20)) == []  # grown 1 MiB: not more than allowed
    assert sim.do(sim.s.report(wid, 2, (101 << 20) + 1)) == [Shutdown(wid), Spawn(0.0)]


def test_silent_workers_are_killed() -> None:
    sim = Sim(workers=1, startup_timeout_s=30.0, heartbeat_s=1.0, heartbeat_timeout_s=10.0)
    late = sim.spawn()
    assert sim.do(sim.s.check_liveness(10.5)) == [Kill(1)] and sim.s.workers[1].kill_reason == "heartbeat_timeout"
    assert sim.do(sim.s.check_liveness(30.5)) == [Kill(late)]
    assert sim.s.workers[late].kill_reason == "startup_timeout"


def test_a_task_that_could_not_be_sent_goes_back_untouched() -> None:
    sim = Sim(workers=2)
    sim.submit(sim.job())
    job = sim.s.workers[1].job
    assert job is not None and job.attempts == 1
    sim.s.workers[2].state = "stopping"  # so that it cannot take the task either
    assert sim.s.kill(1, "unreachable") == [Kill(1)]  # as the pool does when a send fails
    assert sim.do(sim.s.unsent(1, job, sim.now)) == []
    assert job.attempts == 0 and list(sim.s.queue) == [job] and sim.s.workers[1].kill_reason == "unreachable"


def test_closing_fails_what_is_queued_and_stops_the_workers() -> None:
    sim = Sim(workers=2)
    starting = sim.spawn()
    sim.submit(sim.job())
    sim.submit(sim.job())
    sim.submit(sim.job())
    queued = list(sim.s.queue)
    cmds = sim.do(sim.s.close())
    closed = Fail(queued[0], "pool_closed", "the pool was closed before the task ran")
    assert cmds == [closed, Shutdown(1), Shutdown(2), Kill(starting)]
    assert sim.s.workers[1].kill_reason == "pool_closed"  # busy: killed if it does not finish in time
    sim.answer(1)
    assert sim.s.workers[1].state == "stopping"
    refused = sim.submit(sim.job())[0]
    assert isinstance(refused, Fail) and refused.code == "pool_closed"
    assert not sim.die(2) and sim.s.replace(sim.s.died(1, sim.now, begun=1), sim.now) == []


# --- invariants under random events -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_task_ends_once_and_is_in_one_place_until_then(data: st.DataObject) -> None:
    prefetch = data.draw(st.integers(0, 2))
    sim = Sim(workers=data.draw(st.integers(1, 3)), prefetch=prefetch, max_restarts=1000, max_tasks_per_worker=3)
    submitted: list[Job] = []
    for _ in range(data.draw(st.integers(1, 60))):
        sim.now += data.draw(st.floats(0.0, 5.0))
        live = sorted(sim.s.workers)
        busy = [wid for wid in live if sim.s.workers[wid].state == "busy" and sim.s.workers[wid].job is not None]
        starting = [wid for wid in live if sim.s.workers[wid].state == "starting"]
        what = data.draw(
            st.sampled_from(["submit", "answer", "die", "hello", "deadlines", "cancel", "report", "close"])
        )
        if what == "submit":
            job = sim.job(
                data.draw(st.sampled_from("abc")),
                idempotent=data.draw(st.booleans()),
                plain=data.draw(st.booleans()),
                stops_when_asked=data.draw(st.booleans()),
                timeout_s=data.draw(st.floats(1.0, 20.0)),
                depth=data.draw(st.sampled_from([0, 0, 4])),
            )
            submitted.append(job)
            sim.submit(job)
        elif what == "answer" and busy:
            sim.answer(data.draw(st.sampled_from(busy)))
        elif what == "die" and live:
            sim.die(data.draw(st.sampled_from(live)), begun=data.draw(st.integers(0, 6)))
        elif what == "hello" and starting:
            sim.do(sim.s.hello(data.draw(st.sampled_from(starting)), 0, sim.now))
        elif what == "deadlines":
            sim.do(sim.s.check_deadlines(sim.now))
        elif what == "cancel" and submitted:
            sim.do(sim.s.cancel(data.draw(st.sampled_from(submitted)).id, sim.now)[1])
        elif what == "report" and live:
            sim.do(sim.s.report(data.draw(st.sampled_from(live)), data.draw(st.integers(0, 4)), 0))
        elif what == "close" and not sim.s.closing and data.draw(st.integers(0, 4)) == 0:
            sim.do(sim.s.close())
        assert all(n == 1 for n in sim.ended.values()), "a task ended twice"
        assert all(j.attempts <= 2 for j in submitted)
    # Every task not ended is in exactly one place (``check`` asserts "at most one").
    placed = {j.id for j in sim.s.queue}
    for w in sim.s.workers.values():
        placed |= {j.id for j in w.waiting} | ({w.job.id} if w.job is not None else set())
    assert {j.id for j in submitted} == placed | set(sim.ended)
    assert not placed & set(sim.ended)


def test_check_catches_a_task_in_two_places() -> None:
    sim = Sim(workers=1)
    sim.submit(sim.job())
    job = sim.s.workers[1].job
    assert job is not None
    sim.s.queue.push("a", job)
    with pytest.raises(AssertionError, match="task 1 is running on worker 1 and queued"):
        sim.s.check()
