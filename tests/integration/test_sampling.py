"""The sampler both generation paths share (``native.sampling``), with real llama.cpp: the tiny random
model and SmolLM2. The grammar checks the token drawn and is applied to every candidate only when it
refuses it; what is kept always matches the schema, greedy decoding picks what grammar-first sampling
picks, and a refused token is drawn again from the likeliest tokens the grammar allows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from native import sampling
from native.llama import LlamaBackend
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
    assert checked._candidates.refused > 0  # the grammar did refuse tokens the chain drew


def test_a_refused_token_is_drawn_again_from_what_the_grammar_allows(
    checked: LlamaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a refusal the grammar sees the most likely tokens first, and every token only when it
    allows none of them: with 4 most likely tokens both happen, and every completion matches the
    schema (``generate`` checks it)."""
    monkeypatch.setattr(sampling, "REFUSED_TOP", 4)
    for seed in range(3):
        gen = checked.generate(SYSTEM, _prompt(seed), schema=ACTION_SCHEMA_BYTES, max_tokens=300, seed=seed)
        assert gen.finish_reason == "stop", gen
    counts = checked._candidates
    assert 0 < counts.full_passes < counts.refused, (counts.full_passes, counts.refused)


def test_a_completion_is_compact_json_that_ends_with_its_closing_brace(checked: LlamaBackend) -> None:
    """The grammar allows no whitespace between the JSON's tokens (``compact_grammar``), and the completion
    ends with the brace that closes the action: no decode step is spent on what follows it."""
    for seed in range(4):
        gen = checked.generate(SYSTEM, _prompt(seed), schema=ACTION_SCHEMA_BYTES, max_tokens=300, seed=seed)
        parse_action(gen.text)
        assert gen.finish_reason == "stop" and gen.text.endswith("}"), gen
        assert gen.text == msgspec.json.encode(msgspec.json.decode(gen.text)).decode(), gen  # no space outside strings


def test_the_json_scan_skips_brackets_inside_strings(checked: LlamaBackend) -> None:
    """Brackets and escaped quotes inside a string do not end the completion; the closing brace does."""
    c = checked.completion(ACTION_SCHEMA_BYTES, max_tokens=100, temperature=0.0, seed=0, stops=[])
    try:
        pieces = [b'{"a":"x}', b'\\"]', b'{",', b'"b":[1,', b"{}]", b"}"]
        assert [c._closes(p) for p in pieces] == [False, False, False, False, False, True]
    finally:
        c.sampler.close()


def test_forced_text_is_what_step_by_step_sampling_writes(checked: LlamaBackend) -> None:
    """``Forcing`` claims a byte only where the grammar admits no other: at every byte of completions
    sampled one token at a time, the text it says is forced there is the text that follows. And it
    claims much: the keys and punctuation of an action, most of its bytes."""
    import llama_cpp

    from native.llama import parse_schema

    parsed = parse_schema(ACTION_SCHEMA_BYTES)
    assert parsed is not None
    forcing = checked.forcing
    forced_bytes = total = 0
    for seed in range(4):
        text = checked.generate(SYSTEM, _prompt(seed), schema=ACTION_SCHEMA_BYTES, max_tokens=300, seed=seed).text
        raw = text.encode()
        grammar = checked._grammar(*parsed)
        try:
            claims = []
            for i, byte in enumerate(raw):
                probe = llama_cpp.llama_sampler_clone(grammar)
                try:
                    claims.append(forcing.force(probe, len(raw)))
                finally:
                    llama_cpp.llama_sampler_free(probe)
                assert raw[i:].startswith(claims[-1]), (raw, i, claims[-1])
                llama_cpp.llama_sampler_accept(grammar, forcing.byte_token[byte])
        finally:
            llama_cpp.llama_sampler_free(grammar)
        assert claims[0] == b'{"kind":"', claims[0]  # nothing to choose before the kind
        assert b"" in claims  # and somewhere a choice: the kind, a value
        forced_bytes += sum(1 for c in claims if c)
        total += len(raw)
    assert forced_bytes > total / 2, (forced_bytes, total)


def test_forced_bytes_are_carried_by_the_tokenizers_own_tokens(checked: LlamaBackend) -> None:
    """The token drawn last and the forced bytes after it are tokenized together, giving back exactly
    their bytes; a drawn token that is part of a UTF-8 character keeps its place, the bytes follow it."""
    forcing = checked.forcing
    (drawn,) = checked.llm.tokenize(b'"', add_bos=False)
    tokens = forcing.tokens(drawn, b'inner":"')  # "in" and "er" are merges of both test vocabularies
    assert b"".join(forcing.piece(t) for t in tokens) == b'"inner":"'
    assert len(tokens) < len(b'"inner":"'), "merged into the tokenizer's longer tokens"
    assert b"".join(forcing.piece(t) for t in forcing.tokens(-1, b'{"kind":"')) == b'{"kind":"'
    lead = forcing.byte_token.get(0xC3)
    if lead is not None:  # a byte-level vocabulary (SmolLM2's): half a character, then ASCII
        tokens = forcing.tokens(lead, b'","')
        assert tokens[0] == lead and b"".join(forcing.piece(t) for t in tokens) == b'\xc3","'
