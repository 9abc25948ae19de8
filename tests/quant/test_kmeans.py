"""Weighted k-means: quality against scikit-learn, determinism, sharding and chunking."""

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.quant import KMeansConfig, QuantConfig, quantize_weight, row_mesh
from any4_jax.quant.kmeans import kmeans_rows, sort_rows, weighted_sse
from any4_jax.quant.rowsort import sort_rows_host

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def _rows(rng, kind, r=48, k=512):
    # "heavy": Student-t tails, like LLM weights with outliers
    x = rng.standard_normal((r, k)) if kind == "normal" else rng.standard_t(2.5, size=(r, k))
    # map to the any4 scaled range [0, 15] as group scaling would
    x = (x - x.min(1, keepdims=True)) / np.ptp(x, axis=1, keepdims=True) * 15
    w = rng.uniform(0.05, 2.0, size=(r, k)) * np.exp(rng.standard_normal((1, k)))
    return x.astype(np.float32), w.astype(np.float32)


def _require(impl_name):
    if impl_name == "cpu":
        from any4_jax.quant import kmeans_cpu

        if not kmeans_cpu.available():
            pytest.skip("the CPU k-means library could not be built (no C++ compiler?)")
    return impl_name


@pytest.fixture(params=["xla", "cpu"])
def impl(request):
    """Both implementations of the row k-means: XLA, and the compiled CPU kernel."""
    return _require(request.param)


def _ours(x, w, config, k=16, impl="xla"):
    if impl == "cpu":
        from any4_jax.quant.kmeans import grid_init
        from any4_jax.quant.kmeans_cpu import kmeans_rows_cpu

        r = x.shape[0]
        init = (jnp.zeros((r, k)) if config.init == "kmeans++"
                else grid_init(r, k, 0.0, float(k - 1), config.init))
        c, iters = kmeans_rows_cpu(jnp.asarray(x), jnp.asarray(w), jnp.arange(r), init, k=k,
                                   max_iter=config.max_iter, tol=config.tol, seed=config.seed,
                                   plusplus=config.init == "kmeans++")
        return np.asarray(c), np.asarray(iters)
    xs, ws = sort_rows(jnp.asarray(x), jnp.asarray(w))
    c, iters = kmeans_rows(xs, ws, jnp.arange(x.shape[0]), k=k, config=config)
    return np.asarray(c), np.asarray(iters)


def _sse(x, w, c):
    return np.asarray(weighted_sse(jnp.asarray(x), jnp.asarray(w), jnp.sort(jnp.asarray(c), 1)))


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_within_one_percent_of_scikit_learn(rng, kind, impl):
    # Both sides are one randomised k-means++ run per row; per-row ratios spread by +-10%, so
    # it takes a few hundred rows for the median to settle within the 1% we assert.
    x, w = _rows(rng, kind, r=240)
    c, _ = _ours(x, w, KMeansConfig(), impl=impl)
    ref = np.stack([
        sklearn_cluster.KMeans(n_clusters=16, init="k-means++", n_init=1, random_state=i,
                               max_iter=300, tol=1e-4)
        .fit(x[i, :, None].astype(np.float64), sample_weight=w[i]).cluster_centers_[:, 0]
        for i in range(x.shape[0])
    ])
    ratio = _sse(x, w, c) / _sse(x, w, ref)
    assert np.median(ratio) <= 1.01, f"median SSE ratio ours/sklearn = {np.median(ratio):.4f}"
    assert np.percentile(ratio, 90) < 1.25  # no systematic tail of bad rows


def test_never_worse_than_the_int_init(rng, impl):
    x, w = _rows(rng, "heavy")
    pp = _sse(x, w, _ours(x, w, KMeansConfig(), impl=impl)[0])
    grid = _sse(x, w, _ours(x, w, KMeansConfig(init="int"), impl=impl)[0])
    assert pp.mean() <= grid.mean()
    assert np.median(pp / grid) <= 1.0


# init="random" always runs on the XLA path, so the CPU kernel has no such case.
@pytest.mark.parametrize("impl_name, init", [
    *[("xla", i) for i in ("kmeans++", "random", "int", "nf4")],
    *[("cpu", i) for i in ("kmeans++", "int", "nf4")]])
def test_lloyd_improves_on_its_init(rng, impl_name, init):
    impl = _require(impl_name)
    x, w = _rows(rng, "normal", r=16)
    start = _sse(x, w, _ours(x, w, KMeansConfig(init=init, max_iter=0), impl=impl)[0])
    c, iters = _ours(x, w, KMeansConfig(init=init), impl=impl)
    end = _sse(x, w, c)
    assert np.all(end <= start * (1 + 1e-6))
    assert np.all(np.diff(c, axis=1) >= 0), "centroids come back sorted"
    assert np.all((iters >= 1) & (iters <= 300))


