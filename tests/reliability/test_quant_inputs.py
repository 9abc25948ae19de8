"""`quantize_weight` on extreme and bad inputs (issue 17): results independent of the weights'
absolute scale, degenerate groups exact, overflow and argument errors raised before any work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from any4_jax import KMeansConfig, QuantConfig, quantize_weight
from any4_jax.quant import quantize as quantize_module
from any4_jax.quant.quantize import max_abs_limit
from any4_jax.quant.qweight import unpack_codes

# (format, symmetric): every scaling rule and both code families
FORMATS = [("int4", False), ("int4", True), ("int3", False), ("any4", False), ("any4", True),
           ("nf4", False), ("fp4", False)]


def _codes(qw):
    return np.asarray(unpack_codes(qw.codes))


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rel_err(qw, w):
    """||dequant - w|| / ||w|| in float64 (float32 norms of 1e20-sized values overflow)."""
    w = _f64(w)
    return np.linalg.norm(_f64(qw.dequantize(jnp.float32)) - w) / np.linalg.norm(w)


def _config(fmt, symmetric, group_size=64):
    return QuantConfig(format=fmt, group_size=group_size, symmetric=symmetric,
                       kmeans=KMeansConfig(seed=3))


@pytest.fixture
def weight(rng):
    return (rng.standard_normal((32, 256)) * 0.02).astype(np.float32)


@pytest.fixture
def xbar(rng):
    return np.abs(rng.standard_normal(256)).astype(np.float32) + 0.1


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if quantization starts: a bad input must be rejected before any work."""
    def fail(*args, **kwargs):
        raise AssertionError("quantization started before the bad input was rejected")

    monkeypatch.setattr(quantize_module, "_quantize_chunk", fail)


# --- numerics independent of the weights' absolute scale -----------------------------------

@pytest.mark.parametrize("scale", [1e-7, 1e-15, 1e20])
@pytest.mark.parametrize(("fmt", "symmetric"), FORMATS)
def test_same_codes_and_error_at_any_magnitude(weight, xbar, fmt, symmetric, scale):
    cfg = _config(fmt, symmetric)
    q0 = quantize_weight(weight, cfg, sample_weight=xbar)
    ws = (weight.astype(np.float64) * scale).astype(np.float32)
    q = quantize_weight(ws, cfg, sample_weight=xbar)
    np.testing.assert_array_equal(_codes(q), _codes(q0))
    # the table lives in the scaled domain: it does not move with the weights
    np.testing.assert_allclose(_f64(q.lut), _f64(q0.lut), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_f64(q.scales) / scale, _f64(q0.scales), rtol=1e-6)
    e0, e = _rel_err(q0, weight), _rel_err(q, ws)
    assert e0 < 0.25
    assert e == pytest.approx(e0, rel=1e-4)


@pytest.mark.parametrize(
    ("fmt", "symmetric", "kmeans_path"),
    [("int4", False, "default"), ("nf4", False, "default"), ("any4", False, "default"),
     ("any4", True, "default"), ("any4", False, "xla"), ("any4", True, "xla")])
def test_power_of_two_scaling_is_bit_exact(monkeypatch, weight, xbar, fmt, symmetric,
                                           kmeans_path):
    """Scaling w by 2^p scales the scales and zeros by exactly 2^p and changes nothing else,
    with the compiled CPU k-means and the XLA one (the GPU's) alike."""
    if kmeans_path == "xla":
        monkeypatch.setattr(quantize_module, "_use_cpu_kmeans", lambda kmeans: False)
    cfg = _config(fmt, symmetric)
    w, x = weight[:16], xbar
    q0 = quantize_weight(w, cfg, sample_weight=x)
    for p in (-23, -50, 66, 120):
        s = np.float32(2.0**p)
        q = quantize_weight(w * s, cfg, sample_weight=x)
        np.testing.assert_array_equal(_codes(q), _codes(q0), err_msg=f"2^{p}")
        np.testing.assert_array_equal(np.asarray(q.lut), np.asarray(q0.lut), err_msg=f"2^{p}")
        np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(q0.scales) * s)
        np.testing.assert_array_equal(np.asarray(q.zeros), np.asarray(q0.zeros) * s)


