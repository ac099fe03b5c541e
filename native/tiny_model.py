"""A tiny random-weight llama GGUF, written in milliseconds, for tests and benchmarks without a model hub.

``python -m native.tiny_model OUT.gguf [--seed N] [--layers N] [--hidden N] [--ctx N]`` writes one and
prints its size.

The model is nonsense but complete: a llama architecture that llama.cpp loads like any other, a
GPT-2-style byte-level BPE vocabulary holding all 256 byte tokens (so any text is producible and any
grammar can be satisfied), a few merges (llama.cpp refuses a ``gpt2`` vocabulary without them), the
ChatML control tokens with ``<|im_end|>`` as end of sequence, and a ChatML chat template, so that
``Llama.create_chat_completion`` formats prompts exactly as it does for SmolLM2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

#: Control tokens first, as in SmolLM2: ``<|im_start|>`` opens a turn, ``<|im_end|>`` ends one.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2

F32 = np.ndarray[tuple[int, ...], np.dtype[np.float32]]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: A few merges of common English pairs; the merged tokens are added to the vocabulary too, since
#: llama.cpp looks a merge's result up by its text.
_MERGE_PAIRS = (("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"), ("e", "r"), ("Ġt", "he"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (a byte-level BPE token's spelling).

    Printable Latin-1 bytes stand for themselves; the rest are shifted above U+0100 so that no token
    text contains a space or a control character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """The token texts, token types and merges of the tiny model."""
    tokens = list(SPECIAL_TOKENS)
    types = [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    byte_tokens = _bytes_to_unicode()
    tokens += [byte_tokens[b] for b in range(256)]
    types += [int(TokenType.NORMAL)] * 256
    merges = []
    for left, right in _MERGE_PAIRS:
        merges.append(f"{left} {right}")
        tokens.append(left + right)
        types.append(int(TokenType.NORMAL))
    return tokens, types, merges


def write_tiny_model(path: str | Path, *, seed: int = 0, n_layers: int = 2, hidden: int = 64, ctx: int = 2048) -> Path:
    """Write a random-weight llama GGUF to ``path`` and return the path.

    ``hidden`` must be a multiple of 16 (heads of 16 dimensions). The same arguments give the same
    file, byte for byte.
    """
    if hidden <= 0 or hidden % 16:
        raise ValueError(f"write_tiny_model: hidden={hidden} must be a positive multiple of 16")
    if n_layers < 1:
        raise ValueError(f"write_tiny_model: n_layers={n_layers} must be at least 1")
    out = Path(path)
    tokens, types, merges = vocabulary()
    n_vocab, head_dim = len(tokens), 16
    n_head = hidden // head_dim
    n_head_kv = max(1, n_head // 2)  # grouped-query attention, as in SmolLM2
    n_ff = hidden * 4
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> F32:
        # Scaled like an initialised network so that activations neither vanish nor explode and the
        # sampled tokens vary from step to step.
        scale = np.float32(1 / np.sqrt(shape[-1]))
        out: F32 = rng.standard_normal(shape, dtype=np.float32) * scale
        return out

    def ones(n: int) -> F32:
        return np.ones(n, dtype=np.float32)

    w = GGUFWriter(out, "llama")
    w.add_name("aeco-tiny-random")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)  # the chat template opens every turn itself
    w.add_chat_template(CHATML_TEMPLATE)

    # numpy layout is (out, in); gguf records the reversed (ggml) order itself.
    w.add_tensor("token_embd.weight", weight(n_vocab, hidden))
    w.add_tensor("output_norm.weight", ones(hidden))
    w.add_tensor("output.weight", weight(n_vocab, hidden))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones(hidden))
        w.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", weight(n_head_kv * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", weight(n_head_kv * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, n_ff))

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Write a tiny model to the path on the command line and print its size."""
    ap = argparse.ArgumentParser(prog="python -m native.tiny_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="where to write the GGUF file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument("--hidden", type=int, default=64, help="embedding width, a multiple of 16 (default 64)")
    ap.add_argument("--ctx", type=int, default=2048, help="context length (default 2048)")
    args = ap.parse_args(argv)
    try:
        path = write_tiny_model(args.out, seed=args.seed, n_layers=args.layers, hidden=args.hidden, ctx=args.ctx)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
