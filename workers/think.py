"""The ``think`` task handler: one constrained generation with the worker's local model.

Each worker process keeps its models loaded (``LlamaBackend``, one per model path, ``n_threads=1``),
so only the first ``think`` of a worker pays for loading; the cost of that load is part of that task's
measured CPU, as it should be.

The output is a ``runtime.protocol.ThinkReport`` (msgpack). A completion that does not match the schema
is not a task failure: the tokens were spent and are charged; ``valid`` is false and ``error`` says
why, so that the agent can be told. Errors that are not
about the completion (no model, unusable schema, prompt longer than the context) raise.

The default model (``Think.model`` empty) is ``AECO_LLM_MODEL`` from the environment if set (the
supervisor passes ``llm.model`` that way), else what ``native.models.find_model`` finds.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import msgspec

from native.llama import InvalidOutput, LlamaBackend
from native.models import find_model
from native.openai import OpenAIBackend, Price
from runtime.protocol import Think, ThinkReport
from workers.tasks import TaskCancelled

#: Environment variable naming the worker's default GGUF (workers inherit the supervisor's environment).
MODEL_ENV = "AECO_LLM_MODEL"
#: Context window of the worker's models.
N_CTX = 2048

_backends: dict[Path, LlamaBackend] = {}


@atexit.register
def _free_models() -> None:
    while _backends:
        _backends.popitem()[1].close()


_encoder = msgspec.msgpack.Encoder()


def backend(model: str = "") -> LlamaBackend:
    """This process's backend for ``model`` (a path; empty: the default), loaded on first use."""
    path = find_model(model or os.environ.get(MODEL_ENV) or None).resolve()
    loaded = _backends.get(path)
    if loaded is None:
        loaded = _backends[path] = LlamaBackend(path, n_threads=1, n_ctx=N_CTX)
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
