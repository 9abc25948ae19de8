"""Quantizing a mixture-of-experts model: stacked experts as rows, routed calibration,
checkpoints and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import checkpoint as ck
from any4_jax.eval.perplexity import perplexity
from any4_jax.loading import load_model
from any4_jax.models.llama.config import TINY
from any4_jax.models.llama.params import random_model
from any4_jax.nn import QuantDense
from any4_jax.nn.layers import weight_rows
from any4_jax.nn.qexperts import QuantExpertDense
from any4_jax.ptq.calibrate import collect_offline, finalize
from any4_jax.ptq.quantize_model import quantize_model, select_layers
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.quantize import quantize_weight
from tests.tiny_lm import byte_tokenizer

TINY_MOE = TINY.replace(name="tiny-moe", num_experts=4, experts_per_token=2)
CFG = QuantConfig(format="any4", group_size=32)
W1 = "layers.0.block_sparse_moe.experts.w1"


def moe_model(idle=False, seed=0):
    """The tiny MoE; `idle`: block 0's MoE input zeroed (its norm weight), so every router
    logit ties and top-2 picks experts 0 and 1: experts 2 and 3 see no token."""
    m = random_model(TINY_MOE, seed=seed)
    if idle:
        n = m.layers[0].post_attention_layernorm.weight
        n[...] = jnp.zeros_like(n[...])
    return m


@pytest.fixture(scope="module")
def quantized(tokens):
    return quantize_model(moe_model(), CFG, tokens=tokens, progress=False)


def test_experts_are_quantized_as_rows_and_the_router_stays_dense(quantized):
    qm, rep = quantized
    e = qm.layers[0].block_sparse_moe.experts
    assert isinstance(e.w1, QuantExpertDense) and e.w1.num_experts == 4
    assert e.w1.meta.shape == (4 * 128, 64) and e.w2.meta.shape == (4 * 64, 128)
    assert not isinstance(qm.layers[0].block_sparse_moe.gate, QuantDense)
    assert rep.mode == "sequential" and rep.uncalibrated_experts == {}
    assert sorted(r.path for r in rep.layers if "experts" in r.path)[:3] == [
        "layers.0.block_sparse_moe.experts.w1", "layers.0.block_sparse_moe.experts.w2",
        "layers.0.block_sparse_moe.experts.w3"]
    # naming the router in include lifts the default exclusion
    paths = select_layers(moe_model(), include=("*", "gate"))
    assert "layers.1.block_sparse_moe.gate" in paths and "lm_head" not in paths


def test_quantized_experts_compute_each_experts_dequantized_product(quantized, rng):
    qm, _ = quantized
    layer = qm.layers[1].block_sparse_moe.experts.w2
    w = np.asarray(layer.qweight.dequantize(jnp.float32)).reshape(4, 64, 128)
    from any4_jax.models.llama.moe import tile_layout

    experts = jnp.asarray(rng.integers(0, 4, 10), jnp.int32)
    dest, routing = tile_layout(experts, 4, 4)
    x = jnp.asarray(rng.standard_normal((10, 128)), jnp.float32)
    rows = jnp.zeros((routing.row_valid.size, 128)).at[dest].set(x)
    y = np.asarray(layer(rows.reshape(-1, 4, 128), routing).reshape(-1, 64))[np.asarray(dest)]
    want = np.einsum("tk,tnk->tn", np.asarray(x), w[np.asarray(experts)])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_routed_statistics_equal_a_direct_computation(tokens):
    m = moe_model()
    sums, count = collect_offline(m, tokens, [W1, "layers.0.block_sparse_moe.experts.w2"])
    xbar = finalize(sums, count, "abs_of_mean")
    # directly: the MoE input of block 0 and the experts each token is routed to
    x, extras = m.embed_inputs(jnp.asarray(tokens))
    blk = m.layers[0]
    h = x + blk.self_attn(blk.input_layernorm(x), *extras)[0]
    moe_in = blk.post_attention_layernorm(h).reshape(-1, 64)
    _, chosen = blk.block_sparse_moe.routing(moe_in[None])
    chosen = np.asarray(chosen)
    k1 = np.asarray(blk.block_sparse_moe.experts.w1.kernel[...])
    k3 = np.asarray(blk.block_sparse_moe.experts.w3.kernel[...])
    xin = np.asarray(moe_in)
    for e in range(4):
        routed = (chosen == e).any(1)
        assert routed.sum() == sums[W1][2][e]
        np.testing.assert_allclose(xbar[W1][e], np.abs(xin[routed].mean(0)), rtol=1e-4,
                                   atol=1e-6)
        hid = jax.nn.silu(xin[routed] @ k1[e]) * (xin[routed] @ k3[e])
        np.testing.assert_allclose(xbar["layers.0.block_sparse_moe.experts.w2"][e],
                                   np.abs(np.asarray(hid).mean(0)), rtol=1e-4, atol=1e-6)


def test_an_expert_without_tokens_falls_back_and_is_reported(tokens):
    m = moe_model(idle=True)
    w = weight_rows(m.layers[0].block_sparse_moe.experts.w2)
    qm, rep = quantize_model(m, CFG, tokens=tokens, progress=False)
    assert rep.uncalibrated_experts == {
        f"layers.0.block_sparse_moe.experts.{p}": [2, 3] for p in ("w1", "w2", "w3")}
    got = qm.layers[0].block_sparse_moe.experts.w2.qweight
    plain = quantize_weight(w, CFG)  # no statistics at all
    np.testing.assert_array_equal(np.asarray(got.codes[2 * 64:]),
                                  np.asarray(plain.codes[2 * 64:]))


def test_save_load_eval_bit_for_bit_and_decode(quantized, tmp_path):
    from any4_jax.models.llama.generate import generate_ids

    qm, _ = quantized
    tok = byte_tokenizer()
    path = ck.save_quantized(tmp_path / "q", qm, tokenizer=tok, metadata={})
    lm = load_model(path)
    assert isinstance(lm.model.layers[1].block_sparse_moe.experts.w3, QuantExpertDense)
    ids = np.asarray(tok.encode("It is a truth universally acknowledged. " * 10), np.int32)
    a = perplexity(qm, ids, seq_len=128, progress=False)
    b = perplexity(lm.model, ids, seq_len=128, progress=False)
    assert a.window_nll == b.window_nll
    out, *_ = generate_ids(lm.model, ids[:8].tolist(), max_new_tokens=5)
    ref, *_ = generate_ids(qm, ids[:8].tolist(), max_new_tokens=5)
    assert out == ref and len(out) == 5
