"""LlamaConfig presets, parameter counts, and the Hugging Face config mapping."""

import jax
import pytest
from flax import nnx

from any4_jax.models.llama import config as C
from any4_jax.models.llama.modules import Llama


@pytest.mark.parametrize("name", list(C.PUBLISHED_PARAMS))
def test_full_size_preset_shapes_and_param_count(name):
    cfg = C.PRESETS[name]
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))  # no memory
    _, state = nnx.split(model)
    n = sum(v.size for v in jax.tree.leaves(state))
    assert n == C.PUBLISHED_PARAMS[name] == cfg.num_params()
    emb = model.embed_tokens.embedding
    assert emb.shape == (cfg.vocab_size, cfg.hidden_size)
    q = model.layers[0].self_attn.q_proj.kernel
    assert q.shape == (cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    assert (model.lm_head is None) == cfg.tie_word_embeddings


def test_hf_round_trip():
    for cfg in C.PRESETS.values():
        back = C.LlamaConfig.from_hf(cfg.to_hf(), name=cfg.name)
        assert back == cfg
        assert C.LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_transformers5_rope_parameters_layout():
    hf = C.LLAMA32_1B.to_hf()
    scaling = hf.pop("rope_scaling")
    hf["rope_parameters"] = {"rope_theta": hf.pop("rope_theta"), **scaling}
    assert C.LlamaConfig.from_hf(hf, name="Llama-3.2-1B") == C.LLAMA32_1B


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_attention_heads": 5}, "multiple of num_kv_heads"),
])
def test_bad_hf_configs_are_named(change, match):
    hf = {**C.TINY.to_hf(), **change}
    with pytest.raises(ValueError, match=match):
        C.LlamaConfig.from_hf(hf)


def test_missing_key_is_named():
    hf = C.TINY.to_hf()
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        C.LlamaConfig.from_hf(hf)


def test_llama3_rope_scaling_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in C.LLAMA32_1B.to_hf().items()
                                          if k not in ("architectures", "model_type")})
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    ours = C.rope_inv_freq(C.LLAMA32_1B)
    assert ours.shape == tuple(inv.shape)
    assert abs(ours - inv.numpy()).max() <= 1e-6 * abs(inv.numpy()).max()
