"""Choosing each next token under a grammar, and what a completion is while it grows.

Both generation paths (one think, ``native.llama``; several decoded together, ``native.batch``) sample
and stop through this module, so that a batched think samples exactly as a single one does.

Sampling. A grammar sampler applied to every candidate costs a check of each of the vocabulary's
tokens against the grammar's stacks at every step (SmolLM2: 49,152 tokens) — measured, more than the
decode itself. So, as llama.cpp's own ``common_sampler_sample`` does, ``Sampler`` runs the chain
(top-k, typical, top-p, min-p, temperature, seeded draw; or greedy) WITHOUT the grammar, then lets the
grammar check only the token drawn (a one-entry candidate array). When it refuses it (SmolLM2: a
third of the tokens of an action, mostly where the grammar forces a literal), the grammar is applied
to the ``REFUSED_TOP`` most likely tokens and the chain run again on those it allows; only if it allows
none of them is it applied to all. Every token kept satisfies the grammar either way. Greedy decoding
picks the same tokens as grammar-first sampling (an allowed argmax is the argmax of the allowed, and
it is among the most likely if any allowed token is); a seeded draw may land on another valid token.
``grammar_first`` keeps the old order (the grammar over every candidate, every step), to measure
against.

Forced text. Where the grammar admits exactly one next character (the keys and punctuation of an
action, ``{"kind":"``, the rest of a kind once its first letters decide it), sampling cannot choose:
``Forcing`` finds that text without logits, and ``native.batch`` evaluates it in the call that
evaluates the token before it instead of one decode step per token (jump-forward). How it is found
exactly and cheaply: a token the grammar allows has a first byte the grammar allows, so the grammar is
applied to a *probe* of one token per first byte (the vocabulary's single-byte tokens, plus every token
whose first byte has none, plus the end-of-generation tokens) — ~260 tokens, ~50 µs, where the whole
vocabulary costs ~9 ms. When it allows exactly one probe token and that is an ASCII byte, every token
the grammar allows starts with that byte: the byte is forced, accepted into the grammar, and the probe
asked again. The forced bytes are the bytes step-by-step sampling would produce; the tokens that carry
them are the tokenizer's own tokenization of the token drawn last and the forced bytes together (what
the model reads in its training text), which may split them otherwise than the model would have drawn.

Stopping. ``Completion`` appends a sampled token unless it ends the generation: an end-of-generation
token, a stop string of the chat format, or ``max_tokens``; its text is the completion's bytes. A
completion constrained to JSON (``json_end``) also ends with the bracket that closes its value: the
grammar allows nothing after it (``native.llama.compact_grammar``), so the step that would evaluate
that bracket only to sample the end-of-generation token is not taken.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: ``stop``: the model (or the grammar) ended it; ``length``: ``max_tokens`` cut it off; ``cancelled``:
#: stopped from outside (a sequence of a batch, see ``native.batch``).
FinishReason = Literal["stop", "length", "cancelled", ""]

#: Sampler settings of ``llama_cpp.Llama.create_chat_completion``'s defaults, kept the same so that a
#: think samples as it did through llama-cpp-python.
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05


#: After a refusal, the grammar is applied to this many of the most likely tokens first. A grammar pass
#: costs ~180 ns a token: ~0.4 ms here against ~9 ms for SmolLM2's whole vocabulary, which SmolLM2
#: then needs after ~5% of its refusals (17% with 512, 1% with 8,192 tokens).
REFUSED_TOP = 2048


class Candidates:
    """One candidate array as large as the vocabulary, refilled from a row of logits when the grammar
    must see more than the token drawn (shared by a backend's samplers: one thread samples at a time),
    and the counts of what the grammar cost."""

    def __init__(self, n_vocab: int) -> None:
        import llama_cpp
        import numpy as np

        self.n_vocab = n_vocab
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        self.array = llama_cpp.llama_token_data_array(self._data, n_vocab, -1, False)
        view: npt.NDArray[Any] = np.frombuffer(
            memoryview(self._data), dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )
        self._view = view
        self._ids: npt.NDArray[np.int32] = np.arange(n_vocab, dtype=np.int32)
        #: Tokens drawn that the grammar refused, and refusals after which it had to see every token.
        self.refused = self.full_passes = 0

    def fill(self, ctx: Any, idx: int) -> Any:
        """The array holding every token with its logit at output row ``idx`` of ``ctx`` (a
        ``llama_context_p``), unsorted, nothing selected. Returns the ``llama_token_data_array``."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        # A sampler may have sorted or cut the array in place the last time: every field is rewritten.
        self._view["id"] = self._ids
        self._view["logit"] = logits
        self._view["p"] = 0.0
        return self._reset(self.n_vocab)

    def fill_top(self, ctx: Any, idx: int, n: int) -> Any:
        """The array holding only the ``n`` most likely tokens at row ``idx``, unsorted."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        top = np.argpartition(logits, -n)[-n:]
        head = self._view[:n]
        head["id"] = top
        head["logit"] = logits[top]
        head["p"] = 0.0
        return self._reset(n)

    def any_allowed(self) -> bool:
        """Whether the grammar, just applied to the array, left any token allowed."""
        import numpy as np

        return bool(np.isfinite(self._view["logit"][: self.array.size]).any())

    def _reset(self, size: int) -> Any:
        a = self.array
        a.data, a.size, a.selected, a.sorted = self._data, size, -1, False
        return a


class Forcing:
    """What the grammar forces next, found with a probe of one token per first byte (module docstring),
    and the tokens that carry forced bytes. One per vocabulary; built on first use (it reads every
    token's text once, ~0.1 s for SmolLM2)."""

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        import llama_cpp
        import numpy as np

        self.vocab = vocab
        #: byte -> its single-byte token (the fallback tokenization of forced bytes).
        self.byte_token: dict[int, int] = {}
        firsts: dict[int, list[int]] = {}  # first byte -> the longer tokens starting with it
        eog: list[int] = []
        buf = ctypes.create_string_buffer(256)
        for token in range(n_vocab):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                eog.append(token)
                continue
            # The text the grammar checks (llama.cpp's grammar reads special tokens' text too).
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            if n == 1:
                self.byte_token.setdefault(buf.raw[0], token)
            elif n > 1 or n < 0:  # n < 0: longer than the buffer; its first byte is there all the same
                firsts.setdefault(buf.raw[0], []).append(token)
        probe = list(self.byte_token.values()) + eog
        for first, tokens in firsts.items():
            if first not in self.byte_token:  # no single-byte token answers for them: probed themselves
                probe += tokens
        self._ids = np.array(probe, dtype=np.int32)
        self._byte_of = {token: byte for byte, token in self.byte_token.items() if byte < 0x80}
        self._data = (llama_cpp.llama_token_data * len(probe))()
        self._array = llama_cpp.llama_token_data_array(self._data, len(probe), -1, False)
        self._view: npt.NDArray[Any] = np.frombuffer(
            memoryview(self._data), dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )
        self._tokens = (llama_cpp.llama_token * 512)()
        self._piece = ctypes.create_string_buffer(64)

    def next_byte(self, grammar: Any) -> int:
        """The byte ``grammar`` (a grammar sampler, not changed) forces next, as its single-byte token;
        -1 when it admits more than one byte, a non-ASCII one, or the end."""
        import llama_cpp
        import numpy as np

        view, a = self._view, self._array
        view["id"] = self._ids
        view["logit"] = 0.0
        a.data, a.size, a.selected, a.sorted = self._data, len(self._ids), -1, False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(a))
        allowed = np.flatnonzero(np.isfinite(view["logit"]))
        if len(allowed) != 1:
            return -1
        token = int(view["id"][allowed[0]])
        return token if token in self._byte_of else -1

    def force(self, grammar: Any, limit: int) -> bytes:
        """The bytes ``grammar`` forces next (at most ``limit``), accepted into it."""
        import llama_cpp

        out = bytearray()
        while len(out) < limit and (token := self.next_byte(grammar)) >= 0:
            llama_cpp.llama_sampler_accept(grammar, token)
            out.append(self._byte_of[token])
        return bytes(out)

    def tokens(self, last: int, forced: bytes) -> list[int]:
        """The tokens carrying ``last`` (a token drawn, not yet evaluated; -1: none) and then ``forced``
        (bytes ``force`` returned): the two texts tokenized together, as the tokenizer splits them (no
        special tokens parsed); else, if that does not give the same bytes back (a tokenizer that adds a
        leading space, a ``last`` that is part of a UTF-8 character), ``last`` and one token per byte."""
        import llama_cpp

        text = (self.piece(last) if last >= 0 else b"") + forced
        n = llama_cpp.llama_tokenize(self.vocab, text, len(text), self._tokens, len(self._tokens), False, False)
        if n > 0:
            tokens = list(self._tokens[:n])
            if b"".join(self.piece(t) for t in tokens) == text:
                return tokens
        return ([last] if last >= 0 else []) + [self.byte_token[b] for b in forced]

    def piece(self, token: int) -> bytes:
        """The token's text (as ``Completion`` appends it)."""
        import llama_cpp

        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, -n, 0, False)
        return self._piece.raw[:n]


