"""Whole-model quantization: selection, overrides, calibration modes, QuantDense numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.models.llama.modules import Dense
from any4_jax.nn import dense_layers
from any4_jax.ptq.calibrate import (
    CalibrationConfig,
    collect_offline,
    finalize,
)
from any4_jax.ptq.quantize_model import quantize_model, select_layers
from any4_jax.quant.config import QuantConfig
from tests.tiny_lm import tiny_model

ANY4 = QuantConfig(format="any4", group_size=32)


def _kinds(model):
    return {p: type(layer).__name__ for p, layer in dense_layers(model)}


def test_defaults_quantize_every_decoder_dense_and_leave_the_input_alone():
    m = tiny_model()
    qm, rep = quantize_model(m, QuantConfig(format="int4", group_size=32), progress=False)
    kinds = _kinds(qm)
    assert kinds.pop("lm_head") == "Dense"
    assert set(kinds.values()) == {"QuantDense"} and len(kinds) == 14
    assert len(rep.layers) == 14 and rep.mode == "none"
    assert set(_kinds(m).values()) == {"Dense"}  # the input model is unchanged
    assert qm.embed_tokens.embedding.get_value() is m.embed_tokens.embedding.get_value()


def test_include_exclude_and_overrides():
    m = tiny_model()
    assert select_layers(m, include=("*mlp*",)) == [
        f"layers.{i}.mlp.{n}" for i in (0, 1) for n in ("down_proj", "gate_proj", "up_proj")]
    assert "lm_head" in select_layers(m, exclude=())
    qm, _ = quantize_model(m, QuantConfig(format="int4", group_size=32),
                           exclude=("lm_head", "layers.1.*"),
                           overrides={"down_proj": {"group_size": 64},
                                      "q_proj": {"format": "int3"}}, progress=False)
    kinds = _kinds(qm)
    assert all(v == "Dense" for p, v in kinds.items() if p.startswith("layers.1."))
    assert qm.layers[0].mlp.down_proj.group_size == 64
    assert qm.layers[0].mlp.up_proj.group_size == 32
    assert qm.layers[0].self_attn.q_proj.format == "int3"


def test_group_size_errors_list_every_offending_layer_before_any_work():
    m = tiny_model()
    with pytest.raises(ValueError) as e:
        quantize_model(m, QuantConfig(format="int4", group_size=32),
                       overrides={"down_proj": {"group_size": 96}}, progress=False)
    msg = str(e.value)
    assert "layers.0.mlp.down_proj (K=128)" in msg and "layers.1.mlp.down_proj (K=128)" in msg
    assert "q_proj" not in msg


def test_any4_needs_calibration_or_says_so():
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(tiny_model(), ANY4, progress=False)
    qm, rep = quantize_model(tiny_model(), ANY4.replace(sample_weighting="none"),
                             progress=False)
    assert rep.mode == "none" and rep.layers[0].kmeans_iters_mean is not None


def test_sequential_offline_and_stats_modes(tokens):
    m = tiny_model()
    seq, r1 = quantize_model(m, ANY4, tokens=tokens, progress=False)
    off, r2 = quantize_model(m, ANY4, tokens=tokens,
                             calibration=CalibrationConfig(mode="offline"), progress=False)
    assert (r1.mode, r2.mode) == ("sequential", "offline")
    sums, count = collect_offline(m, tokens, select_layers(m))
    via_stats, r3 = quantize_model(m, ANY4, stats=finalize(sums, count, "abs_of_mean"),
                                   progress=False)
    assert r3.mode == "stats"

    def arrays(model, path):
        q = model
        for p in path.split("."):
            q = q[int(p)] if p.isdigit() else getattr(q, p)
        return [np.asarray(a) for a in (q.codes[...], q.lut[...], q.scales[...], q.zeros[...])]

    for path in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        for a, b in zip(arrays(off, path), arrays(via_stats, path), strict=True):
            np.testing.assert_array_equal(a, b)
    # The first group of the first block sees the same input in both modes; later layers
    # are calibrated on the partly quantized model in sequential mode.
    for a, b in zip(arrays(seq, "layers.0.self_attn.q_proj"),
                    arrays(off, "layers.0.self_attn.q_proj"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(
        arrays(seq, "layers.1.mlp.down_proj"), arrays(off, "layers.1.mlp.down_proj"),
        strict=True))


def test_stats_for_another_model_are_refused(tokens):
    with pytest.raises(ValueError, match="lack"):
        quantize_model(tiny_model(), ANY4, stats={"layers.0.self_attn.q_proj": np.ones(64)},
                       progress=False)


def test_bf16_model_end_to_end(tokens):
    from any4_jax.models.llama.config import TINY
    from any4_jax.models.llama.params import random_model

    m = random_model(TINY, seed=0, param_dtype=jnp.bfloat16)
    qm, _ = quantize_model(m, ANY4, tokens=tokens, progress=False)
    q = qm.layers[0].self_attn.q_proj
    assert q.lut.get_value().dtype == jnp.bfloat16
    logits, _ = qm(jnp.asarray(tokens[:, :40]))
    ref, _ = m(jnp.asarray(tokens[:, :40]))
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert rel < 0.2


def test_jit_and_dense_class_unchanged():
    """The quantized model runs under jit; the model code only ever saw `Dense`."""
    from flax import nnx

    qm, _ = quantize_model(tiny_model(), QuantConfig(format="fp4", group_size=32),
                           progress=False)
    graphdef, state = nnx.split(qm)
    f = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
    out = f(state, jnp.ones((1, 8), jnp.int32))
    assert out.shape == (1, 8, 256)
    assert isinstance(qm.lm_head, Dense)
