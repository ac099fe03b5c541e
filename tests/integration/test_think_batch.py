"""Batched thinks with real llama.cpp (the tiny random model, and SmolLM2 where the ``gguf`` fixture
says so): ``native.batch`` directly, the ``think_batch`` task through the worker pool, a think stopped
inside its batch, and ``Economy.run_batch`` splitting its measured CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from native.batch import BatchDecoder, Request
from native.llama import InvalidOutput, LlamaBackend
from runtime.agents.loop import DEFAULT_PERSONA, RULES
from runtime.agents.schema import ACTION_SCHEMA_BYTES, parse_action
from runtime.economy.buckets import Buckets, Estimator
from runtime.economy.charging import Economy, split_usage
from runtime.economy.ledger import OpenAccount, RecordUsage
from runtime.economy.ledger.check import check
from runtime.economy.ledger.lmdb import LmdbLedger
from runtime.pool import WorkerPool
from runtime.pool.inflight import CRASH_CODE, InFlight, InflightLog
from runtime.protocol import Think, ThinkBatch, ThinkBatchReport, decode_think_batch
from tests.crash import finished_task, leave_in_flight
from tests.integration.conftest import wait_until
from tests.integration.test_restart import CONFIG, _start

SYSTEM = f"{DEFAULT_PERSONA}\n{RULES}"
AGENTS = [f"a{i}" for i in range(8)]
#: Room for the longest action the schema allows, even in the random model's single-byte tokens.
MAX_TOKENS = 500


def _prompt(i: int) -> str:
    return f"You are a{i}. Scrip: {10 + i}. News: none.\nReply with one action as JSON."


def _requests(n: int, **kw: object) -> list[Request]:
    return [Request(SYSTEM, _prompt(i), ACTION_SCHEMA_BYTES, MAX_TOKENS, seed=i, **kw) for i in range(n)]  # type: ignore[arg-type]


def test_a_batch_of_8_gives_8_schema_valid_actions(gguf: Path) -> None:
    llm = LlamaBackend(gguf, n_threads=1)
    decoder = BatchDecoder(llm)
    try:
        outcomes = decoder.generate(_requests(8))
    finally:
        decoder.close()
        llm.close()
    assert len(outcomes) == 8
    for o in outcomes:
        assert o.error == "" and o.generation.finish_reason == "stop", o
        parse_action(o.generation.text)  # raises if it is not an action the supervisor would run
    assert len({o.generation.text for o in outcomes}) > 1, "eight seeds, eight prompts: not all the same"
    # The work counts: a common prefix was evaluated once, each sequence evaluated its own suffix.
    shared = outcomes[0].work.shared_tokens
    assert shared > 100 and all(o.work.shared_tokens == shared for o in outcomes)
    for o in outcomes:
        assert o.work.own_tokens + shared == o.generation.prompt_tokens
        # The text the grammar forced was evaluated without decode steps of its own (``{"kind":"`` with
        # the prompt at least); the last draw and what the grammar forced after it, up to the closing
        # brace that ends the completion, are never evaluated.
        assert o.work.forced_tokens > 0 and o.generation.text.endswith("}")
        assert o.work.decode_steps + o.work.forced_tokens < o.generation.completion_tokens


def test_jump_forward_evaluates_forced_text_without_decode_steps(gguf: Path) -> None:
    """With jump-forward a batch of 8 still gives 8 valid actions; most completion tokens take no
    decode step (the grammar forced them), and every token evaluated is counted once, for the sequence
    it was evaluated for: the phases' evaluated tokens are the sum of the sequences' work."""
    llm = LlamaBackend(gguf, n_threads=1)
    decoder = BatchDecoder(llm)
    try:
        outcomes = decoder.generate(_requests(8))
        phases = decoder.phases
    finally:
        decoder.close()
        llm.close()
    for o in outcomes:
        assert o.error == "" and o.generation.finish_reason == "stop", o
        parse_action(o.generation.text)
    works = [o.work for o in outcomes]
    assert sum(w.forced_tokens for w in works) == phases.forced_tokens > 0
    evaluated = sum(w.own_tokens + w.decode_steps + w.forced_tokens for w in works)
    assert phases.prefill_tokens + phases.decode_rows == evaluated
    assert phases.decode_steps == max(w.decode_steps for w in works)
    completion = sum(o.generation.completion_tokens for o in outcomes)
    assert sum(w.decode_steps for w in works) < 0.7 * completion, (works, completion)


def test_prompts_are_tokenized_as_the_single_path_does(llm: LlamaBackend) -> None:
    decoder = BatchDecoder(llm)
    # Without jump-forward, which evaluates forced text as the tokenizer splits it, not as drawn.
    step_by_step = BatchDecoder(llm, jump_forward=False)
    try:
        tokens, _ = llm.chat_tokens(SYSTEM, _prompt(3))
        single = llm.generate(SYSTEM, _prompt(3), schema=ACTION_SCHEMA_BYTES, max_tokens=MAX_TOKENS, seed=3)
        assert len(tokens) == single.prompt_tokens
        # Greedy decoding of one sequence follows the single path's completion token for token. Over the
        # first 48 tokens: a long greedy run of the random test model meets near-ties, which the batched
        # and the single path's float sums may break differently (seen past ~100 tokens with some prompts).
        greedy = step_by_step.generate([Request(SYSTEM, _prompt(3), ACTION_SCHEMA_BYTES, 48, temperature=0.0)])
        try:
            alone = llm.generate(SYSTEM, _prompt(3), schema=ACTION_SCHEMA_BYTES, max_tokens=48, temperature=0.0)
        except InvalidOutput as cut:  # cut off mid-JSON at 48 tokens: the text so far is what is compared
            alone = cut.generation
        assert greedy[0].generation.text == alone.text
    finally:
        decoder.close()
        step_by_step.close()


def test_the_prefix_is_kept_between_batches(llm: LlamaBackend) -> None:
    decoder = BatchDecoder(llm)
    try:
        first = decoder.generate(_requests(3))
        again = decoder.generate(_requests(3))
        plain = decoder.generate(_requests(3), reuse_prefix=False)
    finally:
        decoder.close()
    prefix = first[0].work.shared_tokens
    assert prefix > 100 and first[0].work.kept_tokens == 0
    assert all(o.work.kept_tokens == prefix and o.work.shared_tokens == 0 for o in again)
    assert all(o.work.own_tokens == o.generation.prompt_tokens for o in plain)
    assert [o.generation.text for o in again] == [o.generation.text for o in first], "same seeds, same output"


def thinkers(tmp: Path, agents: list[str]) -> tuple[LmdbLedger, Buckets]:
    """A ledger under ``tmp`` with an account for each of ``agents``, and buckets that admit many thinks."""
    ledger = LmdbLedger(tmp / "ledger")
    buckets = Buckets()
    for agent in agents:
        ledger.apply(OpenAccount(id=f"open:{agent}", account=agent, grants={"cpu_rate": 1000}))
        buckets.add(agent, "cpu", 10.0, 100.0)
        buckets.add(agent, "llm_tokens", 1e6, 1e7)
    return ledger, buckets


def _economy_run(
    tmp: Path, batches: list[tuple[list[str], ThinkBatch]]
) -> tuple[list[list[RecordUsage]], list[ThinkBatchReport]]:
    """Run the batches one after another through ``Economy.run_batch``; each batch's usage records
    (checked to sum to its measured CPU) and report."""
    ledger, buckets = thinkers(tmp, AGENTS)
    measured: list[int] = []
    reports: list[ThinkBatchReport] = []

    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            eco = Economy(pool, ledger, buckets, Estimator(0.01))
            for agents, spec in batches:
                out, report = await asyncio.wait_for(eco.run_batch(agents, spec), 120)
                assert out.usage is not None
                measured.append(round(out.usage.cpu_seconds * 1e6))
                reports.append(report)

    try:
        asyncio.run(main())
        records = sorted(ledger.usage_records(), key=lambda r: r.task_id)
        assert check(ledger).ok
    finally:
        ledger.close()
    by_batch: dict[str, list[RecordUsage]] = {}
    for r in records:
        by_batch.setdefault(r.batch, []).append(r)
    out = [sorted(rs, key=lambda r: int(r.task_id.rsplit(".", 1)[1])) for rs in by_batch.values()]
    out.sort(key=lambda rs: int(rs[0].batch.rsplit("-b", 1)[1]))
    for rs, total in zip(out, measured, strict=True):  # every batch's charges sum to its measured CPU exactly
        assert sum(round(r.cpu_seconds * 1e6) for r in rs) == total
    return out, reports


def _batch(model: Path, n: int, reuse: bool = True, seed: int = 0, max_tokens: int = MAX_TOKENS) -> ThinkBatch:
    thinks = [
        Think(
            system=SYSTEM,
            prompt=_prompt(i),
            schema=ACTION_SCHEMA_BYTES,
            max_tokens=max_tokens,
            seed=seed + i,
            model=str(model),
        )
        for i in range(n)
    ]
    return ThinkBatch(thinks=thinks, reuse_prefix=reuse)


def test_charges_sum_to_the_batchs_measured_cpu_exactly(gguf: Path, tmp_path: Path) -> None:
    (records,), (report,) = _economy_run(tmp_path, [(AGENTS, _batch(gguf, 8))])
    assert all(r.valid for r in report.reports), report.reports
    assert [r.agent for r in records] == AGENTS
    assert len({r.batch for r in records}) == 1 and records[0].batch
    assert all(r.kind == "think" and r.ok and r.llm_tokens > 0 and r.cpu_seconds > 0 for r in records)


def test_reusing_a_prefix_is_charged_less_than_evaluating_it(gguf: Path, tmp_path: Path) -> None:
    four = AGENTS[:4]
    # The first batch evaluates the prefix and keeps it; the second starts from it; the third, with the
    # same prompts and seeds as the second, evaluates everything again. A few tokens each, so that the
    # prompts' evaluation is most of the work (the tiny model's decoding is mostly sampling).
    (fresh, kept, plain), _ = _economy_run(
        tmp_path,
        [
            (four, _batch(gguf, 4, seed=50, max_tokens=8)),
            (four, _batch(gguf, 4, max_tokens=8)),
            (four, _batch(gguf, 4, reuse=False, max_tokens=8)),
        ],
    )
    assert fresh[0].cpu_seconds > 0
    for k, p in zip(kept, plain, strict=True):
        assert k.agent == p.agent and k.llm_tokens == p.llm_tokens  # the same think, token for token
        assert k.cpu_seconds < p.cpu_seconds, (k, p)


def test_a_think_batch_through_the_pool_reports_every_think(tiny: Path) -> None:
    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            out = await pool.run(_batch(tiny, 8))
            report = decode_think_batch(out.output)
            assert len(report.reports) == len(report.work) == 8
            for r in report.reports:
                assert r.valid and r.finish_reason == "stop"
                parse_action(r.text)

    asyncio.run(main())


def test_a_cancelled_batch_charges_each_agent_what_its_sequence_spent(tiny: Path, tmp_path: Path) -> None:
    """Cancelling the caller stops the whole batch between two decode steps; the work each sequence had
    done splits what the batch used, exactly, in records marked cancelled."""
    four = AGENTS[:4]
    ledger, buckets = thinkers(tmp_path, four)
    # Free text, greedy: the random model runs to max_tokens on three of these four prompts (seconds),
    # long enough to be stopped.
    thinks = [
        Think(system=SYSTEM, prompt=_prompt(i), max_tokens=1300, temperature=0.0, model=str(tiny)) for i in range(4)
    ]
    spec = ThinkBatch(thinks=thinks)

    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            eco = Economy(pool, ledger, buckets, Estimator(0.01))
            await eco.run_batch(four[:1], _batch(tiny, 1, max_tokens=4))  # the worker loads the model
            running = asyncio.create_task(eco.run_batch(four, spec))
            await wait_until(lambda: pool.status().busy == 1, 30)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running

    try:
        asyncio.run(main())
        records = sorted((r for r in ledger.usage_records() if r.error), key=lambda r: r.task_id)
        assert check(ledger).ok
    finally:
        ledger.close()
    assert [r.agent for r in records] == four
    assert all(not r.ok and r.error == "cancelled" and r.batch == records[0].batch for r in records)
    assert all(r.cpu_seconds > 0 for r in records), records


def test_an_agents_kept_prompt_spares_it_all_but_what_changed(llm: LlamaBackend) -> None:
    decoder = BatchDecoder(llm, kept_max=4)
    keys = ["a0", "a1", "a2"]
    try:
        first = decoder.generate(_requests(3), keys=keys)
        # The same agents, their prompts grown by a line at the end: only that line (and the chat
        # template's closing tokens after it) is evaluated.
        later = [
            Request(SYSTEM, _prompt(i) + "\nTime: 10:01", ACTION_SCHEMA_BYTES, MAX_TOKENS, seed=i) for i in range(3)
        ]
        again = decoder.generate(later, keys=keys)
        # A fourth and fifth agent: the least recently used kept prompt (a0's, then a1's) makes room.
        decoder.generate(_requests(2), keys=["a3", "a4"])
        after = decoder.generate(later[:1], keys=["a0"])
    finally:
        decoder.close()
    for f, a in zip(first, again, strict=True):
        assert f.generation.prompt_tokens - 20 < a.work.kept_tokens < f.generation.prompt_tokens
        assert a.work.shared_tokens == 0
        assert a.work.own_tokens == a.generation.prompt_tokens - a.work.kept_tokens < 40
    assert after[0].work.kept_tokens < first[0].generation.prompt_tokens  # a0's own prompt was dropped


def _long_and_short(model: Path, n: int, long_tokens: int) -> ThinkBatch:
    """Think 0 free text, greedy, ``long_tokens`` long (a random model runs to ``max_tokens``; SmolLM2
    rambles), the others short actions: think 0 is still decoding when the others end."""
    first = Think(system=SYSTEM, prompt=_prompt(0), max_tokens=long_tokens, temperature=0.0, model=str(model))
    return ThinkBatch(thinks=[first, *_batch(model, n, seed=1).thinks[1:]])


def test_a_think_stopped_inside_its_batch_ends_and_the_others_finish(llm: LlamaBackend) -> None:
    decoder = BatchDecoder(llm)
    asked = 0

    def stopped() -> set[int]:
        nonlocal asked
        asked += 1
        return {0} if asked > 10 else set()  # from the 11th decode step on

    spec = _long_and_short(Path(llm.path), 4, 1300)
    requests = [Request(t.system, t.prompt, t.schema or None, t.max_tokens, t.temperature, t.seed) for t in spec.thinks]
    try:
        outcomes = decoder.generate(requests, stopped=stopped)
    finally:
        decoder.close()
    stopped_one, others = outcomes[0], outcomes[1:]
    assert stopped_one.generation.finish_reason == "cancelled" and stopped_one.error.startswith("cancelled")
    assert stopped_one.work.decode_steps == 10 and stopped_one.generation.completion_tokens == 11
    for o in others:
        assert o.error == "" and o.generation.finish_reason == "stop", o
        parse_action(o.generation.text)
        assert o.work.decode_steps > 10  # they went on after it stopped


def test_a_think_stopped_through_the_pool_is_charged_its_part(gguf: Path) -> None:
    """``WorkerPool.stop_think`` reaches the worker while its batch decodes: that think ends
    ``cancelled`` with what it spent, the others finish valid, and the batch's CPU splits exactly by
    the work each did, the stopped think's decode steps ending where it stopped."""

    async def main() -> None:
        async with WorkerPool(size=1) as pool:
            await pool.run(_batch(gguf, 1, max_tokens=4))  # the worker loads the model
            task = pool.begin(_long_and_short(gguf, 4, 1300))
            await wait_until(lambda: pool.status().busy == 1, 30)
            assert pool.stop_think(task.task_id, 0)
            assert not pool.stop_think(task.task_id, 4)  # no such think
            out = await asyncio.wait_for(task.ended, 120)
            assert not pool.stop_think(task.task_id, 0)  # ended
            report = decode_think_batch(out.output)
            first, *others = report.reports
            assert first.finish_reason == "cancelled" and not first.valid and first.completion_tokens < 1300
            for r in others:
                assert r.valid and r.finish_reason == "stop", r
                parse_action(r.text)
            assert out.usage is not None
            shares = split_usage(out.usage, report)
            total = round(out.usage.cpu_seconds * 1e6)
            assert sum(round(s.cpu_seconds * 1e6) for s in shares) == total
            # Its last token was sampled, not evaluated: it took part in one decode step fewer.
            assert report.work[0].decode_steps == first.completion_tokens - 1

    asyncio.run(main())


