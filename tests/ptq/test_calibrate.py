"""Calibration: block call groups, statistics against a direct computation, calibration
tokens, and the errors of the config and of the block grouping."""

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.nn import dense_layers
from any4_jax.ptq.calibrate import (
    CalibrationConfig,
    calibration_tokens,
    call_groups,
    collect_offline,
    finalize,
)
from any4_jax.ptq.quantize_model import select_layers
from any4_jax.quant.config import QuantConfig
from tests.tiny_lm import byte_tokenizer, tiny_model

ANY4 = QuantConfig(format="any4", group_size=32)


def test_block_call_groups(tokens):
    m = tiny_model()
    x, extras = m.embed_inputs(jnp.asarray(tokens))
    paths = sorted(p for p, _ in dense_layers(m.layers[0]))  # alphabetical, not call order
    groups = call_groups(m.layers[0], x, extras, paths)
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_offline_statistics_match_a_direct_computation(tokens):
    m = tiny_model()
    paths = select_layers(m)
    sums, count = collect_offline(m, tokens, paths)
    x = m.embed_tokens(jnp.asarray(tokens))
    h = np.asarray(m.layers[0].input_layernorm(x), np.float64).reshape(-1, x.shape[-1])
    got = finalize(sums, count, "abs_of_mean")["layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(got, np.abs(h.mean(0)), rtol=1e-5, atol=1e-7)
    got = finalize(sums, count, "mean_of_abs")["layers.0.self_attn.k_proj"]
    np.testing.assert_allclose(got, np.abs(h).mean(0), rtol=1e-5, atol=1e-7)
    assert count == tokens.size


def test_calibration_tokens_are_seeded_windows_of_the_text():
    encode = byte_tokenizer().encode
    text = "It is a truth universally acknowledged, that a single man in possession. " * 40
    ids = np.asarray(encode(text))
    cfg = CalibrationConfig(source="text", num_samples=5, seq_len=32, seed=3)
    a = calibration_tokens(encode, cfg, text)
    assert a.shape == (5, 32) and a.dtype == np.int32
    np.testing.assert_array_equal(a, calibration_tokens(encode, cfg, text))  # same seed
    for row in a:  # each window is a contiguous slice of the tokenized text
        starts = [s for s in range(len(ids) - 32) if (ids[s:s + 32] == row).all()]
        assert starts
    other = calibration_tokens(encode, CalibrationConfig(source="text", num_samples=5,
                                                         seq_len=32, seed=4), text)
    assert not np.array_equal(a, other)
    # the prompt source ignores the text
    prompt = calibration_tokens(encode, CalibrationConfig(), text)
    assert prompt.shape[0] == 1


def test_calibration_errors_name_the_value():
    encode = byte_tokenizer().encode
    with pytest.raises(ValueError, match="has 5 tokens, not more than seq_len=32"):
        calibration_tokens(encode, CalibrationConfig(source="text", seq_len=32), "short")
    with pytest.raises(ValueError, match="unknown statistic='median'"):
        CalibrationConfig(statistic="median")
    with pytest.raises(ValueError, match="unknown mode='online'"):
        CalibrationConfig(mode="online")
    with pytest.raises(ValueError, match="CalibrationConfig.batch_size=0 must be positive"):
        CalibrationConfig(batch_size=0)


def test_layers_outside_the_blocks_are_named(tokens):
    m = tiny_model()
    with pytest.raises(ValueError, match=r"covers the decoder blocks only; \['lm_head'\]"):
        collect_offline(m, tokens, ["layers.0.mlp.up_proj", "lm_head"])
    x, extras = m.embed_inputs(jnp.asarray(tokens))
    with pytest.raises(ValueError, match="no layer 'mlp.no_such_proj' in this Block: "
                                         "MLP has no 'no_such_proj'"):
        call_groups(m.layers[0], x, extras, ["mlp.up_proj", "mlp.no_such_proj"])
