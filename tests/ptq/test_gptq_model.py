"""GPTQ through the whole-model path: Hessians per block, the error on a real layer, the CLI,
checkpoints and the functional API."""

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import checkpoint as ck
from any4_jax.eval.perplexity import perplexity
from any4_jax.loading import load_model
from any4_jax.nn.layers import get_layer
from any4_jax.ptq.calibrate import collect_inputs, run_block
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.quant import QuantConfig, quantize_weight
from any4_jax.quant.gptq import GPTQConfig, gptq_quantize
from tests.tiny_lm import byte_tokenizer, tiny_model


def test_block_hessians_are_shared_by_layers_that_share_an_input(tokens):
    m = tiny_model()
    x, extras = m.embed_inputs(np.asarray(tokens))
    _, sums, xtx = run_block(m.layers[0], x, extras,
                             ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"),
                             hessian=True)
    xin = np.asarray(m.layers[0].input_layernorm(x)).reshape(-1, 64)
    np.testing.assert_allclose(np.asarray(xtx["self_attn.q_proj"]), xin.T @ xin, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(xtx["self_attn.q_proj"]),
                                  np.asarray(xtx["self_attn.k_proj"]))  # one input, one H
    assert xtx["mlp.down_proj"].shape == (128, 128)


def test_gptq_lowers_a_real_layers_output_error(smollm2):
    lm = smollm2
    toks = np.asarray([lm.tokenizer.encode(
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. " * 6)], np.int32)
    path = "layers.3.mlp.down_proj"
    x = collect_inputs(lm.model, toks, [path])[path]  # [tokens, 1536]
    w = np.asarray(get_layer(lm.model, path).kernel[...]).T
    h = 2 * x.T @ x / len(x)
    out = lambda q: x @ np.asarray(q.dequantize(jnp.float32)).T
    for fmt in ("int4", "any4"):
        rtn = quantize_weight(jnp.asarray(w), QuantConfig(format=fmt, group_size=64),
                              sample_weight=np.abs(x.mean(0)))
        g = gptq_quantize(w, h, rtn)
        e_rtn = np.linalg.norm(x @ w.T - out(rtn))
        e_gptq = np.linalg.norm(x @ w.T - out(g))
        assert e_gptq < 0.9 * e_rtn, (fmt, e_gptq, e_rtn)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(smollm2_path)


def test_quantize_model_gptq_saves_and_reloads_bit_for_bit(tokens, tmp_path):
    m = tiny_model()
    cfg = QuantConfig(format="any4", group_size=32)
    rtn, _ = quantize_model(m, cfg, tokens=tokens, progress=False)
    q, rep = quantize_model(m, cfg, tokens=tokens, method="gptq",
                            gptq=GPTQConfig(act_order=True), progress=False)
    assert rep.method == "gptq" and rep.mode == "sequential"
    a, b = rtn.layers[1].mlp.up_proj.qweight, q.layers[1].mlp.up_proj.qweight
    assert not np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
    tok = byte_tokenizer()
    path = ck.save_quantized(tmp_path / "g", q, tokenizer=tok, metadata={"method": "gptq"})
    ids = np.asarray(tok.encode("It is a truth universally acknowledged. " * 12), np.int32)
    r1 = perplexity(q, ids, seq_len=64, progress=False)
    r2 = perplexity(load_model(path).model, ids, seq_len=64, progress=False)
    assert r1.window_nll == r2.window_nll
    with pytest.raises(ValueError, match="needs calibration tokens"):
        quantize_model(m, cfg, method="gptq", stats={}, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        quantize_model(m, cfg, tokens=tokens, method="awq-ish", progress=False)


def test_quantize_params_gptq(tmp_path):
    pytest.importorskip("torch")
    from any4_jax.models.llama.config import LlamaConfig
    from any4_jax.models.llama.convert_flax import load_flax_model, load_flax_params
    from any4_jax.ptq.functional import Calibration, quantize_params
    from tests.models.hf_tiny import ids, tiny_hf_model, write_flax_checkpoint

    hf = tiny_hf_model("llama")
    path = write_flax_checkpoint(hf, tmp_path / "ck")
    params = load_flax_params(path)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    q = QuantConfig(format="int4", group_size=32)
    with pytest.raises(ValueError, match="needs calibration=Calibration"):
        quantize_params(params, q, method="gptq")
    tokens = ids(40)
    out = quantize_params(params, q, calibration=Calibration(tokens, cfg), method="gptq")
    model, _ = load_flax_model(path)
    ref, _ = quantize_model(model, q, tokens=tokens, method="gptq", progress=False)
    got = out["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got.codes),
                                  np.asarray(ref.layers[1].mlp.down_proj.qweight.codes))


def test_cli_method_gptq(capsys):
    from any4_jax.cli import main

    assert main(["quantize", "--method", "gptq", "--calibration", "none"]) == 2
    assert "--method gptq needs calibration" in capsys.readouterr().err
    assert main(["quantize", "--method", "awq", "--calib-mode", "offline"]) == 2
    assert "--method awq needs calibration" in capsys.readouterr().err
