"""What a worker (or the in-flight log) may report: finite amounts >= 0, tokens and costs it could have used."""

from __future__ import annotations

import math

import msgspec
import pytest

from runtime.pool.accounting import BadReport, TaskUsage, check_amounts, check_think, check_think_batch, check_usage
from runtime.protocol import SeqWork, Think, ThinkBatch, ThinkBatchReport, ThinkReport, Usage

SPEC = Think(system="sys", prompt="hello", max_tokens=8, price_prompt_per_1k=0.5, price_completion_per_1k=2.0)


def _report(**kw: float) -> bytes:
    honest = ThinkReport("{}", prompt_tokens=20, completion_tokens=8, cost_usd=0.026)
    return msgspec.msgpack.encode(msgspec.structs.replace(honest, **kw))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1e-9, 1e16])
@pytest.mark.parametrize("field", ["cpu_seconds", "wall_seconds"])
def test_a_usage_that_is_not_a_finite_amount_is_refused_naming_the_field(field: str, bad: float) -> None:
    usage = msgspec.structs.replace(Usage(0.5, 100, 50, 1.0), **{field: bad})
    with pytest.raises(BadReport, match=f"task 7: {field} must be finite") as info:
        check_usage(usage, "task 7")
    assert info.value.code == "bad_report" and isinstance(info.value, ValueError)


def test_a_believable_usage_passes() -> None:
    check_usage(Usage(0.0, 0, 0, 0.0), "zero")
    check_usage(TaskUsage(3600.0, 1 << 40, 1 << 30, 7200.0, 1, "cgroup-v1"), "large")
    with pytest.raises(BadReport, match="peak_memory_bytes"):
        check_usage(Usage(0.1, -1, 0, 0.1), "negative memory")


def test_the_place_of_a_check_is_made_only_for_a_refusal() -> None:
    """A report is checked once a task: where it came from is a text made only when it is refused."""
    made: list[str] = []

    def where() -> str:
        made.append("worker 3")
        return "worker 3"

    check_usage(Usage(0.5, 100, 50, 1.0), where)
    assert made == []
    with pytest.raises(BadReport, match=r"^worker 3: wall_seconds must be finite"):
        check_usage(Usage(0.5, 100, 50, math.nan), where)
    assert made == ["worker 3"]
    # One figure alone is checked as well as several.
    check_amounts(Usage(0.5, 100, 50, 1.0), ("cpu_seconds",), "one")
    with pytest.raises(BadReport, match=r"^one: baseline_memory_bytes must be finite"):
        check_amounts(Usage(0.5, 100, -50, 1.0), ("baseline_memory_bytes",), "one")


def test_a_think_report_is_held_to_its_tokens_and_prices() -> None:
    check_think(SPEC, _report(), "honest")  # 20 × 0.5 / 1000 + 8 × 2 / 1000 = 0.026
    for bad, what in [
        (_report(completion_tokens=10**9), "completion tokens"),
        (_report(prompt_tokens=10**9), "prompt tokens"),
        (_report(cost_usd=0.027), "cost_usd"),
        (b"\xc1", "not a ThinkReport"),
    ]:
        with pytest.raises(BadReport, match=what):
            check_think(SPEC, bad, "forged")


def _batch_report(n: int = 2, **work: int) -> bytes:
    honest = ThinkReport("{}", prompt_tokens=20, completion_tokens=8)
    w = msgspec.structs.replace(SeqWork(own_tokens=5, shared_tokens=10, kept_tokens=5, decode_steps=8), **work)
    return msgspec.msgpack.encode(ThinkBatchReport([honest] * n, [w] * n))


BATCH = ThinkBatch(thinks=[Think(system="sys", prompt="hello", max_tokens=8)] * 2)


def test_a_believable_batch_report_passes() -> None:
    check_think_batch(BATCH, _batch_report(), "honest")


@pytest.mark.parametrize(
    ("output", "why"),
    [
        (_batch_report(1), "1 reports and 1 work counts for 2 thinks"),
        (_batch_report(own_tokens=10**6), "more prompt tokens of work"),
        (_batch_report(decode_steps=10**6), "decode steps and 0 forced tokens, max_tokens is 8"),
        (_batch_report(forced_tokens=10**6), "1000000 forced tokens, max_tokens is 8"),
        (b"\x01", "not a ThinkBatchReport"),
    ],
)
def test_a_batch_report_that_could_not_be_true_is_refused(output: bytes, why: str) -> None:
    """Its work decides how the batch's CPU is split: work a think could not have caused is a forgery."""
    with pytest.raises(BadReport, match=why):
        check_think_batch(BATCH, output, "forged")
