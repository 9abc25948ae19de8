"""quantize_weight: the int-n formulas, exact cases, dtypes, group sizes and error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import KMeansConfig, QuantConfig, quantize_weight
from any4_jax.quant.formats import FP4_E2M1_TABLE, parse_format
from any4_jax.quant.qweight import unpack_codes


def _codes(qw):
    return np.asarray(unpack_codes(qw.codes)).astype(int)


def int_reference(w, g, n_bit, symmetric):
    """docs/design.md s.4 written out in numpy, float32 throughout."""
    n, k = w.shape
    wg = w.astype(np.float32).reshape(n, k // g, g)
    if symmetric:
        alpha = np.maximum(np.abs(wg).max(-1), np.float32(2.0**-122)) / np.float32(
            2 ** (n_bit - 1) - 1)
        zero = np.zeros_like(alpha)
        q = np.clip(np.round(wg / alpha[..., None]), -(2 ** (n_bit - 1)), 2 ** (n_bit - 1) - 1)
        code = q + 2 ** (n_bit - 1)
    else:
        mn, mx = wg.min(-1), wg.max(-1)
        mag = np.maximum(np.abs(mn), np.abs(mx))
        floor = np.maximum(mag * np.float32(2.0**-27), np.float32(2.0**-122))
        alpha = np.maximum(mx - mn, floor) / np.float32(2**n_bit - 1)
        zero = mn + alpha * np.float32(2 ** (n_bit - 1))
        code = np.clip(np.round((wg - mn[..., None]) / alpha[..., None]), 0, 2**n_bit - 1)
    deq = (code - 2 ** (n_bit - 1)) * alpha[..., None] + zero[..., None]
    return code.reshape(n, k).astype(int), deq.reshape(n, k), alpha, zero


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n_bit", [4, 3, 2])
def test_int_matches_the_formulas(rng, n_bit, symmetric):
    w = rng.standard_normal((24, 256)).astype(np.float32)
    qw = quantize_weight(w, QuantConfig(format=f"int{n_bit}", group_size=64, symmetric=symmetric))
    code, deq, alpha, zero = int_reference(w, 64, n_bit, symmetric)
    np.testing.assert_array_equal(_codes(qw), code)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(qw.scales, alpha)
    else:  # GPU float32 division is not correctly rounded (within 2 ulp)
        np.testing.assert_allclose(qw.scales, alpha, rtol=2.5e-7)
    # zero = mn + alpha * 2^(n-1): XLA may fuse it into one FMA; alpha * 2^(n-1) is exact.
    np.testing.assert_allclose(qw.zeros, zero, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(qw.dequantize(), deq, rtol=1e-6, atol=1e-6)
    assert _codes(qw).max() < 2**n_bit


def test_int4_rounds_half_to_even():
    # mn = 0, mx = 15 -> alpha = 1 exactly, so the scaled values are the values themselves.
    row = np.array([0, 15, 2.5, 3.5, 4.5, 0.5, 1.5, 14.5], np.float32)
    qw = quantize_weight(row[None, :], QuantConfig(format="int4", group_size=8))
    np.testing.assert_array_equal(_codes(qw)[0], [0, 15, 2, 4, 4, 0, 2, 14])


@pytest.mark.parametrize("g", [32, 64, 128, 256, 1024, None])
def test_group_sizes(rng, g):
    w = rng.standard_normal((8, 2048)).astype(np.float32)
    qw = quantize_weight(w, QuantConfig(format="int4", group_size=g))
    assert qw.group_size == (g or 2048)
    assert qw.scales.shape == (8, 2048 // qw.group_size)
    code, deq, _, _ = int_reference(w, qw.group_size, 4, False)
    np.testing.assert_array_equal(_codes(qw), code)


def _sixteen_value_matrix(rng, values, n=6, groups=4):
    """Every group of 16 * 2 elements holds the same 16 values, shuffled, times a power of 2."""
    rows = []
    for _ in range(n):
        row = []
        for _ in range(groups):
            grp = np.concatenate([values, values]) * 2.0 ** rng.integers(-4, 3)
            row.append(rng.permutation(grp))
        rows.append(np.concatenate(row))
    return np.asarray(rows, np.float32)


def test_int4_round_trips_an_integer_grid_exactly(rng):
    w = _sixteen_value_matrix(rng, np.arange(16, dtype=np.float32) - 5)
    qw = quantize_weight(w, QuantConfig(format="int4", group_size=32))
    np.testing.assert_array_equal(qw.dequantize(), w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any4_round_trips_any_sixteen_values_exactly(rng, seed):
    # Arbitrary dyadic values spanning [0, 15]: alpha = 1, so every step is exact in float32.
    # k-means++ seeds every distinct value (a chosen value has zero distance, so it is never
    # drawn again) and Lloyd's then has nothing to move. (From a uniform grid init, Lloyd's may
    # legitimately stop in a local minimum that merges two values.)
    values = np.array([0, 0.25, 0.5, 1, 1.75, 3, 3.5, 4, 6.5, 7, 9, 10.25, 12, 13, 14.5, 15],
                      np.float32)
    w = _sixteen_value_matrix(rng, values)
    qw = quantize_weight(w, QuantConfig(format="any4", group_size=32, sample_weighting="none",
                                        kmeans=KMeansConfig(seed=seed)))
    np.testing.assert_array_equal(qw.dequantize(), w)


def test_any4_with_the_integer_table_equals_int4(rng):
    w = rng.standard_normal((32, 512)).astype(np.float32)
    int4 = quantize_weight(w, QuantConfig(format="int4", group_size=64))
    fixed = quantize_weight(w, QuantConfig(format="any4", group_size=64,
                                           kmeans=KMeansConfig(init="int", max_iter=0)))
    np.testing.assert_array_equal(fixed.lut, np.tile(np.arange(16) - 8, (32, 1)))
    np.testing.assert_array_equal(_codes(fixed), _codes(int4))
    np.testing.assert_array_equal(fixed.dequantize(), int4.dequantize())


@pytest.mark.parametrize("fmt", ["any3", "any2", "int3", "int2"])
def test_fewer_bits_use_fewer_codes(rng, fmt):
    w = rng.standard_normal((16, 256)).astype(np.float32)
    qw = quantize_weight(w, QuantConfig(format=fmt, group_size=64))
    n_bit = parse_format(fmt).n_bit
    assert _codes(qw).max() < 2**n_bit
    np.testing.assert_array_equal(np.asarray(qw.lut)[:, 2**n_bit:], 0)
    assert np.isfinite(np.asarray(qw.dequantize())).all()


def test_fp4_e2m1_uses_the_ocp_table(rng):
    w = rng.standard_normal((4, 64)).astype(np.float32)
    qw = quantize_weight(w, QuantConfig(format="fp4_e2m1", group_size=64))
    np.testing.assert_array_equal(qw.lut[0], FP4_E2M1_TABLE)
    absmax = np.abs(w).max(1)
    y = np.clip(w / absmax[:, None], -1, 1)
    nearest = np.abs(y[..., None] - FP4_E2M1_TABLE).min(-1)
    got = np.abs(y - FP4_E2M1_TABLE[_codes(qw)])
    np.testing.assert_allclose(got, nearest, atol=1e-7)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "any4"])
def test_bfloat16_weights_keep_their_dtype(rng, fmt):
    w = jnp.asarray(rng.standard_normal((16, 256)), jnp.bfloat16)
    qw = quantize_weight(w, QuantConfig(format=fmt, group_size=64))
    assert qw.lut.dtype == qw.scales.dtype == qw.zeros.dtype == jnp.bfloat16
    assert qw.dequantize().dtype == jnp.bfloat16
    err = jnp.linalg.norm(qw.dequantize(jnp.float32) - w.astype(jnp.float32))
    assert float(err / jnp.linalg.norm(w.astype(jnp.float32))) < 0.15
    # storage dtype can be overridden
    qw32 = quantize_weight(w, QuantConfig(format=fmt, group_size=64, dtype="float32"))
    assert qw32.scales.dtype == jnp.float32 and qw32.dequantize().dtype == jnp.bfloat16


# ---- errors that name the problem and the fix ---------------------------------------------

def test_error_group_size_does_not_divide_k():
    with pytest.raises(ValueError, match=r"k=576 is not divisible by group_size=128.*\[32, 64"):
        quantize_weight(np.ones((4, 576), np.float32), QuantConfig(group_size=128))


def test_error_not_2d():
    with pytest.raises(ValueError, match=r"expected a 2-D weight.*\(2, 3, 4\)"):
        quantize_weight(np.ones((2, 3, 4), np.float32), QuantConfig())


def test_error_non_finite_names_count_and_first_index():
    w = np.ones((4, 64), np.float32)
    w[1, 5] = np.nan
    w[2, 0] = np.inf
    w[3, 7] = -np.inf
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\).*first at index \(1, 5\)"):
        quantize_weight(w, QuantConfig(group_size=32))


def test_error_integer_weights():
    with pytest.raises(ValueError, match="floating-point"):
        quantize_weight(np.ones((4, 64), np.int32), QuantConfig(group_size=32))


def test_error_odd_k():
    with pytest.raises(ValueError, match="K=63 must be even"):
        quantize_weight(np.ones((4, 63), np.float32), QuantConfig(group_size=None))


@pytest.mark.parametrize("name,msg", [
    ("int5", r"n_bit=5 is out of range.*int2 to int4"),
    ("any1", r"n_bit=1 is out of range"),
    ("int8", r"out of range"),
    ("q4_k", r"unknown format 'q4_k'; choose one of int4"),
])
def test_error_format_names(name, msg):
    with pytest.raises(ValueError, match=msg):
        QuantConfig(format=name)


def test_error_config_values():
    with pytest.raises(ValueError, match="symmetric=True does not apply to 'nf4'"):
        QuantConfig(format="nf4", symmetric=True)
    with pytest.raises(ValueError, match="group_size=0"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="sample_weighting='squared'"):
        QuantConfig(sample_weighting="squared")
    with pytest.raises(ValueError, match="init='kmeans'"):
        KMeansConfig(init="kmeans")
    with pytest.raises(ValueError, match="max_iter=-1"):
        KMeansConfig(max_iter=-1)


def test_error_sample_weight_shape_and_sign():
    w = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match=r"sample_weight has shape \(32,\), expected \(64,\)"):
        quantize_weight(w, QuantConfig(group_size=32), sample_weight=np.ones(32))
    with pytest.raises(ValueError, match="finite and >= 0"):
        quantize_weight(w, QuantConfig(group_size=32), sample_weight=-np.ones(64))


def test_error_nf4_init_needs_sixteen_levels():
    with pytest.raises(ValueError, match="init='nf4'\\) needs 16 levels"):
        quantize_weight(np.ones((4, 64), np.float32),
                        QuantConfig(format="any3", group_size=32, kmeans=KMeansConfig(init="nf4")))