class Sampler:
    """One generation's sampler: a chain without the grammar, and the grammar (or none) checking it.

    ``grammar`` is a llama.cpp grammar sampler this object now owns (``LlamaBackend.completion`` clones
    one per generation); ``close`` frees both.
    """

    def __init__(
        self,
        grammar: Any,
        candidates: Candidates,
        *,
        temperature: float,
        seed: int,
        grammar_first: bool = False,
    ) -> None:
        import llama_cpp

        self.grammar = grammar
        self.grammar_first = grammar_first
        self._candidates = candidates
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        parts = (
            [llama_cpp.llama_sampler_init_greedy()]
            if temperature == 0
            else [
                llama_cpp.llama_sampler_init_top_k(TOP_K),
                llama_cpp.llama_sampler_init_typical(1.0, 1),
                llama_cpp.llama_sampler_init_top_p(TOP_P, 1),
                llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
                llama_cpp.llama_sampler_init_temp(temperature),
                llama_cpp.llama_sampler_init_dist(seed),
            ]
        )
        for part in parts:
            llama_cpp.llama_sampler_chain_add(self.chain, part)  # the chain owns and frees them
        # The one-entry array the grammar checks a drawn token in.
        self._one = llama_cpp.llama_token_data(0, 0.0, 0.0)
        self._one_array = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from output row ``idx`` of ``ctx`` (a ``llama_context_p``; -1: the last),
        accepted by the grammar and the chain."""
        import llama_cpp

        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, idx))
        candidates = self._candidates
        if self.grammar_first:
            array = candidates.fill(ctx, idx)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        else:
            token = int(llama_cpp.llama_sampler_sample(self.chain, ctx, idx))  # accepted by the chain
            one, array = self._one, self._one_array
            one.id, one.logit, one.p = llama_cpp.llama_token(token), 1.0, 0.0
            array.size, array.selected, array.sorted = 1, -1, False
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
            if not math.isinf(one.logit):
                llama_cpp.llama_sampler_accept(self.grammar, token)
                return token
            candidates.refused += 1
            array = None
            if candidates.n_vocab > REFUSED_TOP:
                array = candidates.fill_top(ctx, idx, REFUSED_TOP)
                llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
                if not candidates.any_allowed():
                    array = None
            if array is None:
                candidates.full_passes += 1
                array = candidates.fill(ctx, idx)
                llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def forced(self, forcing: Forcing, limit: int) -> bytes:
        """The text the grammar forces next (at most ``limit`` bytes; none without a grammar), accepted
        into it as if sampled."""
        return forcing.force(self.grammar, limit) if self.grammar is not None else b""

    def close(self) -> None:
        """Free the chain and the grammar (idempotent)."""
        import llama_cpp

        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self) -> None:
        self.close()


@dataclass(slots=True)
class Completion:
    """A completion as it grows, token by token, and why it ended."""

    sampler: Sampler
    #: The chat format's stop strings: the completion ends before the first one it produces.
    stops: list[bytes]
    max_tokens: int
    #: ``llama_vocab_p`` of the model: which tokens end a generation, and their text.
    vocab: Any
    #: The completion is one JSON value (a schema's grammar): it ends with the bracket closing it.
    json_end: bool = False
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    finish: FinishReason = ""
    _piece: Any = field(default_factory=lambda: ctypes.create_string_buffer(64))
    #: Where the JSON scan of ``text`` is (``json_end``): bracket depth, inside a string, after a backslash.
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def take(self, token: int) -> bool:
        """Append ``token`` unless it ends the completion; True while the completion goes on."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self.finish = "stop"
            return False
        self.out.append(token)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # the piece is longer than the buffer: -n bytes
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, -n, 0, False)
        tail = len(self.text)
        self.text += self._piece.raw[:n]
        # A stop string can only appear where the new piece ends: look at that tail only.
        stop_string = any(stop in self.text[max(0, tail - len(stop)) :] for stop in self.stops)
        if stop_string or (self.json_end and self._closes(self.text[tail:])):
            self.finish = "stop"
        elif len(self.out) >= self.max_tokens:
            self.finish = "length"
        return not self.finish

    def _closes(self, piece: bytes) -> bool:
        """Scan ``piece`` (the text's new bytes) as JSON; True if it closes the outermost bracket."""
        for byte in piece:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # quote
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    return True
        return False

    def take_all(self, tokens: list[int]) -> bool:
        """``take`` each of ``tokens`` until one ends the completion; True while it goes on."""
        return all(self.take(token) for token in tokens)

    def result(self) -> str:
        """The completion's text, cut before its first stop string (as ``llama_cpp.Llama`` does)."""
        text = self.text
        for stop in self.stops:
            if stop in text:
                text = text[: text.index(stop)]
        return text.decode(errors="ignore")
