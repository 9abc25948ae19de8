"""KV-cache generation against full recomputation, and the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.models.llama import generate
from any4_jax.models.llama.config import TINY
from any4_jax.models.llama.generate import PAD, generate_ids, greedy_token, sample_token
from any4_jax.models.llama.params import random_model


def _naive_greedy(model, prompt, n):
    """Greedy by recomputing the whole sequence each step (no cache). Causality lets one
    fixed padded length serve every step, so it compiles once."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    length = len(prompt) + n
    step = jax.jit(lambda st, ids, i: jnp.argmax(nnx.merge(graphdef, st)(ids)[0][0, i]))
    ids = np.zeros((1, length), np.int32)
    ids[0, :len(prompt)] = prompt
    for i in range(len(prompt), length):
        ids[0, i] = int(step(state, jnp.asarray(ids), i - 1))
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("sliding_window", [None, 8])
@pytest.mark.parametrize("prompt_len", [5, PAD + 3])
def test_cached_greedy_equals_recomputation(prompt_len, sliding_window):
    cfg = TINY.replace(sliding_window=sliding_window)
    # scaled-up random weights so that greedy choices are not near-ties
    model = random_model(cfg, seed=3)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()
    n = 24
    got, *_ , reason = generate_ids(model, prompt, max_new_tokens=n)
    assert reason == "max_new_tokens" and len(got) == n
    assert got == _naive_greedy(model, prompt, n)


def test_stops_at_eos():
    model = random_model(TINY, seed=3)
    prompt = [1, 2, 3]
    first = _naive_greedy(model, prompt, 3)
    got, *_, reason = generate_ids(model, prompt, max_new_tokens=10, eos_ids=(first[2],))
    assert reason == "eos" and got == first


def test_bad_arguments_are_named():
    model = random_model(TINY)
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_ids(model, [1] * 10, max_new_tokens=TINY.max_position_embeddings)
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(model, [1], top_p=0.0)


def test_sampling_follows_the_distribution_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k, tp: sample_token(logits, k, temperature=1.0, top_p=tp)[0],
                    in_axes=(0, None))
    full = np.bincount(np.asarray(draw(keys, 1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p = 0.7 keeps {0.5, 0.3}: the smallest set reaching 0.7 mass
    nucleus = np.bincount(np.asarray(draw(keys, 0.7)), minlength=4) / len(keys)
    assert nucleus[2] == nucleus[3] == 0
    np.testing.assert_allclose(nucleus[:2], [0.625, 0.375], atol=0.03)
    greedy = sample_token(logits, keys[0], temperature=0.0, top_p=1.0)
    assert int(greedy[0]) == 0


def test_greedy_token_is_argmax_with_ties_nans_and_infinities():
    rng = np.random.default_rng(0)
    for case in range(60):
        b, v = int(rng.integers(1, 4)), int(rng.integers(1, 300))
        logits = rng.standard_normal((b, v)).astype(np.float32)
        if case % 3 == 0:
            logits = np.round(logits)  # ties: the first maximum wins
        if case % 5 == 0:
            logits[rng.random((b, v)) < 0.05] = np.nan  # the first NaN wins
        if case % 7 == 0:
            logits[:] = -np.inf
        x = jnp.asarray(logits, jnp.bfloat16 if case % 4 == 1 else jnp.float32)
        np.testing.assert_array_equal(greedy_token(x), jnp.argmax(x, axis=-1), err_msg=case)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 0.9)])
def test_the_device_loop_gives_the_host_loops_tokens(temperature, top_p):
    """The device-side loop (one step, then the rest in one call, or in chunks when a
    callback wants each token) against one step per host iteration: same keys, same tokens,
    same callbacks, same stop."""
    model = random_model(TINY, seed=3)
    prompt = [5, 9, 2, 7]
    kw = dict(temperature=temperature, top_p=top_p, seed=1, max_new_tokens=40)
    host_seen, dev_seen = [], []
    host, *_, host_reason = generate_ids(model, prompt, on_token=host_seen.append,
                                         device_loop=False, **kw)
    dev, _, first_s, decode_s, dev_reason = generate_ids(model, prompt, device_loop=True, **kw)
    chunked, *_, chunked_reason = generate_ids(model, prompt, on_token=dev_seen.append,
                                               device_loop=True, **kw)
    assert host_seen == host == dev == chunked == dev_seen and len(dev) == 40
    assert host_reason == dev_reason == chunked_reason == "max_new_tokens"
    assert first_s > 0 and decode_s > 0
    # EOS from the prefill (0), the first step (1), the first of the rest (2), later (7, and
    # 20: past the first chunks): every path stops on its first appearance, EOS included
    for i in (0, 1, 2, 7, 20):
        eos = host[i]
        want = host[:host.index(eos) + 1]
        got = [generate_ids(model, prompt, eos_ids=(eos,), device_loop=loop, **opt, **kw)
               for loop, opt in ((False, {"on_token": lambda t: None}), (True, {}),
                                 (True, {"on_token": lambda t: None}))]
        assert all(g[0] == want and g[-1] == "eos" for g in got), i
    # a stop after k tokens: the callbacks see exactly those, the chunk's later tokens dropped
    for k in (1, 2, 5, 13):
        runs = []
        for loop in (False, True):
            seen = []
            out, *_, reason = generate_ids(model, prompt, on_token=seen.append,
                                           stop=lambda ids, k=k: len(ids) >= k,
                                           device_loop=loop, **kw)
            runs.append((out, seen, reason))
        assert runs[0] == runs[1] == (host[:k], host[:k], "stop"), k
    for n in (1, 2, 3):  # the prefill alone; the first step alone; one more
        got, *_, reason = generate_ids(model, prompt, device_loop=True,
                                       **{**kw, "max_new_tokens": n})
        assert got == host[:n] and reason == "max_new_tokens", n


def test_the_device_loop_compiles_once_per_length_bucket():
    model = random_model(TINY, seed=3)
    generate.clear_compiled()
    before = generate.LOOP_TRACES[0]
    generate_ids(model, [1, 2, 3], max_new_tokens=9, device_loop=True)
    traces = generate.LOOP_TRACES[0]
    assert traces == before + 1  # both calls of a generation share one compiled loop
    for tokens in (10, 12, 4):  # every remainder fits the same PAD-long buffer
        out, *_ = generate_ids(model, [1, 2, 3], max_new_tokens=tokens, device_loop=True)
        assert len(out) == tokens
    assert generate.LOOP_TRACES[0] == traces
    generate_ids(model, [1, 2, 3], max_new_tokens=PAD + 10, device_loop=True)  # a longer one
    assert generate.LOOP_TRACES[0] == traces + 1