@pytest.mark.parametrize("scale", [1.0, 1e-15, 1e20])
@pytest.mark.parametrize("fmt", ["int4", "int2", "any4", "any2", "nf4", "fp4"])
def test_constant_and_zero_groups_dequantize_exactly(weight, xbar, fmt, scale):
    w = (weight.astype(np.float64) * scale).astype(np.float32)
    w[0, :64] = 0.0
    w[1, 64:128] = np.float32(0.0123 * scale)
    w[2, 128:192] = np.float32(-1.0 * scale)
    w[3, 192:] = np.float32(2.0**-20 * scale)
    w[4] = 0.0  # a whole row of zeros
    w[5] = np.float32(-0.7 * scale)  # a whole constant row
    qw = quantize_weight(w, _config(fmt, False), sample_weight=xbar)
    d = np.asarray(qw.dequantize())
    assert np.isfinite(d).all()
    for rows, cols in [(0, slice(0, 64)), (1, slice(64, 128)), (2, slice(128, 192)),
                       (3, slice(192, None)), (4, slice(None)), (5, slice(None))]:
        np.testing.assert_array_equal(d[rows, cols], w[rows, cols], err_msg=f"row {rows}")
    assert _rel_err(qw, w) < 0.25  # and the ordinary rows still quantize well


@pytest.mark.parametrize("fmt", ["int4", "any4"])
def test_symmetric_zero_groups_exact_and_constant_groups_close(weight, xbar, fmt):
    """Symmetric scaling maps a constant group onto +-(2^(n-1) - 1): exact up to the table
    (an ulp for int-n); an all-zero group dequantizes to 0 exactly."""
    w = weight.copy()
    w[0, :64] = 0.0
    w[1, 64:128] = np.float32(0.0123)
    w[4] = 0.0
    qw = quantize_weight(w, _config(fmt, True), sample_weight=xbar)
    d = np.asarray(qw.dequantize())
    np.testing.assert_array_equal(d[0, :64], 0.0)
    np.testing.assert_array_equal(d[4], 0.0)
    np.testing.assert_allclose(d[1, 64:128], w[1, 64:128], rtol=1e-6 if fmt == "int4" else 0.05)
    assert np.asarray(qw.scales)[0, 0] == 0 and np.asarray(qw.scales)[4].max() == 0


@pytest.mark.parametrize(("fmt", "symmetric"), [("int4", False), ("any4", False),
                                                ("any4", True), ("nf4", False)])
def test_all_zero_weight(fmt, symmetric):
    w = np.zeros((16, 128), np.float32)
    qw = quantize_weight(w, _config(fmt, symmetric))
    for a in (qw.lut, qw.scales, qw.zeros):
        assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), w)


# --- magnitudes that would overflow ---------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "wdtype", "storage", "phrase"),
    [
        (3e38, jnp.float32, None, "float32"),  # finite, but mx - mn overflows
        (2e38, jnp.float32, None, "float32"),
        (3e38, jnp.bfloat16, None, "bfloat16"),
        (1.699e38, jnp.float32, "bfloat16", "bfloat16"),
        (40000.0, jnp.float32, "float16", "float16"),
        (40000.0, jnp.float16, None, "float16"),
    ],
    ids=["f32-3e38", "f32-2e38", "bf16-3e38", "f32-as-bf16", "f32-as-f16", "f16-40000"])
def test_rejects_weights_whose_quantization_would_overflow(no_work, weight, value, wdtype,
                                                            storage, phrase):
    w = weight.copy()
    w[3, 5] = value
    w = jnp.asarray(w).astype(wdtype)
    with pytest.raises(ValueError, match=r"largest \|w\| is") as exc:
        quantize_weight(w, QuantConfig(format="int4", group_size=64, dtype=storage),
                        name="layers.0.mlp.up_proj")
    msg = str(exc.value)
    assert "layers.0.mlp.up_proj" in msg and phrase in msg and "rescale" in msg
    if phrase == "float16":
        assert "dtype='float32'" in msg  # the wider dtype is a fix only for float16


def test_rejects_float64_beyond_float32_range_by_size_not_as_inf(no_work, weight):
    w = weight.astype(np.float64)
    w[0, 0] = 1e39  # finite in float64; would become inf in float32
    with pytest.raises(ValueError, match=r"largest \|w\| is 1e\+39") as exc:
        quantize_weight(w, QuantConfig(format="nf4", group_size=64))
    assert "non-finite" not in str(exc.value)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("fmt", "symmetric"), [("int4", False), ("int4", True),
                                                ("any4", False), ("any4", True), ("nf4", False)])
