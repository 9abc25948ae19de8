"""Kernel layouts prepared once: `prepare`, `QuantDense.prepare`, `prepare_model`, and that a
prepared model still runs everywhere, converts back bit-exactly and saves canonical checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from any4_jax import checkpoint as ck
from any4_jax.kernels import CudaWeight, lut_matmul, pick, prepare
from any4_jax.loading import load_model
from any4_jax.nn import QuantDense, dense_layers, prepare_model
from tests.kernels.base import make_qweight
from tests.tiny_lm import quantized_tiny

FIELDS = ("codes", "lut", "scales", "zeros")


def _same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.fixture(scope="module")
def quantized():
    return quantized_tiny("int4")


@pytest.mark.parametrize("fmt", ["any4", "int4"])
def test_prepare_and_lut_matmul_on_a_prepared_weight(rng, fmt):
    qw = make_qweight(rng, 32, 128, fmt=fmt, g=32, dtype=jnp.bfloat16)
    cw = prepare(qw, "cuda")
    assert isinstance(cw, CudaWeight) and prepare(cw, "cuda") is cw
    _same(prepare(cw, "xla"), qw)
    assert prepare(qw, "pallas") is qw
    with pytest.raises(ValueError, match="unknown implementation 'tpu'"):
        prepare(qw, "tpu")
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    want = np.asarray(lut_matmul(x, qw, implementation="xla"), np.float32)
    if jax.default_backend() != "gpu":
        assert pick(x, cw) in ("cpu", "xla")  # no GPU: the canonical form runs on the CPU
    got = jax.jit(lambda x, w: lut_matmul(x, w, implementation="xla"))(x, cw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_prepared_model_runs_converts_back_and_saves_canonical(quantized, tmp_path):
    qm, tok = quantized
    model = nnx.clone(qm)
    ids = jnp.asarray([tok.encode("It is a truth universally acknowledged")], jnp.int32)
    want = np.asarray(model(ids)[0])
    quant = lambda m: [(p, x) for p, x in dense_layers(m) if isinstance(x, QuantDense)]
    before = {p: m.qweight for p, m in quant(model)}
    assert len(before) == 14
    for _, layer in quant(model):
        layer.prepare("cuda")  # the layout only; runs on CPU through the reference
    layers = [m for _, m in quant(model)]
    assert all(m.layout == "cuda" for m in layers)
    assert layers[0].codes[...].dtype == jnp.uint32 and layers[0].lut[...].dtype == jnp.float32
    for p, m in quant(model):
        _same(m.qweight, before[p])
    np.testing.assert_array_equal(np.asarray(model(ids)[0]), want)
    assert ck.quantized_layer_meta(model) == ck.quantized_layer_meta(qm)
    path = ck.save_quantized(tmp_path / "ck", model, tokenizer=tok, metadata={})
    lm = load_model(path)
    for p, m in quant(lm.model):
        assert m.layout == "canonical"
        _same(m.qweight, before[p])
    for _, layer in quant(model):
        layer.prepare("xla")
    assert all(m.layout == "canonical" for _, m in quant(model))


def test_prepare_model_choices(quantized):
    qm, _ = quantized
    model = nnx.clone(qm)
    n = sum(isinstance(m, QuantDense) for _, m in dense_layers(model))
    if jax.default_backend() != "gpu":
        assert set(prepare_model(model).values()) == {"canonical"}
        with pytest.raises(ValueError, match="takes none of the layers: .*needs a CUDA GPU"):
            prepare_model(model, "cuda", dtype=jnp.bfloat16)
        with pytest.raises(ValueError, match="takes none of the layers: .*needs a CUDA GPU"):
            prepare_model(model, "pallas", dtype=jnp.bfloat16)
    layouts = prepare_model(model, "xla")
    assert len(layouts) == n and set(layouts.values()) == {"canonical"}
    assert {m.implementation for _, m in dense_layers(model) if isinstance(m, QuantDense)} \
        == {"xla"}


def test_projections_of_one_input_share_one_cpu_kernel_call(quantized):
    """A model prepared for the CPU kernel computes q/k/v and gate/up in one call each
    (`QuantDense.apply_shared` through the model's `project`): 4 kernel calls per layer at
    decode instead of 7, the same logits bit for bit as one call per layer."""
    from any4_jax.kernels import cpu as cpu_kernel
    from any4_jax.models.llama import modules

    if jax.default_backend() != "cpu" or cpu_kernel._register():
        pytest.skip("the CPU kernel does not run here (not the CPU backend, or turned off)")

    qm, tok = quantized
    model = nnx.clone(qm)
    prepare_model(model, "cpu")
    ids = jnp.asarray([tok.encode("It is")[:1]], jnp.int32)  # one token: M = 1
    hlo = jax.jit(lambda m, t: m(t)).lower(model, ids).as_text()
    n_layers = len(model.layers)
    assert hlo.count(cpu_kernel.TARGET) == 4 * n_layers, hlo.count(cpu_kernel.TARGET)
    got = np.asarray(model(ids)[0])
    one_each = lambda layers, x: [layer(x) for layer in layers]
    real = modules.project
    modules.project = one_each
    try:
        hlo = jax.jit(lambda m, t: m(t)).lower(model, ids).as_text()
        assert hlo.count(cpu_kernel.TARGET) == 7 * n_layers
        want = np.asarray(model(ids)[0])
    finally:
        modules.project = real
    np.testing.assert_array_equal(got, want)
    # unprepared (no preference): the automatic choice is the CPU kernel, shared the same way
    plain = nnx.clone(qm)
    hlo = jax.jit(lambda m, t: m(t)).lower(plain, ids).as_text()
    assert hlo.count(cpu_kernel.TARGET) == 4 * n_layers
