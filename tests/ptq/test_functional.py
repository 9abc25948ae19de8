"""The functional API on Linen-layout params: `quantize_params` returns a new tree and
mutates nothing; statistics, or a Calibration that runs the model."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import QuantConfig, QuantizedWeight
from any4_jax.models.llama.convert_flax import (
    load_flax_model,
    load_flax_params,
)
from any4_jax.ptq.functional import Calibration, model_from_params, quantize_params
from tests.models.hf_tiny import ids, tiny_hf_model, write_flax_checkpoint

pytest.importorskip("torch")

ATOL = 2e-5


def test_quantize_params_is_functional(tmp_path):
    hf = tiny_hf_model("llama")
    params = load_flax_params(write_flax_checkpoint(hf, tmp_path / "ck"))
    before = jax.tree.map(lambda a: a.copy(), params)
    q = quantize_params(params, QuantConfig(format="int4", group_size=32))
    # nothing mutated
    jax.tree.map(np.testing.assert_array_equal, params, before)
    qp = q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(qp, QuantizedWeight) and qp.shape == (64, 64)
    assert isinstance(q["lm_head"]["kernel"], np.ndarray)
    assert q["model"]["embed_tokens"]["embedding"] is params["model"]["embed_tokens"][
        "embedding"]
    # run it through our model: every decoder kernel is a QuantDense
    from any4_jax.models.llama.config import LlamaConfig

    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    model = model_from_params(q, cfg)
    ref_model = model_from_params(params, cfg)
    logits, _ = model(ids())
    ref, _ = ref_model(ids())
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.3


def test_quantize_params_any4_with_statistics_and_by_running_the_model(tmp_path):
    from any4_jax.models.llama.config import LlamaConfig
    from any4_jax.ptq.calibrate import collect_offline, finalize
    from any4_jax.ptq.quantize_model import quantize_model, select_layers

    hf = tiny_hf_model("llama")
    path = write_flax_checkpoint(hf, tmp_path / "ck")
    params = load_flax_params(path)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    tokens = ids(40)
    cq = QuantConfig(format="any4", group_size=32)
    with pytest.raises(ValueError, match="needs an activation statistic"):
        quantize_params(params, cq)
    model, _ = load_flax_model(path)
    sums, count = collect_offline(model, tokens, select_layers(model))
    stats = finalize(sums, count, "abs_of_mean")
    via_stats = quantize_params(params, cq, calibration=stats)
    seq = quantize_params(params, cq, calibration=Calibration(tokens, cfg))
    ref, _ = quantize_model(model, cq, tokens=tokens, progress=False)
    got = seq["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    want = ref.layers[1].mlp.down_proj.qweight
    for f in ("codes", "lut", "scales", "zeros"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    # the first layer group sees the unquantized input in both modes
    a = via_stats["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    b = seq["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(a.lut, b.lut)


def test_quantize_params_with_bcq_gives_bcq_weights_and_layers(tmp_path):
    from any4_jax.models.llama.config import LlamaConfig
    from any4_jax.nn import BCQDense
    from any4_jax.quant import BCQFitConfig, BCQWeight

    hf = tiny_hf_model("llama")
    params = load_flax_params(write_flax_checkpoint(hf, tmp_path / "ck"))
    cfg = QuantConfig(format="bcq", sample_weighting="none", array_len=32,
                      bcq_fit=BCQFitConfig(max_iter=5))
    q = quantize_params(params, cfg)
    qp = q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(qp, BCQWeight) and qp.shape == (64, 64)
    model = model_from_params(q, LlamaConfig.from_hf(hf.config.to_dict()))
    assert isinstance(model.layers[0].self_attn.q_proj, BCQDense)
    logits, _ = model(ids())
    ref, _ = model_from_params(params, LlamaConfig.from_hf(hf.config.to_dict()))(ids())
    assert 0 < float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)) < 0.3
