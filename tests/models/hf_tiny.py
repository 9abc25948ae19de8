"""Tiny random transformers models saved with save_pretrained (the parity oracle), and the
same weights written as a Hugging Face Flax checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np

from any4_jax.models.llama.convert_flax import flatten, unflatten

VOCAB = 320


def tiny_hf_model(kind: str = "llama", *, tied: bool = False, rope_scaling: bool = False,
                  sliding_window: int | None = None, seed: int = 0):
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=1024, rms_norm_eps=1e-5)
    if kind == "mistral":
        cfg = transformers.MistralConfig(sliding_window=sliding_window, rope_theta=10000.0,
                                         **common)
        cls = transformers.MistralForCausalLM
    else:
        extra = {}
        if rope_scaling:
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(rope_theta=500000.0 if rope_scaling else 10000.0,
                                       **common, **extra)
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # larger-than-default weights so that attention patterns are not near-uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def linen_tree(hf_model) -> dict:
    """torch state dict -> the Linen-layout tree of FlaxLlamaForCausalLM."""
    flat = {}
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        parts = name.split(".")
        if parts[-1] != "weight":
            continue
        if parts[:2] == ["model", "embed_tokens"]:
            flat["model/embed_tokens/embedding"] = a
        elif parts[-2].endswith("_proj") or parts[0] == "lm_head":
            flat["/".join(parts[:-1]) + "/kernel"] = a.T  # torch [out, in] -> [in, out]
        else:
            flat["/".join(parts)] = a
    if hf_model.config.tie_word_embeddings:
        flat.pop("lm_head/kernel", None)
    return unflatten(flat)


def write_flax_checkpoint(hf_model, path, *, shards: int = 1) -> str:
    from flax import serialization

    os.makedirs(path, exist_ok=True)
    hf_model.config.to_json_file(os.path.join(path, "config.json"))
    flat = flatten(linen_tree(hf_model))
    if shards == 1:
        with open(os.path.join(path, "flax_model.msgpack"), "wb") as fh:
            fh.write(serialization.msgpack_serialize(unflatten(flat)))
        return str(path)
    names = sorted(flat)
    chunks = np.array_split(np.arange(len(names)), shards)
    wmap = {}
    for i, idx in enumerate(chunks):
        fname = f"flax_model-{i + 1:05d}-of-{shards:05d}.msgpack"
        part = {names[j]: flat[names[j]] for j in idx}
        wmap.update({n: fname for n in part})
        with open(os.path.join(path, fname), "wb") as fh:
            fh.write(serialization.msgpack_serialize(unflatten(part)))
    with open(os.path.join(path, "flax_model.msgpack.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": wmap}, fh)
    return str(path)


def ids(t=24, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, t)).astype(np.int32)
