"""Splitting one measured amount among the sequences of a ``think_batch``, exactly.

A batch of thinks runs as one task: its CPU is one ``getrusage`` delta (integer microseconds here),
and llama.cpp cannot say which sequence used which cycle. So the amount is divided in proportion to
the work each sequence caused, counted in tokens evaluated (``runtime.protocol.SeqWork``):

    weight(i) = own_tokens(i)                          prompt tokens evaluated for i alone
              + forced_tokens(i)                       completion tokens the grammar forced, evaluated
                                                       for i alone with its prompt or after a drawn token
              + shared_tokens / users                  the prefix tokens evaluated in this batch
              + sum over decode steps k that i took part in of (CALL_OVERHEAD + b_k) / b_k

where ``users`` is the number of sequences whose prompts started with those tokens and ``b_k`` the
number of sequences in decode step ``k``. A decode step evaluates one token per sequence in it, plus
a fixed cost per ``llama_decode`` call (``CALL_OVERHEAD``, in tokens) that its sequences share: a
sequence left decoding alone pays the whole call, as it would outside a batch. A forced token is
counted as a prompt token: it is evaluated in a run of the sequence's own tokens (in the prefill, or
after its drawn token in a step), not as a step's row. A prefix kept from an
earlier batch costs this batch nothing to evaluate, so nobody pays for it here; nobody pays for a
prefix they did not use.

Exactness: the weights are exact fractions; each share is ``floor(total × weight / sum)``, and the
microseconds left over (fewer than the number of sequences) go one each to the largest fractional
parts, ties to the earlier sequence. The shares sum to the total, always; the same inputs give the
same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from runtime.protocol import SeqWork

#: The fixed cost of one ``llama_decode`` call, in tokens of evaluation. Measured with SmolLM2-135M and
#: one thread (FACTS.md): a call of B tokens costs about 6.7 ms + 5.7 ms × B, so the fixed part is
#: ~1.2 tokens' worth. Too low would under-charge the sequence left decoding alone at the end of a
#: batch; too high would over-charge it relative to what it would have cost in its own task.
CALL_OVERHEAD = Fraction(6, 5)


def weights(work: Sequence[SeqWork]) -> list[Fraction]:
    """Each sequence's work in tokens evaluated (the formula in the module docstring), exactly."""
    users = sum(1 for w in work if w.shared_tokens)
    steps = max((w.decode_steps for w in work), default=0)
    # Sequences in step k: every sequence takes part from step 0 until it stops.
    in_step = [sum(1 for w in work if w.decode_steps > k) for k in range(steps)]
    # share_upto[n]: what a sequence owes for decode steps 0..n-1.
    share_upto = [Fraction(0)]
    for b in in_step:
        share_upto.append(share_upto[-1] + (CALL_OVERHEAD + b) / b)
    out = []
    for w in work:
        weight = Fraction(w.own_tokens + w.forced_tokens) + share_upto[w.decode_steps]
        if w.shared_tokens:
            weight += Fraction(w.shared_tokens, users)
        out.append(weight)
    return out


def split_exact(total: int, weights: Sequence[Fraction]) -> list[int]:
    """``total`` (a non-negative integer) split in proportion to ``weights``, summing to it exactly.

    Floors first, then one unit each to the largest remainders (ties: the earlier index). All weights
    zero (nothing measurable was done): equal parts, by the same remainder rule.
    """
    if total < 0:
        raise ValueError(f"cannot split a negative amount ({total})")
    if not weights:
        if total:
            raise ValueError(f"cannot split {total} among no one")
        return []
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must not be negative: {list(weights)}")
    whole = sum(weights, Fraction(0))
    parts = [Fraction(1)] * len(weights) if whole == 0 else list(weights)
    whole = sum(parts, Fraction(0))
    exact = [total * w / whole for w in parts]
    shares = [int(x) for x in exact]  # floor: all are non-negative
    left = total - sum(shares)
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def split_batch(total: int, work: Sequence[SeqWork]) -> list[int]:
    """A batch's measured ``total`` (e.g. CPU microseconds) split among its sequences by their work."""
    return split_exact(total, weights(work))
