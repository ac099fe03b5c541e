"""The ``think`` task handler: one constrained generation with the worker's local model.

Each worker process keeps its models loaded (``LlamaBackend``, one per model path, ``n_threads=1``),
so only the first ``think`` of a worker pays for loading; the cost of that load is part of that task's
measured CPU, as it should be.

The output is a ``runtime.protocol.ThinkReport`` (msgpack). A completion that does not match the schema
is not a task failure: the tokens were spent and are charged; ``valid`` is false and ``error`` says
why, so that the agent can be told. Errors that are not
about the completion (no model, unusable schema, prompt longer than the context) raise.

The ``think_batch`` task decodes several thinks together in one context (``native.batch``), with the
same model and one ``getrusage`` delta for the whole batch (measured by the worker as for any task);
it returns each think's report and the work each caused, by which the supervisor splits that CPU.

A think of a running batch can be stopped alone (``runtime.protocol.StopThink``, read between two
decode steps): its sequence ends there, its report says ``cancelled`` and what it spent, and the
others finish.

The default model (``Think.model`` empty) is ``AECO_LLM_MODEL`` from the environment if set (the
supervisor passes ``llm.model`` that way), else what ``native.models.find_model`` finds.
``AECO_GRAMMAR_FIRST=1`` makes the worker's backends apply the grammar to every candidate token before
sampling (``native.sampling``), as llama-cpp-python does: the slower baseline ``benchmarks think`` keeps.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Collection
from pathlib import Path

import msgspec

from native.batch import BatchDecoder, Request
from native.llama import InvalidOutput, LlamaBackend
from native.models import find_model
from native.openai import OpenAIBackend, Price
from runtime.protocol import Think, ThinkBatch, ThinkBatchReport, ThinkReport
from workers.tasks import TaskCancelled

#: Environment variable naming the worker's default GGUF (workers inherit the supervisor's environment).
MODEL_ENV = "AECO_LLM_MODEL"
#: Environment variable that, set to ``1``, makes this worker sample grammar-first (a benchmark's baseline).
GRAMMAR_FIRST_ENV = "AECO_GRAMMAR_FIRST"
#: Context window of the worker's models.
N_CTX = 2048
#: Agents whose last prompt a worker keeps for their next batched think (a context stream each: with
#: SmolLM2 and 1,024-cell streams, 24 MB apiece).
KEPT_MAX = 8

_backends: dict[Path, LlamaBackend] = {}
#: One batch context per model, made on the first ``think_batch`` (it holds the kept prefix).
_decoders: dict[Path, BatchDecoder] = {}


@atexit.register
def _free_models() -> None:
    while _decoders:  # a context before its model
        _decoders.popitem()[1].close()
    while _backends:
        _backends.popitem()[1].close()


_encoder = msgspec.msgpack.Encoder()


def backend(model: str = "") -> LlamaBackend:
    """This process's backend for ``model`` (a path; empty: the default), loaded on first use."""
    path = find_model(model or os.environ.get(MODEL_ENV) or None).resolve()
    loaded = _backends.get(path)
    if loaded is None:
        grammar_first = os.environ.get(GRAMMAR_FIRST_ENV) == "1"
        loaded = _backends[path] = LlamaBackend(path, n_threads=1, n_ctx=N_CTX, grammar_first=grammar_first)
    return loaded


def think(spec: Think) -> bytes:
    """Run one generation and return its ``ThinkReport`` (msgpack)."""
    llm: LlamaBackend | OpenAIBackend
    if spec.endpoint:
        price = Price(spec.price_prompt_per_1k, spec.price_completion_per_1k)
        llm = OpenAIBackend(spec.endpoint, spec.model, prices={spec.model: price})
    else:
        llm = backend(spec.model)
    try:
        gen = llm.generate(
            spec.system,
            spec.prompt,
            schema=spec.schema or None,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            seed=spec.seed,
        )
    except InvalidOutput as exc:
        g = exc.generation
        out = ThinkReport(g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason, False, exc.reason, g.cost_usd)
    except TaskCancelled as exc:
        if isinstance(llm, LlamaBackend):  # the tokens it spent, prompt and completion so far, in one count
            spent = ThinkReport("", llm.interrupted_tokens, 0, "cancelled", False, str(exc))
            raise TaskCancelled(str(exc), _encoder.encode(spent)) from None
        raise
    else:
        out = ThinkReport(gen.text, gen.prompt_tokens, gen.completion_tokens, gen.finish_reason, cost_usd=gen.cost_usd)
    return _encoder.encode(out)


def think_batch(spec: ThinkBatch, stopped: Callable[[], Collection[int]] | None = None) -> bytes:
    """Decode the thinks together and return their ``ThinkBatchReport`` (msgpack).

    ``stopped`` (asked before every decode step) names the thinks to stop now; each ends there with a
    ``cancelled`` report of what it spent, and the others go on. A cancel of the task stops the whole
    batch: ``TaskCancelled`` carries a report with what each sequence had spent (its prompt and the
    tokens generated so far), so that each agent is charged its part.
    """
    first = spec.thinks[0]
    for t in spec.thinks:
        if t.endpoint or t.model != first.model:
            raise ValueError("a think_batch runs on one local model: no endpoint, and the same model for every think")
    llm = backend(first.model)
    decoder = _decoders.get(llm.path)
    if decoder is None:
        decoder = _decoders[llm.path] = BatchDecoder(llm, max_ctx_seq=N_CTX, kept_max=KEPT_MAX)
    requests = [Request(t.system, t.prompt, t.schema or None, t.max_tokens, t.temperature, t.seed) for t in spec.thinks]
    try:
        outcomes = decoder.generate(requests, reuse_prefix=spec.reuse_prefix, keys=spec.keys, stopped=stopped)
    except TaskCancelled as exc:
        work = decoder.progress  # set before anything is evaluated, one per think
        spent = [
            ThinkReport(
                "",
                w.own_tokens + w.shared_tokens + w.kept_tokens,
                w.decode_steps + w.forced_tokens,
                "cancelled",
                False,
                str(exc),
            )
            for w in work
        ]
        raise TaskCancelled(str(exc), _encoder.encode(ThinkBatchReport(spent, work))) from None
    reports = [
        ThinkReport(
            o.generation.text,
            o.generation.prompt_tokens,
            o.generation.completion_tokens,
            o.generation.finish_reason,
            not o.error,
            o.error,
        )
        for o in outcomes
    ]
    return _encoder.encode(ThinkBatchReport(reports, [o.work for o in outcomes]))
