"""LO-BCQ numerics: the iteration against a numpy oracle, its properties, the storage format."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.quant import QuantConfig, quantize_weight
from any4_jax.quant.bcq import BCQWeight, bits_per_scalar, e4m3_value, qmax_of
from any4_jax.quant.bcq_codebooks import BCQCodebooks
from any4_jax.quant.bcq_fit import (
    BCQFitConfig,
    assign,
    fit_codebooks,
    init_codebooks,
    update,
)
from any4_jax.quant.bcq_quantize import normalized_blocks
from any4_jax.quant.qweight import unpack_codes

QMAX = qmax_of(6)


def _blocks(seed=0, b=600, lb=8):
    """Normalized-looking blocks: heavy-tailed values in [-31, 31], and weights >= 0."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.standard_t(4, size=(b, lb)) * 6, -QMAX, QMAX).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=(b, lb)).astype(np.float32)
    return x, w


def _oracle_step(x, w, c):
    """One LO-BCQ step in float64 numpy, written out loop by loop: (selectors, entry indices,
    errors, new codebooks)."""
    b, lb = x.shape
    nc = c.shape[0]
    err = np.zeros((b, nc))
    for j in range(nc):
        d = np.abs(x[..., None] - c[j][None, None, :])  # [B, Lb, 16]
        idx = np.argmin(d, axis=-1)  # first minimum: ties to the lower entry
        err[:, j] = np.sum(w * (x - c[j][idx]) ** 2, axis=1)
    sel = np.argmin(err, axis=1)
    idx = np.argmin(np.abs(x[..., None] - c[sel][:, None, :]), axis=-1)
    new = c.copy()
    for j in range(nc):
        for e in range(16):
            m = (sel[:, None] == j) & (idx == e)
            if w[m].sum() > 0:
                new[j, e] = np.clip(np.round(np.sum(w[m] * x[m]) / w[m].sum()), -QMAX, QMAX)
    return sel, idx, err[np.arange(b), sel], np.sort(new, axis=-1)


def test_one_step_matches_the_numpy_oracle():
    x, w = _blocks()
    c = np.asarray(init_codebooks(jnp.asarray(x), n_codebooks=8, qmax=QMAX))
    sel, idx, err, new = _oracle_step(x.astype(np.float64), w.astype(np.float64), c)
    s2, i2, e2 = (np.asarray(a) for a in assign(jnp.asarray(x), jnp.asarray(w), jnp.asarray(c)))
    assert np.array_equal(s2, sel) and np.array_equal(i2, idx)
    np.testing.assert_allclose(e2, err, rtol=1e-5, atol=1e-5)
    n2 = update(jnp.asarray(x), jnp.asarray(w), jnp.asarray(c), jnp.asarray(s2), jnp.asarray(i2),
                qmax=QMAX)
    assert np.array_equal(np.asarray(n2), new)


def test_init_is_sorted_integer_quantiles_of_amax_groups():
    x, _ = _blocks(1, b=160)
    c = np.asarray(init_codebooks(jnp.asarray(x), n_codebooks=4, qmax=QMAX))
    order = np.argsort(np.abs(x).max(1), kind="stable")
    for j in range(4):
        vals = x[order[40 * j: 40 * (j + 1)]].reshape(-1)
        want = np.sort(np.clip(np.round(np.quantile(vals, (np.arange(16) + 0.5) / 16)),
                               -QMAX, QMAX))
        for e in range(1, 16):  # distinct: pushed up past the left neighbour ...
            want[e] = max(want[e], want[e - 1] + 1)
        for e in range(16):  # ... and down to leave room on the right
            want[e] = min(want[e], QMAX - (15 - e))
        np.testing.assert_array_equal(c[j], want)
        assert np.all(np.diff(c[j]) > 0)
    # groups of wider blocks get wider codebooks
    assert np.all(np.diff(c.max(1) - c.min(1)) >= 0)


@pytest.mark.parametrize("pin", [False, True])
def test_mse_never_increases_and_the_end_is_a_fixed_point(pin):
    x, w = _blocks(2, b=2000)
    r = fit_codebooks(x, w, n_codebooks=16, config=BCQFitConfig(max_iter=100, tol=0.0),
                      pin_range=pin)
    for h in (np.asarray(r.mse_float), np.asarray(r.mse)):  # each phase is monotone
        assert np.all(np.diff(h) <= 1e-6 * h[:-1]), h
    assert r.mse[-1] < r.mse_float[0]
    assert len(r.mse) - 1 < 100  # the integer phase converged (tol 0: to a fixed point) ...
    c = jnp.asarray(r.codebooks)
    assert np.array_equal(r.codebooks, np.round(r.codebooks))
    if pin:
        assert np.all(r.codebooks[:, 0] == -QMAX) and np.all(r.codebooks[:, -1] == QMAX)
    sel, idx, _ = assign(jnp.asarray(x), jnp.asarray(w), c)  # ... so a step changes nothing
    again = update(jnp.asarray(x), jnp.asarray(w), c, sel, idx, qmax=QMAX, pin_range=pin)
    assert np.array_equal(np.asarray(again), r.codebooks)


