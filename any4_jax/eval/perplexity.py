"""Perplexity in a jitted loop (GPTQ convention, docs/design.md section 4).

Tokenize the whole text once, cut non-overlapping windows of `seq_len` tokens from the start,
drop the tail; per window the mean NLL over its `seq_len - 1` predicted positions from float32
logits; ppl = exp(mean over windows). Windows go through one jitted step in batches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    windows: int
    tokens: int  # tokens in the evaluated windows (windows * seq_len)
    seq_len: int
    batch_size: int
    window_nll: list[float]
    compile_seconds: float
    eval_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.eval_seconds if self.eval_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d


def windows_of(ids, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """[n, seq_len] int32 non-overlapping windows from the start; the tail is dropped."""
    ids = np.asarray(ids, np.int32)
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of "
                         f"seq_len={seq_len}; use a longer text or a smaller --seq-len")
    return ids[:n * seq_len].reshape(n, seq_len)


# Positions per chunk of the NLL head: the [chunk, vocab] logits stay small (no [t, vocab]
# float32 array), which is 25% faster on CPU than one big block and bounds memory per window.
NLL_CHUNK = 128


def token_nll(model, h, targets, *, chunk: int = NLL_CHUNK):
    """h: [b, t, d] hidden states, targets: [b, t] -> NLL of each target [b, t] (float32)."""
    return token_scores(model, h, targets, chunk=chunk)[0]


def token_scores(model, h, targets, *, chunk: int = NLL_CHUNK):
    """h: [b, t, d], targets: [b, t] -> (NLL of each target [b, t] float32, whether the
    target is the argmax [b, t] bool). Unused outputs cost nothing under jit."""
    b, t, d = h.shape
    tp = -(-t // chunk) * chunk
    hc = jnp.pad(h, [(0, 0), (0, tp - t), (0, 0)]).reshape(b, tp // chunk, chunk, d)
    tc = jnp.pad(targets, [(0, 0), (0, tp - t)]).reshape(b, tp // chunk, chunk)

    def one(args):
        hh, tt = args  # [b, chunk, d], [b, chunk]
        logits = model.logits(hh)  # [b, chunk, vocab] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0]
        return lse - picked, jnp.argmax(logits, axis=-1) == tt

    nll, top = jax.lax.map(one, (hc.transpose(1, 0, 2, 3), tc.transpose(1, 0, 2)))
    return (nll.transpose(1, 0, 2).reshape(b, tp)[:, :t],
            top.transpose(1, 0, 2).reshape(b, tp)[:, :t])


def window_nll(model, tokens):
    """tokens: [b, t] -> mean next-token NLL per window [b] (float32)."""
    h, _ = model.hidden(tokens)
    return jnp.mean(token_nll(model, h[:, :-1], tokens[:, 1:]), axis=-1)


@partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens):
    return window_nll(nnx.merge(graphdef, state), tokens)


def perplexity(model, ids, *, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on the token ids `ids` (the whole text, tokenized once)."""
    if seq_len < 2:
        raise ValueError(f"{seq_len=} must be at least 2")
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be positive")
    win = windows_of(ids, seq_len, max_windows)
    n = len(win)
    b = min(batch_size, n)
    pad = -n % b  # the last batch repeats window 0; its results are dropped
    batches = np.concatenate([win, np.repeat(win[:1], pad, 0)]).reshape(-1, b, seq_len)
    graphdef, state = nnx.split(model)

    t0 = time.perf_counter()
    step = _step.lower(graphdef, state, jnp.asarray(batches[0])).compile()
    compile_s = time.perf_counter() - t0

    out = []
    bar = tqdm(total=n, unit="win", desc=f"perplexity ({seq_len} tok/window)",
               disable=not progress, leave=False)
    t0 = time.perf_counter()
    for batch in batches:
        nll = np.asarray(step(state, jnp.asarray(batch)))
        out.append(nll)
        bar.update(min(b, n - bar.n))
    eval_s = time.perf_counter() - t0
    bar.close()
    nlls = np.concatenate(out)[:n].astype(np.float64)
    mean = float(nlls.mean())
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean, windows=n, tokens=n * seq_len,
                            seq_len=seq_len, batch_size=b, window_nll=nlls.tolist(),
                            compile_seconds=compile_s, eval_seconds=eval_s)
