"""Mixtral: the sparse mixture-of-experts block, its loading and its parity with transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from any4_jax.models.llama.config import MIXTRAL_8X7B, PUBLISHED_PARAMS, TINY, LlamaConfig
from any4_jax.models.llama.moe import DECODE_ASSIGNMENTS, TILE_ROWS, route, tile_layout
from any4_jax.models.llama.params import random_model

TINY_MOE = TINY.replace(name="tiny-moe", num_experts=4, experts_per_token=2)


def tiny_mixtral_hf(*, vocab=256, seed=0, sliding_window=None, experts=4):
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=sliding_window,
        rope_theta=10000.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: routing and attention far from uniform
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
    return model


def save_tiny_mixtral(path, **kw):
    """A tiny random Mixtral directory (transformers' save_pretrained) with a byte tokenizer."""
    from tests.tiny_lm import byte_tokenizer

    m = tiny_mixtral_hf(**kw)
    m.save_pretrained(path)
    byte_tokenizer()._tok.save(str(path / "tokenizer.json"))
    return m


def test_preset_shapes_match_the_published_parameter_count():
    m = nnx.eval_shape(lambda: __import__("any4_jax.models.llama.modules", fromlist=["Llama"])
                       .Llama(MIXTRAL_8X7B, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m)))
    assert n == MIXTRAL_8X7B.num_params() == PUBLISHED_PARAMS["Mixtral-8x7B"]
    e = m.layers[0].block_sparse_moe.experts
    assert e.w1.kernel.shape == (8, 4096, 14336) and e.w2.kernel.shape == (8, 14336, 4096)


def test_config_round_trips_and_rejects_other_moe_architectures():
    hf = TINY_MOE.to_hf()
    assert hf["model_type"] == "mixtral" and hf["num_local_experts"] == 4
    assert LlamaConfig.from_hf(hf, name="tiny-moe") == TINY_MOE
    assert LlamaConfig.from_dict(TINY_MOE.to_dict()) == TINY_MOE
    for mt, name in (("qwen2_moe", "Qwen-MoE"), ("deepseek_v3", "DeepSeek-V3")):
        with pytest.raises(ValueError, match=name):
            LlamaConfig.from_hf({**hf, "model_type": mt})
    with pytest.raises(ValueError, match="num_local_experts"):
        LlamaConfig.from_hf({k: v for k, v in hf.items() if k != "num_local_experts"})
    with pytest.raises(ValueError, match="experts_per_token"):
        TINY.replace(num_experts=2, experts_per_token=3)


@pytest.mark.parametrize("b", [1, 4])
def test_tile_layout_puts_each_assignment_once_in_its_experts_tiles(rng, b):
    experts = jnp.asarray(rng.integers(0, 5, 37), jnp.int32)
    dest, r = tile_layout(experts, 5, b)
    dest, te, valid = np.asarray(dest), np.asarray(r.tile_expert), np.asarray(r.row_valid)
    assert len(set(dest)) == 37 and valid.sum() == 37
    assert (te[dest // b] == np.asarray(experts)).all()  # each row sits in its expert's tile
    for e in range(5):  # rows of one expert keep the assignment order
        d = dest[np.asarray(experts) == e]
        assert (np.diff(d) > 0).all()
    assert te.shape[0] == -(-(37 + 5 * (b - 1)) // b)
    assert ((te >= 0) == valid.any(1)).all()  # no used tile without a row, nor the reverse


def test_grouped_path_equals_every_expert_on_every_token():
    m = random_model(TINY_MOE, seed=1)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 3 * TILE_ROWS)))
    grouped, _ = m(toks)
    for blk in m.layers:
        blk.block_sparse_moe.strategy = "all"
    dense, _ = m(toks)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), atol=2e-6, rtol=0)
    # a decode-sized call (one row per tile) is the same function
    assert DECODE_ASSIGNMENTS >= 2 * 2
    small, _ = m(toks[:, :2])
    np.testing.assert_allclose(np.asarray(small), np.asarray(dense[:, :2]), atol=2e-6, rtol=0)


def test_routing_follows_transformers_rule():
    logits = jnp.asarray([[0.1, 2.0, -1.0, 1.5], [3.0, 3.0, 0.0, -2.0]])
    w, e = route(logits, 2)
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    top = np.sort(p, -1)[:, ::-1][:, :2]
    np.testing.assert_allclose(np.asarray(w), top / top.sum(-1, keepdims=True), rtol=1e-6)
    assert np.asarray(e)[0].tolist() == [1, 3]


@pytest.mark.parametrize("window", [None, 8])
def test_logits_and_experts_match_transformers(tmp_path, window):
    import torch

    from any4_jax.models.llama.convert_hf import load_hf_model

    hf = tiny_mixtral_hf(sliding_window=window)
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_model(tmp_path, param_dtype=jnp.float32)
    assert cfg.num_experts == 4 and cfg.sliding_window == window
    ids = np.random.default_rng(1).integers(0, 256, (2, 40))
    with torch.no_grad():
        out = hf(torch.as_tensor(ids), output_router_logits=True)
    ours, _ = model(jnp.asarray(ids))
    ref = out.logits.float().numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    # the same experts per token in the first layer (router logits of layer 0 are exact)
    x, _ = model.embed_inputs(jnp.asarray(ids))
    blk = model.layers[0]
    h = x + blk.self_attn(blk.input_layernorm(x), *model.embed_inputs(jnp.asarray(ids))[1])[0]
    _, ours_e = blk.block_sparse_moe.routing(blk.post_attention_layernorm(h))
    theirs = torch.topk(out.router_logits[0], 2, dim=-1).indices.numpy()
    assert (np.sort(np.asarray(ours_e), -1) == np.sort(theirs, -1)).mean() > 0.99


def test_loader_names_missing_experts_and_extra_ones(tmp_path):
    from safetensors.numpy import load_file, save_file

    from any4_jax.models.llama.convert_hf import load_hf_model
    from any4_jax.models.llama.safetensors_io import CheckpointError

    tiny_mixtral_hf().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if ".experts.3.w2." not in k}, f)
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight"):
        load_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_local_experts"] = 3  # the file holds a fourth expert the config lacks
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"\(64, 3\); the config and the weights disagree"):
        load_hf_model(tmp_path)
