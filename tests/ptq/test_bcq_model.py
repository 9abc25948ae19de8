"""LO-BCQ on a whole model: local and universal codebooks, W4A4, checkpoints, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import checkpoint as ck
from any4_jax.eval.perplexity import perplexity
from any4_jax.loading import load_model
from any4_jax.nn import BCQDense, QuantDense, dense_layers, prepare_model
from any4_jax.ptq.bcq import learn_codebooks
from any4_jax.ptq.quantize_model import quantize_model, select_layers
from any4_jax.quant import ActQuantConfig, BCQCodebooks, BCQFitConfig, QuantConfig
from any4_jax.quant.act_quant import fake_quantize
from tests.tiny_lm import byte_tokenizer, tiny_model

BCQ = QuantConfig(format="bcq", bcq_fit=BCQFitConfig(max_iter=10))
TEXT = "It is a truth universally acknowledged, that a single man in possession. " * 8


@pytest.fixture(scope="module")
def books(tokens):
    m = tiny_model()
    return learn_codebooks(m, BCQ, select_layers(m), tokens=tokens, activations=True,
                           progress=False)


def test_local_codebooks_quantize_every_layer_and_run(tokens):
    m = tiny_model()
    qm, rep = quantize_model(m, BCQ, tokens=tokens, progress=False)
    layers = {p: ly for p, ly in dense_layers(qm) if isinstance(ly, QuantDense)}
    assert len(layers) == 14 and all(isinstance(ly, BCQDense) for ly in layers.values())
    assert all(r.bcq["local"] and r.bcq["mse"] > 0 for r in rep.layers)
    # each layer's own codebooks
    cbs = [np.asarray(ly.weight.codebooks) for ly in layers.values()]
    assert not all(np.array_equal(cbs[0], c) for c in cbs[1:])
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 64))
    q = layers["layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(q(x), x @ q.weight.dequantize().T, rtol=1e-5, atol=1e-5)
    ids = np.asarray(byte_tokenizer().encode(TEXT), np.int32)
    dense = perplexity(m, ids, seq_len=64, progress=False).ppl
    assert abs(perplexity(qm, ids, seq_len=64, progress=False).ppl / dense - 1) < 0.05
    prepare_model(qm)  # a kernel preference leaves BCQ layers on the reference
    assert perplexity(qm, ids, seq_len=64, progress=False).ppl > 0


def test_universal_codebooks_are_shared_and_w4a4_applies_to_inputs(books, tokens):
    m = tiny_model()
    aq = ActQuantConfig(kind="bcq", codebooks=books.activations)
    qm, rep = quantize_model(m, BCQ, tokens=tokens, codebooks=books, act_quant=aq,
                             progress=False)
    layers = [ly for _, ly in dense_layers(qm) if isinstance(ly, BCQDense)]
    for ly in layers:
        assert np.array_equal(np.asarray(ly.weight.codebooks), books.weights)
        assert ly.act_quant == aq
    assert not any(r.bcq["local"] for r in rep.layers)
    ly = qm.layers[0].self_attn.q_proj
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 64))
    want = fake_quantize(x, aq) @ ly.weight.dequantize().T
    np.testing.assert_allclose(ly(x), want, rtol=1e-5, atol=1e-5)
    assert np.all(books.activations[:, 0] == -31) and np.all(books.activations[:, -1] == 31)
    assert books.info["activations"]["tokens"] == tokens.size


def test_int4_w4a4_baseline_and_checkpoint_round_trip(books, tokens, tmp_path):
    m = tiny_model()
    qm, _ = quantize_model(m, BCQ, tokens=tokens, codebooks=books,
                           act_quant=ActQuantConfig(kind="bcq", codebooks=books.activations),
                           overrides={"down_proj": {"format": "int4", "group_size": 32}},
                           progress=False)
    tok = byte_tokenizer()
    path = ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={})
    lm = load_model(path)
    ids = np.asarray(tok.encode(TEXT), np.int32)
    a = perplexity(qm, ids, seq_len=64, progress=False)
    b = perplexity(lm.model, ids, seq_len=64, progress=False)
    assert a.window_nll == b.window_nll  # bit for bit, activation quantizer included
    down = lm.model.layers[0].mlp.down_proj
    assert type(down) is QuantDense and down.format == "int4" and down.act_quant is not None
    assert type(lm.model.layers[0].mlp.up_proj) is BCQDense
    w4a4, _ = quantize_model(m, QuantConfig(format="int4", group_size=32),
                             act_quant=ActQuantConfig(kind="int4", group_size=32),
                             progress=False)
    w4, _ = quantize_model(m, QuantConfig(format="int4", group_size=32), progress=False)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 64))
    l4a4, l4 = w4a4.layers[0].self_attn.q_proj, w4.layers[0].self_attn.q_proj
    assert not np.allclose(l4a4(x), l4(x))
    np.testing.assert_allclose(l4a4(x), l4(fake_quantize(x, l4a4.act_quant)), rtol=1e-6)


def test_bad_combinations_are_named_before_any_work(books, tokens):
    m = tiny_model()
    with pytest.raises(ValueError, match="does not apply to format 'bcq'"):
        quantize_model(m, BCQ, tokens=tokens, method="gptq", progress=False)
    other = BCQCodebooks(weights=books.weights[:8], block_len=8, array_len=64, codebook_bits=6)
    with pytest.raises(ValueError, match="n_codebooks: codebooks 8, config 16"):
        quantize_model(m, BCQ, tokens=tokens, codebooks=other, progress=False)
    with pytest.raises(ValueError, match="not divisible by array_len=128"):
        quantize_model(m, BCQ.replace(array_len=128), tokens=tokens, progress=False)
    with pytest.raises(ValueError, match="not a multiple of the activation"):
        quantize_model(m, QuantConfig(format="int4", group_size=32), progress=False,
                       act_quant=ActQuantConfig(kind="int4", group_size=48))
    with pytest.raises(TypeError, match="codebooks must be a BCQCodebooks"):
        quantize_model(m, BCQ, tokens=tokens, codebooks=books.weights, progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(m, BCQ, progress=False)
    # without activation weighting no calibration is needed
    quantize_model(m, BCQ.replace(sample_weighting="none"), include=["layers.0.mlp.*"],
                   progress=False)


def test_dtype_of_the_model_is_kept(tokens):
    m = tiny_model()
    qm, _ = quantize_model(m, BCQ.replace(sample_weighting="none"), progress=False)
    ly = qm.layers[0].self_attn.q_proj
    x = jnp.ones((2, 64), jnp.bfloat16)
    assert ly(x).dtype == jnp.bfloat16 and ly.weight.dequantize().dtype == jnp.float32
