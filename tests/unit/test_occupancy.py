"""Occupancy: a task pays ``max(cpu, held × share)`` from its CPU bucket, the surcharge named apart."""

from __future__ import annotations

import os

import pytest

from runtime.economy.buckets import Buckets
from runtime.economy.charging import charge
from runtime.pool.accounting import Accounts, RunDelay, TaskUsage, occupancy


@pytest.mark.parametrize(
    ("held", "share", "cpu", "surcharge"),
    [
        (10.0, 1.0, 0.05, 9.95),  # slept ten seconds on a worker that is a whole CPU
        (10.0, 0.5, 0.05, 4.95),  # four workers on two CPUs: a worker held is half a CPU
        (1.0, 1.0, 1.0, 0.0),  # computed all along: its CPU is the whole bill
        (1.0, 1.0, 2.0, 0.0),  # two threads: more CPU than held time, no surcharge, never negative
        (0.0, 1.0, 0.0, 0.0),
    ],
)
def test_the_surcharge_is_what_holding_the_worker_adds_to_the_cpu(
    held: float, share: float, cpu: float, surcharge: float
) -> None:
    assert occupancy(held, share, cpu) == pytest.approx(surcharge)
    assert cpu + occupancy(held, share, cpu) == pytest.approx(max(cpu, held * share))


def _usage(cpu: float, occ: float) -> TaskUsage:
    return TaskUsage(cpu, 0, 0, 1.0, 1, "vmhwm", occupancy_seconds=occ)


def test_the_bucket_pays_cpu_and_occupancy_and_the_record_names_each() -> None:
    buckets = Buckets(clock=lambda: 100.0)  # a frozen clock: no refill
    buckets.add("sleepy", "cpu", 0.1, 20.0)  # 2 CPU-s
    record = charge(buckets, "sleepy", "invoke", "t1", _usage(0.05, 2.95), ok=True)
    assert record.cpu_seconds == 0.05 and record.occupancy_seconds == 2.95
    assert buckets.level("sleepy", "cpu") == pytest.approx(2.0 - 3.0)  # in debt: it waits before its next task
    assert record.buckets["cpu"].level == pytest.approx(-1.0)


def test_retries_add_their_occupancy_and_the_kernels_books_hold_cpu_only() -> None:
    total = _usage(0.1, 1.0).plus(_usage(0.2, 0.5))
    assert total.occupancy_seconds == pytest.approx(1.5) and total.charged_seconds == pytest.approx(1.8)
    accounts = Accounts()
    accounts.open_worker(7, 1, "/proc")
    accounts.charge("a", _usage(0.1, 1.0), True, 7, 0.1)
    assert accounts.agents["a"].occupancy_seconds == 1.0 and accounts.agents["a"].cpu_seconds == 0.1
    assert accounts.charged() == pytest.approx(0.1)  # reconciled against the kernel: CPU only


def test_run_delay_reads_the_kernels_count_and_is_zero_when_there_is_none() -> None:
    mine = RunDelay(os.getpid())
    try:
        assert mine.read() >= 0.0
    finally:
        mine.close()
    gone = RunDelay(1 << 30)  # no such process
    assert gone.read() == 0.0
    gone.close()
