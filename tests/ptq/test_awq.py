"""AWQ: the folding leaves the float model unchanged, the search never does worse than round to
nearest on its activations (and does better on a real layer group), and it composes with
checkpoints and the functional API."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from any4_jax import checkpoint as ck
from any4_jax.eval.perplexity import perplexity
from any4_jax.loading import load_model
from any4_jax.ptq.awq import AWQConfig, apply_awq, search_scales
from any4_jax.ptq.calibrate import embed_batches
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.quant import QuantConfig
from tests.tiny_lm import byte_tokenizer, tiny_model

PATHS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _fold(model, tokens, fmt="int4", mha=False):
    batches = embed_batches(model, np.asarray(tokens), 16)
    cfgs = dict.fromkeys(PATHS, QuantConfig(format=fmt, group_size=32))
    return apply_awq(model.layers[0], batches, PATHS, cfgs, AWQConfig(grid=10), mha=mha)


@pytest.mark.parametrize("mha", [False, True])
def test_folding_leaves_the_float_model_unchanged(tokens, mha):
    m = tiny_model(num_kv_heads=4) if mha else tiny_model()
    ref, _ = m(jnp.asarray(tokens))
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m))}
    found = _fold(m, tokens, mha=mha)
    assert [g.layers[0] for g in found] == (
        ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"] if mha
        else ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"])  # GQA: no v -> o
    after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m))}
    changed = {".".join(map(str, p)) for p in before if not np.array_equal(before[p], after[p])}
    assert any(c.startswith("layers.0.") for c in changed) or all(g.alpha == 0 for g in found)
    assert not any(c.startswith("layers.1.") for c in changed)
    got, _ = m(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                               atol=2e-5 * float(jnp.abs(ref).max()))
    for g in found:  # alpha = 0 is in the grid: never worse than round to nearest
        assert g.error <= g.rtn_error * (1 + 1e-6)


def test_search_finds_scales_that_protect_salient_channels(rng):
    """A few input channels with large activations: AWQ scales them up and lowers the output
    error, well below round to nearest for int4; for any4, whose k-means already weighs the
    salient channels (activation sample weights), by less."""
    k = 128
    x = rng.standard_normal((512, k)).astype(np.float32)
    x[:, :4] *= 30.0
    w = (rng.standard_normal((64, k)) * 0.02).astype(np.float32)
    for fmt, gain in (("int4", 0.9), ("any4", 0.99)):
        s, alpha, err, rtn = search_scales(x, [w], [QuantConfig(format=fmt, group_size=64)],
                                           AWQConfig())
        assert alpha > 0 and err < gain * rtn, (fmt, alpha, err, rtn)
        assert s[:4].min() > np.median(s)


def test_awq_quantize_save_load_and_functional(tokens, tmp_path):
    m = tiny_model()
    cfg = QuantConfig(format="any4", group_size=32)
    q, rep = quantize_model(m, cfg, tokens=tokens, method="awq", progress=False)
    assert rep.method == "awq" and {g["block"] for g in rep.awq} == {0, 1}
    ref, _ = m(jnp.asarray(tokens))  # the input model is left as it was
    fresh, _ = tiny_model()(jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(fresh))
    tok = byte_tokenizer()
    path = ck.save_quantized(tmp_path / "a", q, tokenizer=tok, metadata={"method": "awq"})
    ids = np.asarray(tok.encode("It is a truth universally acknowledged. " * 12), np.int32)
    r1 = perplexity(q, ids, seq_len=64, progress=False)
    r2 = perplexity(load_model(path).model, ids, seq_len=64, progress=False)
    assert r1.window_nll == r2.window_nll


def test_quantize_params_awq_carries_the_folded_norms(tmp_path):
    pytest.importorskip("torch")
    from any4_jax.models.llama.config import LlamaConfig
    from any4_jax.models.llama.convert_flax import load_flax_model, load_flax_params
    from any4_jax.ptq.functional import Calibration, model_from_params, quantize_params
    from tests.models.hf_tiny import ids, tiny_hf_model, write_flax_checkpoint

    hf = tiny_hf_model("llama")
    path = write_flax_checkpoint(hf, tmp_path / "ck")
    params = load_flax_params(path)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    q = QuantConfig(format="int4", group_size=32)
    toks = ids(40)
    out = quantize_params(params, q, calibration=Calibration(toks, cfg), method="awq")
    model, _ = load_flax_model(path)
    ref, _ = quantize_model(model, q, tokens=toks, method="awq", progress=False)
    a, _ = model_from_params(out, cfg)(jnp.asarray(toks))
    b, _ = ref(jnp.asarray(toks))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