def test_weights_just_below_the_limit_stay_finite(rng, storage, fmt, symmetric):
    limit = max_abs_limit(storage)
    w = rng.standard_normal((16, 128))
    w = w / np.abs(w).max() * limit * 0.999
    w[0, :64] = limit * 0.999  # a constant group at the limit
    w[1, :64] = -limit * 0.999
    w[1, 0] = limit * 0.999  # the widest possible range, 2 * limit
    w = w.astype(np.float32)
    qw = quantize_weight(w, _config(fmt, symmetric, group_size=64), sample_weight=None)
    qw_st = quantize_weight(w, QuantConfig(format=fmt, group_size=64, symmetric=symmetric,
                                           dtype=storage))
    for q in (qw, qw_st):
        for a in (q.lut, q.scales, q.zeros, q.dequantize(), q.dequantize(storage)):
            assert np.isfinite(np.asarray(a, np.float32)).all()
    assert _rel_err(qw_st, w) < 0.2


# --- argument types ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("config", "phrase"),
    [({"format": "int4", "group_size": 64}, r"QuantConfig\(\*\*config\)"),
     ({}, r"QuantConfig\(\*\*config\)"),  # an empty dict used to mean the default silently
     ("any4", "must be a QuantConfig"),
     (KMeansConfig(), r"QuantConfig\(kmeans=")],
    ids=["dict", "empty-dict", "str", "kmeans-config"])
def test_config_of_the_wrong_type(no_work, weight, config, phrase):
    with pytest.raises(TypeError, match=phrase):
        quantize_weight(weight, config)


def test_mesh_of_the_wrong_type(no_work, weight):
    with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh.*got str 'rows'"):
        quantize_weight(weight, QuantConfig(group_size=64), mesh="rows")


def test_mesh_with_two_axes(no_work, weight):
    devs = jax.devices()
    if len(devs) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 8 CPU devices)")
    mesh = Mesh(np.array(devs[:4]).reshape(2, 2), ("a", "b"))
    with pytest.raises(ValueError, match=r"mesh must be 1-D.*row_mesh"):
        quantize_weight(weight, QuantConfig(group_size=64), mesh=mesh)


@pytest.mark.parametrize("shape", [(0, 64), (8, 0)])
def test_empty_weight(no_work, shape):
    with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\), which is empty"):
        quantize_weight(np.zeros(shape, np.float32), QuantConfig(format="int4"))


@pytest.mark.parametrize(
    ("sample_weight", "error", "phrase"),
    [("abc", TypeError, "sample_weight must be an array of 256"),
     ({"x": 1.0}, TypeError, "sample_weight must be an array of 256"),
     (np.ones(255), ValueError, r"expected \(256,\)"),
     (-np.ones(256), ValueError, ">= 0"),
     (np.full(256, np.nan), ValueError, "finite")],
    ids=["str", "dict", "shape", "negative", "nan"])
def test_bad_sample_weight(no_work, weight, sample_weight, error, phrase):
    with pytest.raises(error, match=phrase):
        quantize_weight(weight, QuantConfig(format="any4", group_size=64),
                        sample_weight=sample_weight)


@pytest.mark.parametrize("chunk_elements", [0, -4096, True, 2.5, "big"])
def test_bad_chunk_elements(no_work, weight, chunk_elements):
    with pytest.raises(ValueError, match=r"chunk_elements=.* must be a positive integer"):
        quantize_weight(weight, QuantConfig(format="int4", group_size=64),
                        chunk_elements=chunk_elements)


@pytest.mark.parametrize("name", [3, None, b"q_proj"])
def test_name_not_a_string(no_work, weight, name):
    with pytest.raises(TypeError, match="name must be a string"):
        quantize_weight(weight, QuantConfig(format="int4", group_size=64), name=name)


def test_non_finite_weight_is_named(no_work, weight):
    w = weight.copy()
    w[2, 7] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite value.*index \(2, 7\)"):
        quantize_weight(w, QuantConfig(format="int4", group_size=64))
