"""Agent memory on real qdrant-client local mode, with the worker's embedders.

Vectors come from ``native.embed`` as a worker would compute them; the store never embeds.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from native.embed import (
    DIM,
    EmbedderUnavailable,
    HashEmbedder,
    MiniLmEmbedder,
    embed,
    get_embedder,
    minilm_missing,
)
from runtime.pool import TaskFailed, WorkerPool
from runtime.protocol import Embed
from runtime.world.memory import (
    BYTES_PER_DIM,
    MAX_TEXT_BYTES,
    MemoryItem,
    MemoryQuotaExceeded,
    MemoryStoreError,
)
from runtime.world.memory.qdrant import QdrantMemory
from tests.integration.conftest import with_pool

H = HashEmbedder()
BIG = 1 << 30


def vec(text: str) -> list[float]:
    return H.embed_one(text)


def size_of(text: str) -> int:
    return len(text.encode()) + BYTES_PER_DIM * DIM


@pytest.fixture
def mem(tmp_path: Path):
    m = QdrantMemory(tmp_path / "memory")
    yield m
    m.close()


# ------------------------------------------------------------------------------------ embedders


def test_hash_embedder_is_deterministic_normalised_and_fast():
    texts = [f"agent {i} traded {i * 7} scrip for cpu rate with agent {i + 1}" for i in range(2000)]
    t0 = time.perf_counter()
    a = H.embed(texts)
    per_text_us = (time.perf_counter() - t0) / len(texts) * 1e6
    print(f"\nhash embedder: {per_text_us:.1f} µs per text ({len(texts[0].split())} words)")
    assert a == HashEmbedder().embed(texts)  # a fresh instance: nothing depends on state or hash salt
    assert all(len(v) == DIM and math.isclose(math.fsum(x * x for x in v), 1.0) for v in a[:50])
    # Word order matters through the bigrams, case does not.
    assert vec("The Cat sat") == vec("the cat sat") != vec("sat cat the")
    # No text maps to the zero vector, not even one with no words.
    for t in ("", "   ", "!!!", "—"):
        assert math.isclose(math.fsum(x * x for x in vec(t)), 1.0)


def test_hash_embedder_is_deterministic_across_processes():
    # Python's own hash() is salted per process; the embedder must not be.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        there = pool.apply(_embed_in_child, ("memories are vectors",))
    assert there == vec("memories are vectors")


def _embed_in_child(text: str) -> list[float]:
    return HashEmbedder().embed_one(text)


def test_embed_task_output_is_msgpack_of_vectors():
    texts = ["first text", "second, different text", "first text"]
    out = msgspec.msgpack.decode(embed(Embed(texts=texts)), type=list[list[float]])
    assert len(out) == 3 and all(len(v) == DIM for v in out)
    assert out[0] == out[2] == vec("first text")
    with pytest.raises(EmbedderUnavailable, match="unknown embedder 'nope'; known: hash, minilm"):
        embed(Embed(texts=["x"], embedder="nope"))


def test_embed_task_in_a_real_worker():
    async def body(pool: WorkerPool) -> tuple[bytes, str]:
        ok = await pool.run(Embed(texts=["hello world", "memories"]))
        try:
            await pool.run(Embed(texts=["x"], embedder="nope"))
        except TaskFailed as exc:
            return ok.output, str(exc)
        raise AssertionError("an unknown embedder must fail the task")

    output, error = with_pool(body, size=1)
    assert msgspec.msgpack.decode(output, type=list[list[float]]) == H.embed(["hello world", "memories"])
    assert "EmbedderUnavailable: unknown embedder 'nope'" in error


def test_minilm_without_its_packages_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(EmbedderUnavailable, match=r"not installed: .*onnxruntime.*; install them with: pip install"):
        MiniLmEmbedder()


def test_minilm_is_optional():
    missing = minilm_missing()
    if missing:
        with pytest.raises(EmbedderUnavailable, match="pip install"):
            get_embedder("minilm")
        pytest.skip(f"minilm packages not installed: {missing}")
    m = get_embedder("minilm")
    cat, kitten, stocks = m.embed(["the cat sat on the mat", "a kitten rested on the rug", "stock prices fell"])
    assert len(cat) == DIM and math.isclose(math.fsum(x * x for x in cat), 1.0, rel_tol=1e-5)
    # Meaning, not words: no word in common, yet closer than an unrelated sentence.
    assert _dot(cat, kitten) > _dot(cat, stocks) + 0.2
    t0 = time.perf_counter()
    m.embed([f"sentence number {i} about agents and scrip" for i in range(50)])
    print(f"\nminilm: {(time.perf_counter() - t0) / 50 * 1e3:.2f} ms per text")


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------- memory

NOTES = [
    "alice sells cpu rate for scrip at a good price",
    "bob wrote a sorting artifact in python",
    "the weather was cold and rainy today",
    "cpu rate is cheap when alice sells it for scrip",
    "remember to pay bob for the sorting artifact",
]


def test_remember_recall_round_trip(mem: QdrantMemory):
    items = [mem.remember("alice", t, vec(t), quota_bytes=BIG) for t in NOTES]
    assert [i.text for i in items] == NOTES and len({i.id for i in items}) == len(NOTES)
    assert all(i.agent == "alice" and i.size_bytes == size_of(i.text) and i.at <= time.time() for i in items)
    assert mem.count("alice") == len(NOTES)

    for t in NOTES:  # every text recalls itself first, with similarity 1
        top = mem.recall("alice", vec(t), k=3)
        assert top[0].item.text == t and math.isclose(top[0].score, 1.0, abs_tol=1e-5)
        assert top[0].item in items
        assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)

    # Word overlap ranks related notes above unrelated ones.
    ranked = [r.item.text for r in mem.recall("alice", vec("buying cpu rate from alice for scrip"), k=5)]
    assert set(ranked[:2]) == {NOTES[0], NOTES[3]}
    assert ranked.index(NOTES[2]) >= 2
    ranked = [r.item.text for r in mem.recall("alice", vec("the sorting artifact bob wrote"), k=2)]
    assert set(ranked) == {NOTES[1], NOTES[4]}
    assert len(mem.recall("alice", vec("anything"), k=100)) == len(NOTES)


def test_agents_are_isolated(mem: QdrantMemory):
    secret = mem.remember("alice", "the vault code is 1234", vec("the vault code is 1234"), quota_bytes=BIG)
    mem.remember("bob", "bob likes sorting", vec("bob likes sorting"), quota_bytes=BIG)
    recalled = mem.recall("bob", vec("the vault code is 1234"), k=10)
    assert [r.item.text for r in recalled] == ["bob likes sorting"]
    assert mem.recall("carol", vec("the vault code is 1234")) == []  # no collection yet: nothing, no error
    with pytest.raises(MemoryStoreError) as err:  # another agent's id does not exist for bob
        mem.forget("bob", secret.id)
    assert err.value.code == "not_found"
    assert mem.count("alice") == 1 and mem.used_bytes("bob") == size_of("bob likes sorting")
    assert mem.used_bytes("carol") == 0 and mem.count("carol") == 0


def test_quota_refusal_stores_nothing_and_usage_is_exact(mem: QdrantMemory):
    a, b = "first memory", "second memory, a bit longer"
    quota = size_of(a) + size_of(b)
    mem.remember("alice", a, vec(a), quota_bytes=quota)
    assert mem.used_bytes("alice") == size_of(a)
    with pytest.raises(MemoryQuotaExceeded) as err:
        mem.remember("alice", b + "!", vec(b + "!"), quota_bytes=quota)  # one byte too many
    assert err.value.code == "quota_exceeded" and isinstance(err.value, MemoryStoreError)
    assert (err.value.used, err.value.size, err.value.quota) == (size_of(a), size_of(b) + 1, quota)
    assert not isinstance(err.value, MemoryError)  # never confused with running out of RAM
    assert mem.used_bytes("alice") == size_of(a) and mem.count("alice") == 1
    assert [r.item.text for r in mem.recall("alice", vec(b + "!"), k=5)] == [a]
    mem.remember("alice", b, vec(b), quota_bytes=quota)  # exactly at the quota is allowed
    assert mem.used_bytes("alice") == quota
    with pytest.raises(MemoryQuotaExceeded):
        mem.remember("alice", "x", vec("x"), quota_bytes=quota)
    with pytest.raises(MemoryQuotaExceeded):  # a zero quota admits nothing, not even a first item
        mem.remember("bob", "x", vec("x"), quota_bytes=0)
    assert mem.count("bob") == 0
    # Multi-byte characters count as their UTF-8 bytes.
    item = mem.remember("carol", "naïve café ✓", vec("naïve café ✓"), quota_bytes=BIG)
    assert item.size_bytes == len("naïve café ✓".encode()) + 4 * DIM == 16 + 1536


def test_forget_gives_bytes_back(mem: QdrantMemory):
    quota = 2 * size_of("memory number 1")
    one = mem.remember("alice", "memory number 1", vec("memory number 1"), quota_bytes=quota)
    mem.remember("alice", "memory number 2", vec("memory number 2"), quota_bytes=quota)
    with pytest.raises(MemoryQuotaExceeded):
        mem.remember("alice", "memory number 3", vec("memory number 3"), quota_bytes=quota)
    assert mem.forget("alice", one.id) == one
    assert mem.used_bytes("alice") == size_of("memory number 2") and mem.count("alice") == 1
    mem.remember("alice", "memory number 3", vec("memory number 3"), quota_bytes=quota)
    assert {r.item.text for r in mem.recall("alice", vec("memory number"), k=5)} == {
        "memory number 2",
        "memory number 3",
    }
    with pytest.raises(MemoryStoreError) as err:  # forgetting twice
        mem.forget("alice", one.id)
    assert err.value.code == "not_found"
    with pytest.raises(MemoryStoreError) as err:
        mem.forget("dave", one.id)
    assert err.value.code == "not_found"


def test_persists_across_close_and_reopen(tmp_path: Path):
    path = tmp_path / "memory"
    with QdrantMemory(path) as m:
        kept = [m.remember("alice", t, vec(t), quota_bytes=BIG) for t in NOTES]
        m.remember("bob", "bob's only note", vec("bob's only note"), quota_bytes=BIG)
        m.forget("alice", kept[2].id)
        used = m.used_bytes("alice")
    with pytest.raises(MemoryStoreError, match="closed"):
        m.recall("alice", vec("x"))
    m.close()  # idempotent

    with QdrantMemory(path) as m:
        # Usage is recounted from the collection, not remembered in this object.
        assert m.used_bytes("alice") == used == sum(i.size_bytes for i in kept) - kept[2].size_bytes
        assert m.count("alice") == 4 and m.count("bob") == 1
        top = m.recall("alice", vec(NOTES[4]), k=1)[0]
        assert top.item == kept[4]
        assert all(r.item.text != NOTES[2] for r in m.recall("alice", vec(NOTES[2]), k=5))
        m.remember("alice", "after reopen", vec("after reopen"), quota_bytes=BIG)
        assert m.count("alice") == 5


def test_one_client_per_path(tmp_path: Path):
    path = tmp_path / "memory"
    with QdrantMemory(path) as m:
        with pytest.raises(MemoryStoreError, match=r"already open by pid \d+ \(this process\)") as err:
            QdrantMemory(path)
        assert err.value.code == "busy"
        m.remember("alice", "still usable", vec("still usable"), quota_bytes=BIG)  # the refusal broke nothing
    with QdrantMemory(path) as m:  # released on close
        assert m.count("alice") == 1
    with QdrantMemory(path, dim=8) as m, pytest.raises(MemoryStoreError, match="takes 8 dimensions"):
        m.count("alice")  # a store reopened with another dim says so instead of failing on insert


def test_another_process_holding_the_path_is_named(tmp_path: Path):
    path = tmp_path / "memory"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(MemoryStoreError, match=rf"already open by pid {holder.pid};") as err:
            QdrantMemory(path)
        assert err.value.code == "busy"
    finally:
        holder.kill()
        holder.wait()
    with QdrantMemory(path) as m:  # the kernel dropped the dead holder's lock
        assert m.count("alice") == 1


_HOLD = """
import sys
from runtime.world.memory.qdrant import QdrantMemory
m = QdrantMemory(sys.argv[1])
m.remember("alice", "held", [1.0] + [0.0] * 383, quota_bytes=1 << 20)
print("ready", flush=True)
sys.stdin.read()
"""


def test_constructor_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="exactly one of path"):
        QdrantMemory()
    with pytest.raises(ValueError, match="exactly one of path"):
        QdrantMemory(tmp_path, url="http://localhost:6333")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        QdrantMemory(tmp_path, dim=0)
    # A server that is not there fails at once, naming the address.
    with pytest.raises(MemoryStoreError, match=r"unavailable: cannot reach Qdrant at http://127\.0\.0\.1:9"):
        QdrantMemory(url="http://127.0.0.1:9")


def test_bad_input_gets_clear_errors_and_stores_nothing(mem: QdrantMemory):
    good = vec("good")
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"agent": "Alice"}, "invalid_agent", "not a valid name"),
        ({"agent": "a" * 33}, "invalid_agent", "not a valid name"),
        ({"agent": "../x"}, "invalid_agent", "not a valid name"),
        ({"agent": 7}, "invalid_agent", "not a valid name"),
        ({"text": ""}, "invalid_text", "empty"),
        ({"text": "  \n"}, "invalid_text", "empty"),
        ({"text": b"bytes"}, "invalid_text", "must be a str"),
        ({"text": "x" * (MAX_TEXT_BYTES + 1)}, "invalid_text", f"at most {MAX_TEXT_BYTES}"),
        ({"text": "é" * (MAX_TEXT_BYTES // 2 + 1)}, "invalid_text", "bytes in UTF-8"),
        ({"text": "bad \ud800 surrogate"}, "invalid_text", "not valid Unicode"),
        ({"vector": good[:-1]}, "invalid_vector", f"383 dimensions; this store takes {DIM}"),
        ({"vector": [*good, 0.0]}, "invalid_vector", "385 dimensions"),
        ({"vector": [math.nan, *good[1:]]}, "invalid_vector", r"vector\[0\] is nan"),
        ({"vector": [*good[:-1], math.inf]}, "invalid_vector", r"vector\[383\] is inf"),
        ({"vector": ["0.1", *good[1:]]}, "invalid_vector", r"vector\[0\] is str"),
        ({"vector": [True, *good[1:]]}, "invalid_vector", r"vector\[0\] is bool"),
        ({"vector": [0.0] * DIM}, "invalid_vector", "all zeros"),
        ({"vector": "abc"}, "invalid_vector", "sequence of floats"),
        ({"vector": None}, "invalid_vector", "sequence of floats"),
        ({"quota_bytes": -1}, "invalid", "quota_bytes"),
    ]
    for bad, code, message in cases:
        args: dict[str, object] = {"agent": "alice", "text": "good", "vector": good, "quota_bytes": BIG, **bad}
        with pytest.raises(MemoryStoreError, match=message) as err:
            mem.remember(**args)  # type: ignore[arg-type]
        assert err.value.code == code, (bad, err.value)
    assert mem.count("alice") == 0 and mem.used_bytes("alice") == 0
    # An int vector is fine (converted), and text of exactly MAX_TEXT_BYTES too.
    ints = [0] * DIM
    ints[5] = 1
    mem.remember("alice", "x" * MAX_TEXT_BYTES, ints, quota_bytes=BIG)

    for k in (0, -1, 101, 2.5, True):
        with pytest.raises(MemoryStoreError, match="k must be an integer from 1 to 100") as err:
            mem.recall("alice", good, k=k)  # type: ignore[arg-type]
        assert err.value.code == "invalid"
    with pytest.raises(MemoryStoreError, match="vector has 3 dimensions"):
        mem.recall("alice", [1.0, 0.0, 0.0])
    for bad_id in ("not-a-uuid", "", 42, "1" * 1000):
        with pytest.raises(MemoryStoreError, match="is not a UUID") as err:
            mem.forget("alice", bad_id)  # type: ignore[arg-type]
        assert err.value.code == "invalid_id"
    with pytest.raises(MemoryStoreError, match="invalid_agent"):
        mem.used_bytes("Bob")
    assert mem.count("alice") == 1


def test_items_round_trip_as_structs(mem: QdrantMemory):
    item = mem.remember("alice", "msgspec friendly", vec("msgspec friendly"), quota_bytes=BIG)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(item), type=MemoryItem) == item
    assert mem.forget("alice", item.id.upper()) == item  # any UUID spelling names the same item