def test_a_batch_is_in_flight_with_its_agents_until_every_share_is_durable(tiny: Path, tmp_path: Path) -> None:
    three = AGENTS[:3]
    ledger, buckets = thinkers(tmp_path, three)
    seen: list[InFlight] = []

    async def main() -> None:
        inflight = InflightLog(tmp_path / "inflight")
        async with WorkerPool(size=1, inflight=inflight) as pool:
            eco = Economy(pool, ledger, buckets, Estimator(0.01))
            spec = _batch(tiny, 3, max_tokens=4)
            # Sent to the idle worker within ``begin``: its record is durable before the worker sees it.
            await asyncio.wait_for(eco.run_batch(three, spec, sent=lambda _: seen.extend(inflight.pending())), 120)
        inflight.close()
        left = InflightLog(tmp_path / "inflight", readonly=True)
        try:
            assert left.pending() == []  # cleared once the three shares were durable
        finally:
            left.close()

    try:
        asyncio.run(main())
        records = list(ledger.usage_records())
    finally:
        ledger.close()
    (rec,) = seen
    assert rec.kind == "think_batch" and rec.sharers == three and rec.agent == three[0]
    assert sorted(r.task_id for r in records) == [f"{rec.task_id}.{i}" for i in range(3)]


def test_a_batch_left_in_flight_by_a_killed_supervisor_is_split_among_its_agents_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(CONFIG.format(data=data, cgroups="off", think=20, prefetch=0))
    agents = ["alpha", "beta", "gamma"]
    batch = finished_task("dead-b1", "think_batch", 0.300001, sharers=agents)

    def start() -> str:
        proc = _start("--config", str(cfg), "--duration", "1", "--no-live")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return out

    (data / "run").mkdir(parents=True)
    leave_in_flight(data, [batch])
    out = start()
    with LmdbLedger(data / "ledger") as ledger:
        assert check(ledger).ok
        shares = [ledger.usage(f"dead-b1.{i}") for i in range(3)]
    assert all(s is not None for s in shares), out
    assert [s.agent for s in shares if s] == agents
    assert all(s.batch == "dead-b1" and s.error == CRASH_CODE and s.kind == "think" for s in shares if s)
    # Equal shares in integer microseconds, summing to the batch's exactly (the remainder to one of them).
    assert sum(round(s.cpu_seconds * 1e6) for s in shares if s) == 300001
    assert sorted(round(s.cpu_seconds * 1e6) for s in shares if s) == [100000, 100000, 100001]
    assert sum(f"recovered task dead-b1.{i} " in out for i in range(3)) == 3, out

    leave_in_flight(data, [batch])  # as if the record's drop had been lost to a second kill: nothing is charged again
    out = start()
    assert "recovered task" not in out, out
    with LmdbLedger(data / "ledger") as ledger:
        assert sum(r.task_id.startswith("dead-b1") for r in ledger.usage_records()) == 3


