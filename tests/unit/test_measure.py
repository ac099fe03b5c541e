"""Unit tests for ``workers.measure`` (in-process probes only).

The cgroup meters need the test process inside a child cgroup of its own; moving the test process is
not done here. They are covered by the integration tests.
"""

from __future__ import annotations

import gc
import hashlib
import time
from pathlib import Path

import pytest

from workers.measure import ProcStatusMeter, cpu_seconds, open_meter

MiB = 1 << 20


def burn_thread_time(seconds: float) -> float:
    """Spin this thread for ``seconds`` of its own CPU time; return the thread time actually used."""
    start = time.thread_time()
    end = start + seconds
    block = bytes(4096)
    while time.thread_time() < end:
        hashlib.sha256(block).digest()
    return time.thread_time() - start


def touch(size: int) -> bytearray:
    buf = bytearray(size)
    buf[::4096] = b"\x01" * len(range(0, size, 4096))
    return buf


def test_cpu_seconds_grows_by_cpu_burnt() -> None:
    before = cpu_seconds()
    used = burn_thread_time(0.1)
    delta = cpu_seconds() - before
    assert used >= 0.1
    assert delta == pytest.approx(0.1, rel=0.10)


def test_cpu_seconds_does_not_count_sleep() -> None:
    before = cpu_seconds()
    time.sleep(0.1)
    assert cpu_seconds() - before < 0.02


def test_cpu_seconds_is_monotonic_and_positive() -> None:
    a = cpu_seconds()
    b = cpu_seconds()
    assert 0 < a <= b


def test_proc_status_meter_peak_and_reset() -> None:
    meter = ProcStatusMeter()
    assert meter.name == "vmhwm"
    gc.collect()
    baseline = meter.start()
    assert baseline == pytest.approx(meter.current(), abs=2 * MiB)
    assert meter.peak() - baseline < 2 * MiB  # start() reset the high-water mark

    buf = touch(100 * MiB)
    grown = meter.peak() - baseline
    assert grown == pytest.approx(100 * MiB, rel=0.05)
    assert meter.current() - baseline == pytest.approx(100 * MiB, rel=0.05)

    del buf
    gc.collect()
    # freed: the current use drops back, but the peak remembers until the next start()
    assert meter.current() - baseline < 5 * MiB
    assert meter.peak() - meter.current() > 90 * MiB

    baseline2 = meter.start()
    tiny = bytearray(64 * 1024)
    tiny[::4096] = b"\x01" * len(range(0, len(tiny), 4096))
    assert meter.peak() - baseline2 < 5 * MiB
    assert meter.peak() >= meter.current()
    del tiny


def test_proc_status_meter_start_is_idempotent() -> None:
    meter = ProcStatusMeter()
    a = meter.start()
    b = meter.start()
    assert abs(a - b) < 2 * MiB
    assert meter.peak() >= b - 2 * MiB


def test_proc_status_meter_agrees_with_proc_status() -> None:
    meter = ProcStatusMeter()
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    assert meter.current() == pytest.approx(fields["VmRSS"], abs=2 * MiB)
    assert meter.peak() == pytest.approx(fields["VmHWM"], abs=2 * MiB)
    assert meter.peak() >= meter.current()


def test_proc_status_meter_reads_peak_and_current_together() -> None:
    meter = ProcStatusMeter()
    baseline = meter.start()
    buf = touch(64 * MiB)
    del buf
    gc.collect()
    peak, current = meter.peak_and_current()
    # The same figures as the two reads, the peak remembering what was freed.
    assert peak == pytest.approx(meter.peak(), abs=2 * MiB)
    assert current == pytest.approx(meter.current(), abs=2 * MiB)
    assert peak - baseline == pytest.approx(64 * MiB, rel=0.05)
    assert peak - current > 56 * MiB


def test_open_meter_without_cgroup_is_proc_status() -> None:
    meter = open_meter(None)
    assert isinstance(meter, ProcStatusMeter)
    assert meter.name == "vmhwm"
    assert meter.current() > 0


@pytest.mark.parametrize("version", [1, 2])
def test_open_meter_falls_back_when_cgroup_files_missing(tmp_path: Path, version: int) -> None:
    meter = open_meter((str(tmp_path / "no-such-cgroup"), version))
    assert isinstance(meter, ProcStatusMeter)
    assert meter.current() > 0
