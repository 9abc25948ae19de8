"""Text generation with a KV cache: one jitted prefill, one jitted single-token decode step.

Prompts are right-padded to a multiple of `PAD` tokens so that prompts of similar length share
one compiled prefill; padded cache slots lie after the last real token, are masked by position
until the decode overwrites them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

PAD = 64


@dataclasses.dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float  # includes compilation on the first call of a shape
    first_decode_seconds: float  # the first decode step, which compiles on a new shape
    decode_seconds: float  # every later decode step
    stopped_by: str  # "eos" | "stop" | "max_new_tokens"

    @property
    def decode_tokens_per_second(self) -> float:
        """Steady-state decode speed: tokens after the first decode step / their time."""
        n = len(self.tokens) - 2  # one token from the prefill, one from the first step
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def greedy_token(logits):
    """logits: [b, vocab] -> [b] int32, jnp.argmax's answer (the first maximum; the first NaN
    if there is one) as two plain reductions: XLA:CPU's argmax (one reduction of value-index
    pairs) took 0.22 ms of a 12 ms decode step over a 49152-word vocabulary, these about a
    third of that (docs/cpu_kernel_notes.md, v9)."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def sample_token(logits, key, *, temperature: float, top_p: float):
    """logits: [b, vocab] float32 -> [b] int32. temperature 0 is greedy (argmax)."""
    if temperature <= 0.0:
        return greedy_token(logits)
    logits = logits / temperature
    if top_p < 1.0:
        # keep the smallest set of tokens whose probability mass reaches top_p
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(model, tokens, cache, last, temperature, top_p, key):
    h, cache = model.hidden(tokens, start=0, cache=cache)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [b, d]
    return sample_token(model.logits(h_last), key, temperature=temperature, top_p=top_p), cache


def _decode(model, token, cache, pos, temperature, top_p, key):
    h, cache = model.hidden(token[:, None], start=pos, cache=cache)
    return sample_token(model.logits(h[:, 0]), key, temperature=temperature, top_p=top_p), cache


@functools.lru_cache(maxsize=8)
def _steps(graphdef, treedef):
    """The jitted prefill and decode steps of one model structure, taking the model's arrays
    as a flat list. Built once per structure: as a static argument the GraphDef was hashed on
    every token, and the state flattened, which cost a quantized SmolLM2 (~900 arrays) 7 ms
    of host time per token, a third of its step (docs/cpu_kernel_notes.md)."""

    def bind(fn):
        def step(leaves, *args):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return fn(model, *args)

        return jax.jit(step, static_argnums=(4, 5), donate_argnums=(2,))

    return bind(_prefill), bind(_decode)


LOOP_TRACES = [0]  # traces of `_loop`'s function so far (tests: one compile per length)


@functools.lru_cache(maxsize=8)
def _loop(graphdef, treedef, n_max: int, temperature: float, top_p: float):
    """The jitted device-side decode loop of one model structure and output length `n_max`:
    up to `n` (<= n_max) steps, stopping after a token in `eos` ([e] int32); the same steps,
    keys and tokens as `_decode` called from the host. Returns (tokens [n_max] int32, how
    many were made, the last token [1], the cache, the key). Dispatching a step from the host
    costs a quantized SmolLM2 (~900 arrays) about 1 ms of host time per token on the CPU
    (argument handling for every array); in one loop the arrays are handed over once
    (docs/cpu_kernel_notes.md, v9)."""

    def run(leaves, token, cache, pos, n, eos, key):
        LOOP_TRACES[0] += 1  # at trace time only: how often a loop was (re)compiled
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

        def cond(c):
            i, _, _, _, _, done = c
            return (i < n) & ~done

        def body(c):
            i, tok, cache, key, out, _ = c
            key, sub = jax.random.split(key)
            tok, cache = _decode(model, tok, cache, pos + i, temperature, top_p, sub)
            out = lax.dynamic_update_index_in_dim(out, tok[0], i, 0)
            return i + 1, tok, cache, key, out, jnp.any(tok[0] == eos)

        init = (jnp.int32(0), token, cache, key, jnp.zeros((n_max,), jnp.int32),
                jnp.bool_(False))
        i, tok, cache, key, out, _ = lax.while_loop(cond, body, init)
        return out, i, tok, cache, key

    return jax.jit(run, donate_argnums=(2,))