def test_the_real_valued_phase_gets_past_where_integer_steps_stall():
    x, w = _blocks(8, b=4000)
    c0 = init_codebooks(jnp.asarray(x), n_codebooks=8, qmax=QMAX)
    cfg = BCQFitConfig(max_iter=0)
    # integer steps alone, from the same start
    c = c0
    for _ in range(50):
        sel, idx, _ = assign(jnp.asarray(x), jnp.asarray(w), c)
        c = update(jnp.asarray(x), jnp.asarray(w), c, sel, idx, qmax=QMAX)
    stalled = float(jnp.sum(assign(jnp.asarray(x), jnp.asarray(w), c)[2]))
    r = fit_codebooks(x, w, n_codebooks=8, init=c0)
    two_phase = float(np.sum(np.asarray(assign(jnp.asarray(x), jnp.asarray(w),
                                               jnp.asarray(r.codebooks))[2])))
    assert two_phase < 0.97 * stalled, (two_phase, stalled)
    assert fit_codebooks(x, w, n_codebooks=8, init=c0, config=cfg).iters == 0


def test_assignment_is_optimal_given_the_codebooks():
    """No other codebook, and no other entry, gives any block a lower weighted error."""
    x, w = _blocks(3)
    r = fit_codebooks(x, w, n_codebooks=8, config=BCQFitConfig(max_iter=3))
    c = r.codebooks.astype(np.float64)
    sel, idx, err = (np.asarray(a) for a in assign(jnp.asarray(x), jnp.asarray(w),
                                                   jnp.asarray(r.codebooks)))
    # brute force over every codebook and every entry per scalar
    d = (x.astype(np.float64)[:, :, None, None] - c[None, None]) ** 2  # [B, Lb, Nc, 16]
    best = np.sum(w[..., None] * d.min(-1), axis=1)  # [B, Nc]
    np.testing.assert_allclose(err, best.min(1), rtol=1e-5, atol=1e-4)
    assert np.all(best[np.arange(len(sel)), sel] <= best.min(1) + 1e-4)
    assert np.array_equal(np.abs(x[..., None] - c[sel][:, None, :]).argmin(-1), idx)


def test_each_codebook_is_a_weighted_lloyd_fixed_point_given_the_assignment():
    """At convergence every used entry is the integer nearest the weighted mean of its cell."""
    x, w = _blocks(4, b=3000)
    r = fit_codebooks(x, w, n_codebooks=8, config=BCQFitConfig(max_iter=200, tol=0.0))
    assert len(r.mse) - 1 < 200
    sel, idx, _ = (np.asarray(a) for a in assign(jnp.asarray(x), jnp.asarray(w),
                                                 jnp.asarray(r.codebooks)))
    used = 0
    for j in range(8):
        for e in range(16):
            m = (sel[:, None] == j) & (idx == e)
            if w[m].sum() > 0:
                used += 1
                mean = np.sum(w[m].astype(np.float64) * x[m]) / w[m].sum()
                assert abs(r.codebooks[j, e] - mean) <= 0.5 + 1e-4, (j, e, mean)
    assert used > 100


def test_fit_is_deterministic_for_a_seed_and_subsamples():
    x, w = _blocks(5, b=5000)
    cfg = BCQFitConfig(max_blocks=1000, seed=3)
    a = fit_codebooks(x, w, n_codebooks=8, config=cfg)
    b = fit_codebooks(x, w, n_codebooks=8, config=cfg)
    c = fit_codebooks(x, w, n_codebooks=8, config=BCQFitConfig(max_blocks=1000, seed=4))
    assert a.blocks == 1000 and np.array_equal(a.codebooks, b.codebooks)
    assert not np.array_equal(a.codebooks, c.codebooks)


def _weight(seed=0, n=64, k=256):
    w = jax.random.normal(jax.random.PRNGKey(seed), (n, k)) * 0.02
    return w * jnp.exp(0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1), (1, k)))


def test_dequantize_follows_the_bit_layout():
    w = _weight()
    qw = quantize_weight(w, QuantConfig(format="bcq"))
    assert isinstance(qw, BCQWeight)
    n, k = w.shape
    codes = np.asarray(unpack_codes(qw.codes)).astype(int)  # [N, K]
    sel = np.asarray(unpack_codes(qw.selectors)).astype(int)  # [N, K / 8]
    cb = np.asarray(qw.codebooks).astype(np.float64)
    e = np.asarray(e4m3_value(qw.scales), np.float64)
    ts = float(qw.tensor_scale)
    want = np.empty((n, k))
    for r in range(n):
        for c in range(k):
            want[r, c] = cb[sel[r, c // 8], codes[r, c]] * e[r, c // 64] * ts
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)), want)
    assert np.log2(ts) == int(np.log2(ts))  # a power of two
    assert np.all(np.diff(cb, axis=1) >= 0) and np.abs(cb).max() <= QMAX
    # the largest array scale lands in e4m3's top binade
    assert 224 <= e.max() <= 448
    # byte 0 of codes holds elements 0 (low nibble) and 1 (high)
    b0 = int(np.asarray(qw.codes)[0, 0])
    assert (b0 & 15, b0 >> 4) == (codes[0, 0], codes[0, 1])