def test_scattered_agents_decode_in_consecutive_streams_with_their_kept_prompts(llm: LlamaBackend) -> None:
    """llama.cpp computes a step's rows together only for consecutive streams: a batch of agents whose
    kept prompts lie scattered gets consecutive streams (the kept prompts moved, none lost), and every
    decode step is one computation, also after some sequences finished."""
    decoder = BatchDecoder(llm, kept_max=8)
    fresh = BatchDecoder(llm, kept_max=8)
    keys = [f"a{i}" for i in range(8)]
    odd = [7, 1, 5, 3]  # kept in streams 8, 2, 6, 4: out of order, with gaps
    # Greedy, different lengths: sequences end at different steps, a1 first (in stream 2 of 1-4: a gap
    # the decoder closes).
    lengths = {7: 16, 1: 6, 5: 11, 3: 21}
    later = [Request(SYSTEM, _prompt(i) + "\nTime: 10:01", None, lengths[i], temperature=0.0) for i in odd]
    try:
        decoder.generate(_requests(8), keys=keys)
        moved = decoder.generate(later, keys=[keys[i] for i in odd])
        phases = decoder.phases
        alone = fresh.generate(later)
        again = decoder.generate(_requests(8), keys=keys)  # every agent's kept prompt is still its own
    finally:
        decoder.close()
        fresh.close()
    assert phases.stream_copies > 0
    assert phases.decode_steps == max(o.work.decode_steps for o in moved) > min(o.work.decode_steps for o in moved)
    assert phases.decode_ubatches == phases.decode_steps, "a step split into several computations"
    for m, a in zip(moved, alone, strict=True):
        assert m.work.kept_tokens > m.work.own_tokens, "its kept prompt was reused"
        assert m.generation.text == a.generation.text, "the moved prompt is the prompt it was"
    for i, o in enumerate(again):
        prompt = o.generation.prompt_tokens
        # The agents of ``odd`` kept their latest prompt (which differs at the end), the others the same one.
        assert o.work.kept_tokens == prompt - 1 if i not in odd else prompt - 20 < o.work.kept_tokens < prompt
