"""The sampler both generation paths share (``native.sampling``), with real llama.cpp: the tiny random
model and SmolLM2. The grammar checks the token drawn and is applied to every candidate only when it
refuses it; what is kept always matches the schema, greedy decoding picks what grammar-first sampling
picks, and the allowed-token sets kept between refusals change nothing but the cost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from native.llama import Generation, LlamaBackend
from runtime.agents.loop import DEFAULT_PERSONA, RULES
from runtime.agents.schema import ACTION_SCHEMA_BYTES, parse_action

SYSTEM = f"{DEFAULT_PERSONA}\n{RULES}"


def _prompt(i: int) -> str:
    return f"You are a{i}.\nOther agents: a1, a2, a3\nNews: none\nScrip: {10 + i}.\nReply with one action as JSON."


def _backend(gguf: Path, grammar_first: bool = False) -> Iterator[LlamaBackend]:
    llm = LlamaBackend(gguf, n_threads=1, grammar_first=grammar_first)
    try:
        yield llm
    finally:
        llm.close()


@pytest.fixture
def checked(gguf: Path) -> Iterator[LlamaBackend]:
    yield from _backend(gguf)


@pytest.fixture
def grammar_first(gguf: Path) -> Iterator[LlamaBackend]:
    yield from _backend(gguf, grammar_first=True)


def test_greedy_picks_what_grammar_first_picks(checked: LlamaBackend, grammar_first: LlamaBackend) -> None:
    """An allowed argmax is the argmax of the allowed: checking only the token drawn changes nothing
    when decoding greedily, token for token, refusals included."""
    for i in range(2):
        a = checked.generate(SYSTEM, _prompt(i), schema=ACTION_SCHEMA_BYTES, max_tokens=300, temperature=0.0)
        b = grammar_first.generate(SYSTEM, _prompt(i), schema=ACTION_SCHEMA_BYTES, max_tokens=300, temperature=0.0)
        assert a == b
        parse_action(a.text)
    # The grammar did refuse tokens the chain drew (and the sets it allowed instead were kept).
    assert checked._candidates.allowed


def test_kept_allowed_sets_change_no_token(checked: LlamaBackend) -> None:
    """A seeded think samples the same text whether the allowed sets at its refusals were kept from
    earlier thinks or found by applying the grammar to every token; every text is an action."""

    def think(seed: int) -> Generation:
        checked.llm.reset()  # type: ignore[no-untyped-call]  # the whole prompt evaluated each time: the same logits, to the bit
        return checked.generate(SYSTEM, _prompt(seed), schema=ACTION_SCHEMA_BYTES, max_tokens=300, seed=seed)

    seeds = [3, 4, 5]
    cold = []
    for seed in seeds:
        checked._candidates.allowed.clear()
        cold.append(think(seed))
    for seed in seeds:  # other thinks fill the sets
        think(seed + 10)
    kept = len(checked._candidates.allowed)
    warm = [think(seed) for seed in seeds]
    assert kept > 0
    assert warm == cold
    for gen in warm:
        assert gen.finish_reason == "stop", gen
        parse_action(gen.text)
