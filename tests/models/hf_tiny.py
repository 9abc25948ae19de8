"""Tiny random transformers models saved with save_pretrained: the parity oracle."""

from __future__ import annotations

import numpy as np

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
