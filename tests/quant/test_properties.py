"""Property tests: random shapes, group sizes and formats."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from any4_jax import QuantConfig, quantize_weight
from any4_jax.quant.qweight import unpack_codes

# Few distinct shapes keep the number of compilations (the real cost here) small.
shapes = st.sampled_from([(3, 32), (16, 64), (5, 128), (33, 96)])
groups = st.sampled_from([2, 8, 16, 32, None])
scales = st.sampled_from([1e-3, 1.0, 50.0])


def _weight(seed, shape, scale, heavy):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(2.0, size=shape) if heavy else rng.standard_normal(shape)
    return (w * scale).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shape=shapes, g=groups, scale=scales, heavy=st.booleans(),
       n_bit=st.sampled_from([2, 3, 4]), symmetric=st.booleans())
def test_int_error_is_at_most_half_a_step(seed, shape, g, scale, heavy, n_bit, symmetric):
    if g is not None and shape[1] % g:
        g = None
    w = _weight(seed, shape, scale, heavy)
    qw = quantize_weight(w, QuantConfig(format=f"int{n_bit}", group_size=g, symmetric=symmetric))
    codes = np.asarray(unpack_codes(qw.codes))
    assert codes.max() < 2**n_bit
    step = np.repeat(np.asarray(qw.scales), qw.group_size, axis=1)
    err = np.abs(np.asarray(qw.dequantize()) - w)
    if symmetric:
        # the top code of the signed grid is clipped: values there are within one step
        assert np.all(err <= step * 1.0 + 1e-6 * np.abs(w).max())
    else:
        assert np.all(err <= step * (0.5 + 1e-4) + 1e-6 * np.abs(w).max())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shape=shapes, g=groups, scale=scales, heavy=st.booleans(),
       fmt=st.sampled_from(["any4", "any3", "any2", "nf4", "fp4", "fp4_e2m1"]))
def test_codes_in_range_no_nan_and_bounded_error(seed, shape, g, scale, heavy, fmt):
    if g is not None and shape[1] % g:
        g = None
    w = _weight(seed, shape, scale, heavy)
    qw = quantize_weight(w, QuantConfig(format=fmt, group_size=g))
    codes = np.asarray(unpack_codes(qw.codes))
    n_levels = 2 ** qw.n_bit
    assert codes.min() >= 0 and codes.max() < n_levels
    deq = np.asarray(qw.dequantize())
    assert np.isfinite(deq).all() and np.isfinite(np.asarray(qw.lut)).all()
    # every dequantized value stays inside its group's range (tables live in [min, max])
    gs = qw.group_size
    wg = w.reshape(w.shape[0], -1, gs)
    dg = deq.reshape(deq.shape[0], -1, gs)
    absmax = np.abs(wg).max(-1, keepdims=True)
    tol = 1e-5 * absmax + 1e-30
    if fmt.startswith("any"):
        assert np.all(dg >= wg.min(-1, keepdims=True) - tol)
        assert np.all(dg <= wg.max(-1, keepdims=True) + tol)
    else:
        assert np.all(np.abs(dg) <= absmax + tol)
