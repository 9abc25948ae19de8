"""A tiny random Llama with a byte-level tokenizer: end-to-end tests in seconds."""

from __future__ import annotations


def byte_tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    from any4_jax.models.llama.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTok(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, bos_id=None, eos_ids=(), add_bos=False, source="bytes")


def tiny_model(seed: int = 0, **changes):
    import jax.numpy as jnp

    from any4_jax.models.llama.config import TINY
    from any4_jax.models.llama.params import random_model

    cfg = TINY.replace(**changes) if changes else TINY
    return random_model(cfg, seed=seed, param_dtype=jnp.float32)


def quantized_tiny(down_proj_format: str = "nf4"):
    """(the tiny model quantized to any4 g32, calibrated on the built-in prompt, with its
    down_proj layers in `down_proj_format`; the byte tokenizer)."""
    from any4_jax.ptq.calibrate import CalibrationConfig, calibration_tokens
    from any4_jax.ptq.quantize_model import quantize_model
    from any4_jax.quant.config import QuantConfig

    tok = byte_tokenizer()
    toks = calibration_tokens(tok.encode, CalibrationConfig())
    qm, _ = quantize_model(tiny_model(), QuantConfig(format="any4", group_size=32),
                           tokens=toks, overrides={"down_proj": {"format": down_proj_format}},
                           progress=False)
    return qm, tok
