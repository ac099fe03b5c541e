"""Batched generation: several chat completions decoded together in one llama.cpp context.

Evaluating B tokens in one ``llama_decode`` call costs less CPU per token than B calls of one. So
``BatchDecoder`` runs a batch of generations as sequences of one context (``n_seq_max`` = the most
sequences + 2):

    tokens(i)      = the chat prompt of generation i, formatted and tokenized as ``LlamaBackend`` does
    prefix         = the longest token prefix common to the batch (at least one token of each prompt
                     is left out of it, so every sequence has its own last position to sample from)
    seq 0          = the prefix cache: kept from the last batch up to where it agrees with ``prefix``,
                     then extended to ``prefix``; copied into each sequence (``llama_memory_seq_cp``)
    seq lo..lo+B-1 = the batch's sequences, in CONSECUTIVE streams (below): each one's own prompt
                     suffix evaluated after the copy (all suffixes batched together), then one token
                     per decode step: every step is ONE ``llama_decode`` holding the next token of
                     every live sequence
    last seq       = scratch, for exchanging two streams' contents

Each sequence samples with its own sampler (``native.sampling``, the same as a single think's: the
chain without the grammar, the grammar checking the token drawn) and stops on its own: an
end-of-generation token, a stop string of the chat format, ``max_tokens``, or a stop asked from outside
(``stopped``) while the others go on.

Jump-forward (``jump_forward``, on by default): where the grammar admits exactly one next byte
(``native.sampling.Forcing``: ``{"kind":"`` before anything is drawn, ``","to":"`` after a value,
``ransfer","to":"`` once a ``t`` decided the kind), those bytes are not drawn one decode step at a
time: the token drawn and the forced bytes after it are tokenized together and all evaluated for the
sequence in the next call (its rows consecutive, logits for the last only), and the forced start in the
prefill. The text is the text step-by-step sampling gives; a sequence takes fewer decode steps, and its
forced tokens cost what prompt tokens do (~6 ms, where a decode row reading its stream's cells alone
costs ~11 ms). llama.cpp computes a call's rows in micro-batches of as many tokens from each of a run
of consecutive streams (``split_equal``): a sequence's forced tokens beyond the step's one row per
sequence go in a micro-batch of their own after it (``Phases.decode_ubatches`` counts them).

What each sequence cost is counted as ``runtime.protocol.SeqWork``: prompt tokens evaluated for it,
the shared prefix tokens evaluated in this batch (or kept from before), the decode steps it took
part in, and the forced completion tokens evaluated for it beyond one row per step.
``runtime.economy.split`` divides the batch's measured CPU by it.

The KV cache is not unified: each sequence has its own stream of cells, so attention in a step spans
only the sequence's own tokens. llama.cpp computes a call's rows together only for streams with
consecutive sequence ids, in the rows' order (``split_equal``, sequential); any other layout is split
into several computations, each paying for the weights again. A step of 8 sequences at ~500 cells
costs ~11.7 ms a row in ascending consecutive streams, ~15 ms in descending ones (no better than 8
steps of one), ~14 ms with one gap (SmolLM2-135M, one thread). So rows go in ascending sequence id;
a batch's sequences get consecutive streams (``_assign``: the agents' kept prompts are moved there,
exchanged with other agents' kept prompts if need be); and when sequences finish, the live ones are
moved to close the gaps (``_compact``). A move copies whole streams (a memory copy, no evaluation:
~18 MB at 768 cells), ``Phases.stream_copies`` counts them.

Where the CPU goes (``Phases``; SmolLM2-135M, one thread, prompts of ~400 tokens, 8 agents' kept
prompts): the ``llama_decode`` calls are ~97% of a batch, sampling with the grammar ~3%; about half
is the prompts' changed suffixes (~6.3 ms a token), half the decode steps. A step's cost per
sequence is dominated by attention over the sequence's ~500 cells (one token at ~10 cells costs
~10 ms, at ~500 cells ~14 ms; 8 tokens at ~10 cells ~6.5 ms each, FACTS.md's figure, at ~500 cells
~11 ms): batching the steps saves ~20% of their CPU, not half. What batching spares most is
evaluation: the kept prefix and each agent's kept prompt.

Memory is what sizes the context: a stream holds the longest prompt plus ``max_tokens`` seen so
far, rounded up to ``CTX_STEP`` (at most ``max_ctx_seq``), for the largest batch seen so far
(SmolLM2-135M: 23 KB of KV per cell, so 10 streams of 1,024 cells are 236 MB). It is remade, and the
kept prompts lost, only when a batch needs more; it is freed with the backend.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from native.llama import (
    Generation,
    InferenceError,
    InvalidOutput,
    LlamaBackend,
    Schema,
    common_prefix,
    parse_schema,
    validate,
)
from native.sampling import Completion
from runtime.protocol import SeqWork

#: Tokens evaluated per ``llama_decode`` call while prefilling (the context's ``n_batch``): larger
#: calls cost less per token but hold more activations in memory.
N_BATCH = 512
#: Stream sizes are multiples of this many cells, so that slightly longer prompts do not remake the context.
CTX_STEP = 256


@dataclass(frozen=True, slots=True)
class Request:
    """One generation of a batch."""

    system: str
    prompt: str
    schema: Schema | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0


@dataclass(slots=True)
class Outcome:
    """One generation's result: its completion (``error`` set when it does not match the schema) and
    the work it caused."""

    generation: Generation
    work: SeqWork
    #: Empty when valid; else why the completion does not match the schema.
    error: str = ""


@dataclass(slots=True)
class Phases:
    """Where one batch's CPU went: this thread's CPU seconds per phase and the work of each (what
    ``benchmarks think`` prints). ``prefix``: the shared prefix evaluated into seq 0; ``prefill``: the
    sequences' own prompt suffixes; ``decode``: the decode steps' ``llama_decode`` calls; ``sample``:
    choosing every token (the chain and the grammar)."""

    prefix_tokens: int = 0
    prefix_cpu: float = 0.0
    prefill_tokens: int = 0
    prefill_calls: int = 0
    prefill_cpu: float = 0.0
    decode_steps: int = 0
    #: Tokens the decode steps evaluated (one per live sequence per step, and the forced tokens after it).
    decode_rows: int = 0
    #: Completion tokens the grammar forced, evaluated without a decode step of their own (in the
    #: prefill, or after a step's drawn token): included in ``prefill_tokens`` and ``decode_rows``.
    forced_tokens: int = 0
    decode_cpu: float = 0.0
    #: llama.cpp micro-batches the decode steps were computed in (``_ubatches``).
    decode_ubatches: int = 0
    samples: int = 0
    #: Drawing the tokens, and finding the text the grammar forces (``native.sampling.Forcing``).
    sample_cpu: float = 0.0
    #: Whole streams copied to keep the batch's streams consecutive (``_assign``, ``_compact``).
    stream_copies: int = 0


@dataclass(slots=True)
class _Seq:
    """A sequence being generated."""

    seq_id: int
    tokens: list[int]
    request: Request
    #: Its sampler, its tokens so far and why it ended.
    c: Completion
    #: The agent whose stream this is (its prompt is kept for its next think); empty: none.
    key: str = ""
    #: The position its own evaluation starts at; the tokens before it were kept, or shared.
    start: int = 0
    own_tokens: int = 0
    kept: int = 0
    shared: int = 0
    #: The token sampled last, not yet taken (``Completion.take``).
    next: int = -1
    decode_steps: int = 0
    #: Completion tokens in its stream (evaluated), and those of them forced beyond one per decode step.
    evaluated: int = 0
    forced: int = 0
    #: The batch row of its last token in the call being made (the logits it samples from).
    row: int = -1


class BatchDecoder:
    """Decodes batches of generations with ``backend``'s model (its weights, tokenizer and chat
    format), in a context of its own. Not for concurrent use (one worker thread calls it)."""

    def __init__(
        self, backend: LlamaBackend, *, max_ctx_seq: int = 2048, kept_max: int = 8, jump_forward: bool = True
    ) -> None:
        self.backend = backend
        #: Evaluate the text the grammar forces without decode steps of its own (module docstring).
        self.jump_forward = jump_forward
        #: How many keys' prompts are kept between batches (each holds a stream of the context).
        self.kept_max = kept_max
        #: key -> (its sequence, the prompt tokens in it), least recently used first.
        self._slots: OrderedDict[str, tuple[int, list[int]]] = OrderedDict()
        #: The most cells a sequence may use: its prompt plus ``max_tokens``.
        self.max_ctx_seq = max_ctx_seq
        self._n_ctx_seq = 0
        self._ctx: Any = None  # llama_cpp._internals.LlamaContext, made for ``_n_seq`` sequences
        self._n_seq = 0
        self._batch: Any = None  # llama_cpp.llama_batch of N_BATCH rows
        #: Tokens held in seq 0 (the prefix cache).
        self.cached: list[int] = []
        #: The work of the batch being decoded, readable after an interruption (what it spent so far).
        self.progress: list[SeqWork] = []
        #: Where the last batch's CPU went (reset by each ``generate``).
        self.phases = Phases()

    # ------------------------------------------------------------------------------- set-up

    def _context(self, n_seq: int, n_ctx_seq: int) -> Any:
        """The context, with room for ``n_seq`` generations of ``n_ctx_seq`` cells plus the prefix cache."""
        if self._ctx is not None and self._n_seq >= n_seq and self._n_ctx_seq >= n_ctx_seq:
            return self._ctx
        n_seq, n_ctx_seq = max(n_seq, self._n_seq), max(n_ctx_seq, self._n_ctx_seq)
        import llama_cpp
        from llama_cpp import _internals

        self.close()
        params = llama_cpp.llama_context_default_params()
        # Streams: 0 the prefix cache, 1..n_seq the sequences, n_seq + 1 scratch (``_swap``).
        params.n_ctx = n_ctx_seq * (n_seq + 2)
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = n_seq + 2
        params.kv_unified = False
        # As the single path's ``llama_cpp.Llama`` (flash_attn off): llama.cpp's CPU flash-attention kernel
        # walks the cells one by one, where the plain path multiplies matrices; a decode step of 8 streams
        # at ~450 cells cost ~12.0 ms a row with it, ~10.8 without (the default, auto, turns it on).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = self.backend.n_threads
        try:
            self._ctx = _internals.LlamaContext(model=self.backend.llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise InferenceError(f"llama.cpp could not make a context for {n_seq} sequences: {exc}") from None
        self._n_seq, self._n_ctx_seq = n_seq, n_ctx_seq
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        return self._ctx

    def close(self) -> None:
        """Free the context (the model stays with its backend)."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self._n_seq = self._n_ctx_seq = 0
        self.cached = []
        self._slots.clear()

    # ------------------------------------------------------------------------------- decoding

    def generate(
        self,
        requests: Sequence[Request],
        *,
        reuse_prefix: bool = True,
        keys: Sequence[str] = (),
        stopped: Callable[[], Collection[int]] | None = None,
    ) -> list[Outcome]:
        """Decode ``requests`` together; return one ``Outcome`` per request, in order.

        With ``reuse_prefix``, their common token prefix is evaluated once (or kept from the last
        batch) and copied into each sequence. Raises ``InferenceError`` if a prompt does not fit
        its sequence's context; an interruption (the worker's cancel) propagates, leaving
        ``progress`` with what each sequence had spent.

        ``keys`` (one per request, distinct; e.g. agent ids): each request's prompt is kept in a
        sequence of its own after the batch (up to ``kept_max`` of them, the least recently used
        dropped first), and the next request with the same key starts from the part of it that agrees.

        ``stopped``, asked before every decode step: the indexes of requests to stop now. Such a
        sequence ends there (``finish_reason`` ``cancelled``, not validated) and the others go on.
        """
        if not requests:
            return []
        if keys and (len(keys) != len(requests) or len(set(keys)) != len(keys)):
            raise ValueError("keys must be one per request, all different")
        import llama_cpp

        self.progress = [SeqWork(own_tokens=0) for _ in requests]
        self.phases = Phases()
        prompts = []
        for request in requests:
            tokens, stops = self.backend.chat_tokens(request.system, request.prompt)
            if len(tokens) + request.max_tokens > self.max_ctx_seq:
                raise InferenceError(
                    f"prompt of {len(tokens)} tokens + max_tokens {request.max_tokens} exceed a sequence's "
                    f"context of {self.max_ctx_seq} tokens"
                )
            prompts.append((tokens, stops))
        seqs: list[_Seq] = []
        try:
            for i, (request, (tokens, stops)) in enumerate(zip(requests, prompts, strict=True)):
                c = self.backend.completion(
                    request.schema,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    seed=request.seed,
                    stops=stops,
                )
                seqs.append(_Seq(0, tokens, request, c, keys[i] if keys else ""))
            need = max(len(s.tokens) + s.request.max_tokens for s in seqs)
            n_seq = max(len(seqs), self.kept_max if keys else 0)
            ctx = self._context(n_seq, min(self.max_ctx_seq, -(-need // CTX_STEP) * CTX_STEP))
            memory = llama_cpp.llama_get_memory(ctx.ctx)
            self._assign(seqs, memory)
            try:
                return self._generate(ctx, memory, seqs, reuse_prefix, stopped)
            except BaseException:  # its streams are part rewritten: no kept prompt of this batch is kept
                for s in seqs:
                    self._slots.pop(s.key, None)
                raise
        finally:
            for s in seqs:
                s.c.sampler.close()

    def _generate(
        self,
        ctx: Any,
        memory: Any,
        seqs: list[_Seq],
        reuse_prefix: bool,
        stopped: Callable[[], Collection[int]] | None,
    ) -> list[Outcome]:
        import llama_cpp

        # A sequence whose key's last prompt is still in its stream starts from what agrees with it (the
        # system prompt at least); the others start from the shared prefix.
        own_start = {s.seq_id: self._agreeing(s) for s in seqs}
        fresh = [s for s in seqs if not own_start[s.seq_id]]
        prefix: list[int] = []
        if reuse_prefix and fresh:
            n = min(len(s.tokens) - 1 for s in fresh)
            for s in fresh[1:]:
                n = min(n, common_prefix(fresh[0].tokens, s.tokens))
            prefix = fresh[0].tokens[:n]
        # Without reuse the kept prefix is left alone, for the next batch that reuses it.
        kept = self._extend_prefix(ctx, memory, prefix) if prefix else 0
        evaluated = len(prefix) - kept
        for s in seqs:
            start = own_start[s.seq_id]
            if start:
                llama_cpp.llama_memory_seq_rm(memory, s.seq_id, start, -1)
                s.start, s.kept = start, start
            else:
                llama_cpp.llama_memory_seq_rm(memory, s.seq_id, -1, -1)
                if prefix:
                    llama_cpp.llama_memory_seq_cp(memory, 0, s.seq_id, -1, -1)
                s.start, s.kept, s.shared = len(prefix), kept, evaluated
            s.own_tokens = len(s.tokens) - s.start

        def work(s: _Seq) -> SeqWork:
            return SeqWork(
                own_tokens=s.own_tokens,
                shared_tokens=s.shared,
                kept_tokens=s.kept,
                decode_steps=s.decode_steps,
                forced_tokens=s.forced,
            )

        self.progress = [work(s) for s in seqs]  # the prompts are being evaluated: theirs is the work so far
        # Rows in ascending sequence id, so that llama.cpp computes them together (module docstring).
        by_id = sorted(seqs, key=lambda s: s.seq_id)
        phases = self.phases
        t0 = time.thread_time()
        for s in by_id:  # what the grammar forces first (``{"kind":"``) is evaluated with the prompt
            self._advance(s, -1, len(by_id))
        phases.sample_cpu += time.thread_time() - t0
        self._prefill(ctx, by_id)

        live = [s for s in by_id if not s.c.finish]
        while live:
            t0 = time.thread_time()
            for s in live:
                self._advance(s, s.next, len(live))
            phases.sample_cpu += time.thread_time() - t0
            live = [s for s in live if not s.c.finish]
            if live and stopped is not None and (stop := stopped()):
                for i in stop:
                    if 0 <= i < len(seqs) and not seqs[i].c.finish:
                        seqs[i].c.finish = "cancelled"
                live = [s for s in live if not s.c.finish]
            if live:
                if live[-1].seq_id - live[0].seq_id >= len(live):  # a gap: one finished
                    live = self._compact(memory, live, by_id)
                rows = self._fill(live)
                phases.decode_ubatches += _ubatches([(s.seq_id, n) for s, n in zip(live, rows, strict=True)])
                t0 = time.thread_time()
                self._decode(ctx)
                t1 = time.thread_time()
                for s, n in zip(live, rows, strict=True):
                    s.decode_steps += 1
                    s.forced += n - 1
                    s.evaluated = len(s.c.out)
                    s.next = s.c.sampler.sample(ctx.ctx, s.row)
                phases.decode_steps += 1
                phases.decode_rows += sum(rows)
                phases.forced_tokens += sum(rows) - len(live)
                phases.decode_cpu += t1 - t0
                phases.samples += len(live)
                phases.sample_cpu += time.thread_time() - t1
            self.progress = [work(s) for s in seqs]
        for s in seqs:
            if s.key:  # its prompt stays in its stream, for its agent's next think; the completion goes
                llama_cpp.llama_memory_seq_rm(memory, s.seq_id, len(s.tokens), -1)
                self._slots[s.key] = (s.seq_id, s.tokens)
                self._slots.move_to_end(s.key)
        outcomes = []
        for s in seqs:
            gen = Generation(s.c.result(), len(s.tokens), len(s.c.out), s.c.finish)
            error = "cancelled: stopped inside its batch, as asked" if s.c.finish == "cancelled" else ""
            parsed = parse_schema(s.request.schema)
            if parsed is not None and not error:
                try:
                    validate(gen, parsed[1])
                except InvalidOutput as exc:
                    error = exc.reason
            outcomes.append(Outcome(gen, work(s), error))
        return outcomes

    def _assign(self, seqs: list[_Seq], memory: Any) -> None:
        """Give the batch's sequences consecutive streams (llama.cpp computes only consecutive streams
        together: module docstring), each key's kept prompt kept: the window of streams that already
        holds most of the batch's kept prompts; a kept prompt outside it is moved in, swapping places
        with another key's kept prompt if need be; a fresh sequence takes a stream of the window that
        is free, else one whose kept prompt moves out to a free stream, else (no room) the least recently
        used other key's kept prompt is dropped.

        Invariant (asserted): the batch's streams are ``lo .. lo + len(seqs) - 1``, one each, and every
        kept key names a distinct stream. An interruption part-way forgets every kept prompt (the
        streams' contents may no longer match their keys)."""
        try:
            self._place(seqs, memory)
        except BaseException:
            self._slots.clear()
            raise
        ids = sorted(s.seq_id for s in seqs)
        assert ids == list(range(ids[0], ids[0] + len(seqs))), ids
        assert len({i for i, _ in self._slots.values()}) == len(self._slots)

    def _place(self, seqs: list[_Seq], memory: Any) -> None:
        n = len(seqs)
        kept = {s.key: self._slots[s.key][0] for s in seqs if s.key in self._slots}
        lo = max(range(1, self._n_seq - n + 2), key=lambda lo: (sum(lo <= i < lo + n for i in kept.values()), -lo))
        window = range(lo, lo + n)
        owner = {i: key for key, (i, _) in self._slots.items()}
        stay = {key for key, i in kept.items() if i in window}
        holes = [i for i in window if owner.get(i) not in stay]
        held, free = [i for i in holes if i in owner], [i for i in holes if i not in owner]
        for s in seqs:
            if s.key in stay:
                s.seq_id = kept[s.key]
        for s in seqs:  # kept prompts outside the window move in
            if s.key in kept and s.key not in stay:
                to = held.pop(0) if held else free.pop(0)
                self._swap(memory, kept[s.key], to, keep_b=to in owner)
                s.seq_id = to
        owner = {i: key for key, (i, _) in self._slots.items()}
        outside = [i for i in range(1, self._n_seq + 1) if i not in window and i not in owner]
        members = {s.key for s in seqs}
        for s in seqs:
            if s.key in kept:
                continue
            if free:
                to = free.pop(0)
            elif outside:  # another key's kept prompt holds the stream: it moves out
                to = held.pop(0)
                self._swap(memory, to, outside.pop(0), keep_b=False)
            else:  # no room: the least recently used other key's kept prompt is dropped
                victim = next(key for key in self._slots if key not in members)
                at = self._slots.pop(victim)[0]
                if at in held:
                    held.remove(at)
                    to = at
                else:  # outside the window: the holder of a stream of the window moves there
                    to = held.pop(0)
                    self._swap(memory, to, at, keep_b=False)
            s.seq_id = to

    def _compact(self, memory: Any, live: list[_Seq], batch: list[_Seq]) -> list[_Seq]:
        """Make the live sequences' streams consecutive again after some finished: each live sequence
        outside the window of streams holding most of them swaps places with a finished one inside it
        (whose prompt, kept for its key, is kept). Returns the live sequences in stream order."""
        n = len(live)
        first = batch[0].seq_id
        lo = max(
            range(first, first + len(batch) - n + 1),
            key=lambda lo: (sum(lo <= s.seq_id < lo + n for s in live), -lo),
        )
        inside = {s.seq_id for s in live if lo <= s.seq_id < lo + n}
        done = [s for s in batch if lo <= s.seq_id < lo + n and s.seq_id not in inside]
        for s in live:
            if not lo <= s.seq_id < lo + n:
                d = done.pop(0)
                self._swap(memory, s.seq_id, d.seq_id, keep_b=bool(d.key))
                s.seq_id, d.seq_id = d.seq_id, s.seq_id
        batch.sort(key=lambda s: s.seq_id)
        return sorted(live, key=lambda s: s.seq_id)

    def _swap(self, memory: Any, a: int, b: int, *, keep_b: bool) -> None:
        """Move stream ``a``'s contents to stream ``b``; with ``keep_b``, ``b``'s go to ``a`` (through the
        scratch stream), else they are dropped. The kept prompts' records follow their contents.
        llama.cpp copies whole streams (a memory copy, no evaluation) at the next ``llama_decode``, in order."""
        import llama_cpp

        keys = {i: key for key, (i, _) in self._slots.items()}
        if keep_b:
            scratch = self._n_seq + 1
            llama_cpp.llama_memory_seq_cp(memory, a, scratch, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, b, a, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, scratch, b, -1, -1)
            llama_cpp.llama_memory_seq_rm(memory, scratch, -1, -1)
            self.phases.stream_copies += 3
        else:
            llama_cpp.llama_memory_seq_cp(memory, a, b, -1, -1)
            llama_cpp.llama_memory_seq_rm(memory, a, -1, -1)
            self.phases.stream_copies += 1
            if b in keys:
                del self._slots[keys.pop(b)]
        for i, j in ((a, b), (b, a)):
            if i in keys:
                self._slots[keys[i]] = (j, self._slots[keys[i]][1])

    def _advance(self, s: _Seq, token: int, n_live: int) -> None:
        """Append ``token`` (drawn from the sequence's last logits; -1: none yet, before the first draw)
        to its completion and, with ``jump_forward``, the text the grammar forces after it, tokenized
        together (``native.sampling.Forcing.tokens``). At most ``N_BATCH // n_live - 1`` forced bytes a
        step, so that one call holds every live sequence's rows; the rest is forced at the next step."""
        c = s.c
        room = min(c.max_tokens - len(c.out) - (token >= 0), N_BATCH // n_live - 1)
        forcing = self.backend.forcing if self.jump_forward else None
        forced = c.sampler.forced(forcing, room) if forcing is not None and room > 0 else b""
        if forcing is not None and forced:
            c.take_all(forcing.tokens(token, forced))
        elif token >= 0:
            c.take(token)

    def _agreeing(self, s: _Seq) -> int:
        """How many tokens of ``s``'s prompt its stream already holds (0: none worth keeping); at least
        one is left to evaluate, for the logits to sample from."""
        kept = self._slots.get(s.key) if s.key else None
        if kept is None or kept[0] != s.seq_id:
            return 0
        return min(common_prefix(kept[1], s.tokens), len(s.tokens) - 1)

    def _extend_prefix(self, ctx: Any, memory: Any, prefix: list[int]) -> int:
        """Make seq 0 hold ``prefix``: keep what it already agrees on, evaluate the rest. Returns the
        number of tokens kept. An interruption forgets the cache (it may be half evaluated)."""
        import llama_cpp

        kept = common_prefix(self.cached, prefix)
        if kept == len(self.cached) == len(prefix):
            return kept
        llama_cpp.llama_memory_seq_rm(memory, 0, kept, -1)
        self.cached = self.cached[:kept]
        t0 = time.thread_time()
        try:
            for start in range(kept, len(prefix), N_BATCH):
                chunk = prefix[start : start + N_BATCH]
                self._batch.n_tokens = 0
                for j, token in enumerate(chunk):
                    self._add(token, start + j, 0, False)
                self._decode(ctx)
        except BaseException:
            llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
            self.cached = []
            raise
        self.cached = list(prefix)
        self.phases.prefix_tokens += len(prefix) - kept
        self.phases.prefix_cpu += time.thread_time() - t0
        return kept

    def _prefill(self, ctx: Any, seqs: list[_Seq]) -> None:
        """Evaluate every sequence's own suffix and the completion's forced start, several sequences per
        call, and sample each one's first token from the call that held its last token (a call's logits
        last until the next). A completion the grammar forced whole is not evaluated (nothing to sample)."""
        self._batch.n_tokens = 0
        ending: list[tuple[_Seq, int]] = []  # sequences whose prompt ends in this call, and the row
        for s in seqs:
            forced = s.c.out if not s.c.finish else []
            rows = s.tokens[s.start :] + forced
            for j, token in enumerate(rows):
                if self._batch.n_tokens == N_BATCH:
                    self._prefill_call(ctx, ending)
                last = j == len(rows) - 1 and not s.c.finish
                if last:
                    ending.append((s, self._batch.n_tokens))
                self._add(token, s.start + j, s.seq_id, last)
            s.evaluated = s.forced = len(forced)
            self.phases.forced_tokens += len(forced)
        if self._batch.n_tokens:
            self._prefill_call(ctx, ending)

    def _prefill_call(self, ctx: Any, ending: list[tuple[_Seq, int]]) -> None:
        phases = self.phases
        t0 = time.thread_time()
        self._decode(ctx)
        t1 = time.thread_time()
        for s, row in ending:
            s.next = s.c.sampler.sample(ctx.ctx, row)
        phases.prefill_calls += 1
        phases.prefill_tokens += self._batch.n_tokens
        phases.prefill_cpu += t1 - t0
        phases.samples += len(ending)
        phases.sample_cpu += time.thread_time() - t1
        ending.clear()
        self._batch.n_tokens = 0

    def _fill(self, live: list[_Seq]) -> list[int]:
        """The rows of a decode step: each live sequence's completion tokens not yet evaluated (its last
        draw, and the forced tokens after it), at their positions, logits for the last (``_Seq.row``).
        Returns how many rows each sequence has."""
        self._batch.n_tokens = 0
        rows = []
        for s in live:
            new = s.c.out[s.evaluated :]
            at = len(s.tokens) + s.evaluated
            for j, token in enumerate(new):
                last = j == len(new) - 1
                if last:
                    s.row = self._batch.n_tokens
                self._add(token, at + j, s.seq_id, last)
            rows.append(len(new))
        return rows

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1

    def _decode(self, ctx: Any) -> None:
        import llama_cpp

        rc = llama_cpp.llama_decode(ctx.ctx, self._batch)
        if rc != 0:
            raise InferenceError(f"llama_decode failed with {rc} (no room in the context's KV cache?)")


def _ubatches(rows: Sequence[tuple[int, int]]) -> int:
    """How many micro-batches llama.cpp computes a call in, given each sequence's stream and row count
    (ascending streams): as its ``split_equal`` (sequential) does, each takes the run of consecutive
    streams that still have rows, as many rows from each as the fewest of them has left."""
    left = dict(rows)
    n = 0
    while left:
        run = [min(left)]
        while run[-1] + 1 in left:
            run.append(run[-1] + 1)
        take = min(left[i] for i in run)
        for i in run:
            left[i] -= take
            if not left[i]:
                del left[i]
        n += 1
    return n