def test_quantization_error_is_below_any4_at_similar_bits():
    w = _weight(7, n=128, k=512)
    rel = lambda q: float(jnp.mean((q.dequantize(jnp.float32) - w) ** 2) / jnp.mean(w ** 2))
    bcq = rel(quantize_weight(w, QuantConfig(format="bcq")))
    int4 = rel(quantize_weight(w, QuantConfig(format="int4", group_size=64)))
    assert bcq < 0.75 * int4, (bcq, int4)


def test_bits_per_scalar_follow_the_formula():
    assert bits_per_scalar(block_len=8, array_len=64, n_codebooks=16) == 4.625
    assert bits_per_scalar(block_len=8, array_len=64, n_codebooks=8) == 4.5
    qw = quantize_weight(_weight(), QuantConfig(format="bcq", n_codebooks=8))
    n, k = qw.shape
    assert math.isclose(qw.bits_per_weight(), 4.5 + (8 * 16 * 6 + 32) / (n * k))
    # stored: 4-bit codes, 4-bit selectors (nibbles), 8-bit scales, int8 codebooks, f32 scale
    assert qw.nbytes() == n * k // 2 + n * k // 16 + n * k // 64 + 8 * 16 + 4


def test_universal_codebooks_encode_and_sample_weights_matter():
    w = _weight(9)
    xbar = jnp.exp(jax.random.normal(jax.random.PRNGKey(3), (256,)))
    x, sw, _, _ = normalized_blocks(w, QuantConfig(format="bcq"), xbar)
    r = fit_codebooks(x, sw)
    cfg = QuantConfig(format="bcq")
    qu, info = quantize_weight(w, cfg, sample_weight=xbar, codebooks=r.codebooks,
                               return_info=True)
    assert not info["local"] and np.array_equal(np.asarray(qu.codebooks), r.codebooks)
    ql = quantize_weight(w, cfg, sample_weight=xbar)
    q0 = quantize_weight(w, cfg.replace(sample_weighting="none"))
    err = lambda q: float(jnp.sum(xbar * (q.dequantize(jnp.float32) - w) ** 2))
    assert err(ql) < err(q0)  # weighted by the activations, the weighted error is lower


def test_bad_settings_and_codebooks_are_named():
    with pytest.raises(ValueError, match="apply to format='bcq' only"):
        QuantConfig(format="any4", n_codebooks=8)
    with pytest.raises(ValueError, match="multiple of 2 \\* block_len"):
        QuantConfig(format="bcq", array_len=24)
    with pytest.raises(ValueError, match="n_codebooks=32"):
        QuantConfig(format="bcq", n_codebooks=32)
    with pytest.raises(ValueError, match="not divisible by array_len=64"):
        quantize_weight(jnp.ones((4, 96)), QuantConfig(format="bcq"))
    with pytest.raises(ValueError, match="shape \\(8, 16\\), expected \\(16, 16\\)"):
        quantize_weight(_weight(), QuantConfig(format="bcq"), codebooks=np.zeros((8, 16)))
    with pytest.raises(ValueError, match="integers in \\[-31, 31\\]"):
        quantize_weight(_weight(), QuantConfig(format="bcq"), codebooks=np.full((16, 16), 40.0))
    with pytest.raises(ValueError, match="codebooks apply to format='bcq' only"):
        quantize_weight(_weight(), QuantConfig(format="int4", group_size=64),
                        codebooks=np.zeros((16, 16)))


def test_codebooks_file_round_trip_and_errors(tmp_path):
    x, _ = _blocks(6, b=400)
    r = fit_codebooks(x, n_codebooks=4)
    ra = fit_codebooks(x, n_codebooks=4, pin_range=True)
    cb = BCQCodebooks(weights=r.codebooks, activations=ra.codebooks, block_len=8, array_len=64,
                      codebook_bits=6, info={"note": "t"})
    path = tmp_path / "cb.npz"
    cb.save(path)
    back = BCQCodebooks.load(path)
    assert np.array_equal(back.weights, cb.weights)
    assert np.array_equal(back.activations, cb.activations)
    assert back.info == {"note": "t"} and back.n_codebooks == 4
    assert back.matches(QuantConfig(format="bcq")) == ["n_codebooks: codebooks 4, config 16"]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a codebooks file"):
        BCQCodebooks.load(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="no such codebooks file"):
        BCQCodebooks.load(tmp_path / "missing.npz")