def test_convergence_respects_max_iter(rng, impl):
    x, w = _rows(rng, "heavy", r=16)
    _, iters = _ours(x, w, KMeansConfig(max_iter=2), impl=impl)
    assert iters.max() <= 2


def test_empty_clusters_and_degenerate_rows(impl):
    x = np.zeros((4, 64), np.float32)
    x[0, :] = np.tile([1.0, 5.0, 9.0], 22)[:64]  # 3 distinct values for 16 centroids
    x[1, :] = 7.0  # constant row
    x[2, :] = np.linspace(0, 15, 64)
    w = np.ones_like(x)
    w[3, :] = 0.0  # zero-weight row
    c, _ = _ours(x, w, KMeansConfig(), impl=impl)
    assert np.isfinite(c).all()
    np.testing.assert_allclose(_sse(x[:2], w[:2], c[:2]), 0.0, atol=1e-6)


def test_same_seed_same_result_other_seed_differs(rng):
    w = rng.standard_t(3, size=(40, 256)).astype(np.float32)
    cfg = QuantConfig(format="any4", group_size=64)
    a = quantize_weight(w, cfg)
    b = quantize_weight(w, cfg)
    np.testing.assert_array_equal(a.lut, b.lut)
    np.testing.assert_array_equal(a.codes, b.codes)
    c = quantize_weight(w, cfg.replace(kmeans=KMeansConfig(seed=1)))
    assert not np.array_equal(a.lut, c.lut)


@pytest.mark.parametrize("fmt", ["any4", "any2", "nf4", "int4"])
def test_sharded_and_chunked_runs_are_bit_identical(rng, fmt):
    # 100 rows: not a multiple of the 8 devices nor of the chunk, so padding is exercised too.
    w = rng.standard_t(3, size=(100, 256)).astype(np.float32)
    xbar = rng.uniform(0.1, 3.0, size=256).astype(np.float32)
    cfg = QuantConfig(format=fmt, group_size=64)
    base = quantize_weight(w, cfg, sample_weight=xbar)
    sharded = quantize_weight(w, cfg, sample_weight=xbar, mesh=row_mesh())
    chunked, info = quantize_weight(w, cfg, sample_weight=xbar, chunk_elements=24 * 256,
                                    return_info=True)
    both = quantize_weight(w, cfg, sample_weight=xbar, mesh=row_mesh(), chunk_elements=40 * 256)
    assert info["chunks"] == 5
    for other in (sharded, chunked, both):
        for f in ("codes", "lut", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(other, f), getattr(base, f), err_msg=f)


def test_host_sort_matches_device_sort(rng):
    x = rng.standard_normal((8, 300)).astype(np.float32)
    w = rng.uniform(size=x.shape).astype(np.float32)
    xs_h, ws_h = sort_rows_host(x, w, workers=2)
    xs_d, ws_d = sort_rows(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_array_equal(xs_h, np.asarray(xs_d))
    np.testing.assert_array_equal(ws_h, np.asarray(ws_d))  # each weight travels with its value
    # negative values, -0.0 and +0.0 sort as numbers
    z = np.array([[3.0, -0.0, -2.5, 0.0, -1e-30, 1e-30]], np.float32)
    zs, _ = sort_rows_host(z, np.ones_like(z))
    np.testing.assert_array_equal(zs, np.sort(z))


def test_large_matrices_are_chunked(rng):
    # A 28672 x 8192 matrix is processed 512 rows (4M elements, ~200 MB of k-means state) at a
    # time on CPU; check the chunking rule on a shape that needs several chunks.
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    _, info = quantize_weight(w, QuantConfig(format="any4"), chunk_elements=16 * 1024,
                              return_info=True)
    assert info["rows_per_chunk"] == 16 and info["chunks"] == 4


@pytest.mark.parametrize("weighting", ["none", "activations", "activations_x_scales"])
def test_sample_weighting_modes_reduce_their_own_objective(rng, weighting):
    w = rng.standard_t(3, size=(16, 256)).astype(np.float32)
    xbar = np.exp(rng.standard_normal(256)).astype(np.float32)
    cfg = QuantConfig(format="any4", group_size=64, sample_weighting=weighting)
    qw = quantize_weight(w, cfg, sample_weight=xbar)
    # weighted output-relevant error: with activations the big channels must be fit better
    err = (np.asarray(qw.dequantize()) - w) ** 2
    plain = quantize_weight(w, cfg.replace(sample_weighting="none"), sample_weight=xbar)
    err_plain = (np.asarray(plain.dequantize()) - w) ** 2
    if weighting == "none":
        np.testing.assert_array_equal(err, err_plain)
    else:
        assert (err * xbar).sum() < (err_plain * xbar).sum()