def generate_ids(model, prompt_ids, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_ids=(),
                 on_token: Callable[[int], None] | None = None,
                 stop: Callable[[list[int]], bool] | None = None,
                 device_loop: bool | None = None):
    """Generate after `prompt_ids` (batch 1). `stop(new_ids)`, asked after every new token,
    ends the generation when it returns True (stop strings; reason "stop").

    device_loop: run the decode steps in a device-side loop (no host work per token; the same
    tokens; its first call compiles a little longer). With `on_token` or `stop` the loop runs
    in chunks of 1, 2, 4, ... up to CHUNK steps, and they are called for each token of a chunk
    in turn (tokens after a stop are dropped). None: on the CPU backend, where SmolLM2
    decoded 12-16% faster in float32 (any4 and dense) and 5x faster as a dense bf16 model
    (docs/cpu_kernel_notes.md, v9); on a GPU the host loop below overlaps its work with the
    device's (the device loop there is not measured yet: docs/kernels.md, Status).

    Returns (new ids, prefill s, first decode step s, later decode steps s, stop reason).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be positive")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{top_p=} must be in (0, 1]")
    if device_loop is None:
        device_loop = jax.default_backend() == "cpu"
    p = len(prompt_ids)
    p_pad = -(-p // PAD) * PAD
    max_len = -(-(p + max_new_tokens) // PAD) * PAD
    limit = model.config.max_position_embeddings
    if p + max_new_tokens > limit:
        raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings={limit}")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    prefill, decode = _steps(graphdef, treedef)
    tokens = np.zeros((1, p_pad), np.int32)
    tokens[0, :p] = prompt_ids
    cache = model.init_cache(1, max(max_len, p_pad))
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    tok, cache = prefill(leaves, jnp.asarray(tokens), cache,
                         jnp.asarray([p - 1], jnp.int32), float(temperature), float(top_p), sub)
    out = [int(tok[0])]
    prefill_s = time.perf_counter() - t0
    if on_token:
        on_token(out[-1])
    eos = set(int(e) for e in eos_ids)
    reason = "eos" if out[-1] in eos else "stop" if stop and stop(out) else "max_new_tokens"
    if device_loop:
        return _generate_on_device(graphdef, treedef, leaves, tok, cache, p, out, eos,
                                   prefill_s, reason, max_new_tokens=max_new_tokens,
                                   temperature=float(temperature), top_p=float(top_p), key=key,
                                   on_token=on_token, stop=stop)
    t0 = time.perf_counter()
    first_s = 0.0
    pos = p
    # Step i + 1 is dispatched before token i is read back, so the host's work (reading the
    # token, the callback, dispatching) overlaps the device's. The first decode step runs alone
    # (it compiles, and is timed apart). An EOS is seen one step late: that step's result is
    # dropped. On the CPU backend the host's work and the step share the cores, so there each
    # step is waited for before the host goes on: overlapping them was 6% slower for a 4-bit
    # SmolLM2 on two cores (70.0 vs 74.0 tokens/s, docs/cpu_kernel_notes.md, v7).
    overlap = jax.default_backend() != "cpu"
    dev_tok = tok
    inflight = None  # a dispatched step's token, not yet read
    while reason == "max_new_tokens":
        wanted = len(out) + (inflight is not None) < max_new_tokens
        if wanted:
            key, sub = jax.random.split(key)
            dev_tok, cache = decode(leaves, dev_tok, cache, np.int32(pos),
                                    float(temperature), float(top_p), sub)
            pos += 1
            if pos == p + 1:  # the compiling first step: wait for it, time it apart
                dev_tok.block_until_ready()
                first_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            elif not overlap:
                dev_tok.block_until_ready()
        if inflight is not None:
            out.append(int(inflight[0]))
            if on_token:
                on_token(out[-1])
            if out[-1] in eos:
                reason = "eos"
            elif stop and stop(out):
                reason = "stop"
        if not wanted:
            break
        inflight = dev_tok
    decode_s = time.perf_counter() - t0 if pos > p else 0.0
    return out, prefill_s, first_s, decode_s, reason


CHUNK = 16  # the most steps between two returns to the host when tokens are wanted one by one


def _generate_on_device(graphdef, treedef, leaves, tok, cache, p, out, eos, prefill_s, reason,
                        *, max_new_tokens, temperature, top_p, key, on_token, stop):
    """generate_ids after the prefill through the device-side loop (`_loop`): first one step
    (it compiles on a new shape, and is timed apart, as the host loop's first step is), then
    every later step in one call, or, when `on_token` or `stop` wants the tokens one by one,
    in chunks of 2, 4, ... up to CHUNK steps, each token then handed to them in turn. One
    compiled program: compiling the single step as well made SmolLM2's first step 4.2 s
    instead of 2.2 (the host loop's: 1.5 s)."""
    per_token = on_token is not None or stop is not None
    t0 = time.perf_counter()
    first_s = decode_s = 0.0
    rest = max_new_tokens - len(out)
    if reason != "max_new_tokens" or rest <= 0:
        return out, prefill_s, first_s, decode_s, reason
    n_max = -(-rest // PAD) * PAD  # one compiled loop serves lengths up to a PAD
    run = _loop(graphdef, treedef, n_max, temperature, top_p)
    eos_ids = np.asarray(sorted(eos) or [-1], np.int32)  # -1: no token is it
    pos, size = p, 1
    while reason == "max_new_tokens" and len(out) < max_new_tokens:
        left = max_new_tokens - len(out)
        n = min(size, left) if pos == p or per_token else left
        new, count, tok, cache, key = run(leaves, tok, cache, np.int32(pos), np.int32(n),
                                          eos_ids, key)
        new = np.asarray(new)[:int(count)].tolist()
        for t in new:  # the loop stopped after an EOS; a stop may come earlier
            out.append(t)
            if on_token:
                on_token(t)
            if t in eos:
                reason = "eos"
            elif stop and stop(out):
                reason = "stop"
            if reason != "max_new_tokens":
                break
        if pos == p:
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        else:
            decode_s = time.perf_counter() - t0
        pos += len(new)
        size = min(2 * size, CHUNK)
    return out, prefill_s, first_s, decode_s, reason


def clear_compiled() -> None:
    """Forget every traced step and loop: the next generation retraces (after a change the
    trace cannot see, such as the kernel a layer calls)."""
    _steps.cache_clear()
    _loop.cache_clear()


def generate(model, tokenizer, prompt: str, **kw) -> Generation:
    """Generate a continuation of `prompt` text; keyword arguments as `generate_ids`."""
    ids = tokenizer.encode(prompt)
    kw.setdefault("eos_ids", tokenizer.eos_ids)
    new, pre_s, first_s, dec_s, reason = generate_ids(model, ids, **kw)
    shown = [t for t in new if t not in set(tokenizer.eos_ids)]
    return Generation(text=tokenizer.decode(shown), tokens=new, prompt_tokens=len(ids),
                      prefill_seconds=pre_s, first_decode_seconds=first_s,
                      decode_seconds=dec_s, stopped_by=reason)


def decode_speed(model, prompt_ids, tokens: int, runs: int) -> float:
    """Median tokens/s of greedy batch-1 decoding over `runs` runs of `tokens` new tokens,
    the first (prefill) and second (compiling) token excluded (the benchmarks' measure)."""
    import statistics

    if tokens < 3:
        raise ValueError(f"{tokens=}: decode speed needs at least 3 new tokens (the prefill "
                         "and the first, compiling step are not timed)")
    speeds = []
    for _ in range(runs):
        out, _, _, decode_s, _ = generate_ids(model, prompt_ids, max_new_tokens=tokens)
        speeds.append((len(out) - 2) / decode_s)
    return statistics.median(speeds)
