"""Batched, jitted log-likelihood of token requests: (context ids, continuation ids) ->
(sum of the continuation's log-probabilities, whether greedy decoding produces it).

lm-eval's arithmetic (`eval/lm_eval_model.py` wraps this; no lm-eval import here): each
request's input is `(context + continuation)[-(max_length + 1):][:-1]` and the continuation is
scored at its last positions, in float32 log-softmax, summed in float64. Requests are sorted
by length and padded to bucket lengths (a handful of compiled programs per task); requests
that share a prefix of PACK_MIN_PREFIX+ tokens (the choices of one question) are packed into
one sequence with the prefix once; the vocabulary projection runs only at scored positions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from any4_jax.eval.perplexity import token_scores


def bucket(n: int, *, smallest: int = 32) -> int:
    """The padded length for `n` tokens: `smallest`, then 1x and 1.5x each power of two
    (32, 48, 64, 96, 128, ...): at most 50% padding, two programs per doubling."""
    b = smallest
    while b < n:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return b


# Packed rows (a shared prefix and several continuations) attend through a [t, t] mask
# (models.llama: `hidden(segments=...)`): rows longer than this are split into smaller groups.
PACK_MAX = 1024
# A shorter shared prefix is not worth the mask: such requests (the first windows of rolling
# documents share the one prefix token) run as plain causal rows, through blocked attention.
PACK_MIN_PREFIX = 8


@partial(jax.jit, static_argnums=0)
def _score(graphdef, state, tokens, segments, positions, pos, targets):
    """tokens [b, t] (segments, positions [b, t] for packed rows, else None); pos, targets
    [b, k]: the scored positions and the token expected after each -> (log-probabilities
    [b, k] float32, whether each target is the argmax [b, k])."""
    model = nnx.merge(graphdef, state)
    if segments is None:
        h, _ = model.hidden(tokens)
    else:
        h, _ = model.hidden(tokens, segments=segments, positions=positions)
    hs = jnp.take_along_axis(h, pos[..., None], axis=1)  # [b, k, d]
    nll, top = token_scores(model, hs, targets)
    return -nll, top


class Row(NamedTuple):
    """One sequence of a batch: a prefix and the tails of the requests that share it."""
    prefix: list[int]
    members: list[tuple[int, list[int], list[int]]]  # (request index, tail, continuation)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(t) for _, t, _ in self.members)

    @property
    def scored(self) -> int:
        return sum(len(c) for _, _, c in self.members)


def plan_rows(rows_in: list[tuple[list[int], list[int]]], *, max_len: int) -> list[Row]:
    """(context ids, continuation ids) per request -> rows, longest first.

    Each request is lm-eval's input, `(context + continuation)[-(max_len + 1):][:-1]`, cut
    where the continuation's predictions start: a prefix (ending with the token that predicts
    the continuation's first token) and a tail (the continuation but its last token).
    Requests with the same prefix (the choices of one multiple-choice question) share one
    row, up to PACK_MAX tokens, when the prefix has at least PACK_MIN_PREFIX tokens.
    """
    groups: dict[tuple, list] = {}
    for j, (ctx, cont) in enumerate(rows_in):
        inp = (ctx + cont)[-(max_len + 1):][:-1]
        cut = len(inp) - len(cont) + 1
        groups.setdefault(tuple(inp[:cut]), []).append((j, inp[cut:], cont))
    out = []
    for prefix, members in groups.items():
        if len(prefix) < PACK_MIN_PREFIX:
            out += [Row(list(prefix), [m]) for m in members]
            continue
        row = Row(list(prefix), [])
        for m in members:
            if row.members and row.length + len(m[1]) > PACK_MAX:
                out.append(row)
                row = Row(list(prefix), [])
            row.members.append(m)
        out.append(row)
    return sorted(out, key=lambda r: (len(r.members) > 1, -r.length))


def score_requests(graphdef, state, requests: list[tuple[list[int], list[int]]], *,
                   max_length: int, batch_size: int = 8, max_batch_tokens: int = 16384,
                   progress: bool = True,
                   on_result: Callable[[int, tuple[float, bool]], None] | None = None
                   ) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) per request, both non-empty, the continuation at most
    `max_length` tokens -> [(log-likelihood, is_greedy)] in the requests' order.

    `batch_size` rows per step (fewer when rows x padded length would pass
    `max_batch_tokens`); `on_result(index, result)` as each request is scored.
    """
    rows = plan_rows(requests, max_len=max_length)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", leave=False, disable=not progress)
    i = 0
    while i < len(rows):
        packed = len(rows[i].members) > 1
        t = bucket(rows[i].length)
        n = max(1, min(batch_size, max_batch_tokens // t))
        batch = [r for r in rows[i:i + n] if (len(r.members) > 1) == packed]
        n = min(n, 1 << (len(batch) - 1).bit_length())  # a short last batch: 1, 2, 4...
        # a packed row scores one more position per member than it has tail tokens
        k = bucket(max(r.scored for r in batch), smallest=8)
        tokens = np.zeros((n, t), np.int32)
        seg = np.zeros((n, t), np.int32)
        positions = np.zeros((n, t), np.int32)
        pos = np.zeros((n, k), np.int32)
        tgt = np.zeros((n, k), np.int32)
        spans = []
        for r, row in enumerate(batch):
            p = len(row.prefix)
            tokens[r, :p] = row.prefix
            positions[r, :p] = np.arange(p)
            at, scored = p, 0
            for s_id, (j, tail, cont) in enumerate(row.members, start=1):
                e = at + len(tail)
                tokens[r, at:e] = tail
                seg[r, at:e] = s_id
                positions[r, at:e] = np.arange(p, p + len(tail))
                pos[r, scored:scored + len(cont)] = [p - 1, *range(at, e)]
                tgt[r, scored:scored + len(cont)] = cont
                spans.append((j, r, scored, scored + len(cont)))
                at, scored = e, scored + len(cont)
        args = (jnp.asarray(seg), jnp.asarray(positions)) if packed else (None, None)
        lp, top = _score(graphdef, state, jnp.asarray(tokens), *args, jnp.asarray(pos),
                         jnp.asarray(tgt))
        lp, top = np.asarray(lp, np.float64), np.asarray(top)
        for j, r, a, b in spans:
            out[j] = (float(lp[r, a:b].sum()), bool(top[r, a:b].all()))
            if on_result is not None:
                on_result(j, out[j])
        bar.update(sum(len(r.members) for r in batch))
        i += len(batch)
    bar.close()
    return out
