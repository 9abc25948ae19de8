"""Globally optimal weighted 1-D k-means (XLA): against brute-force enumeration and an exact
float64 dynamic program, degenerate rows, never worse than Lloyd or scikit-learn, determinism."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.quant import KMeansConfig
from any4_jax.quant.kmeans import kmeans_rows, sort_rows, weighted_sse
from any4_jax.quant.kmeans_optimal import optimal_kmeans_rows


def _solve(x, w, k):
    c, cost = optimal_kmeans_rows(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), k=k)
    return np.asarray(c), np.asarray(cost)


def _partition_cost(x, w, bounds):
    """float64 weighted SSE of the contiguous clusters x[b0:b1], x[b1:b2], ..., and their means."""
    cost, means = 0.0, []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s0 = w[a:b].sum()
        if s0 > 0:
            mu = (w[a:b] * x[a:b]).sum() / s0
            cost += (w[a:b] * (x[a:b] - mu) ** 2).sum()
            means.append(mu)
    return cost, means


def _brute_force(x, w, k):
    """All partitions of the sorted row into at most k contiguous clusters -> (best cost, its
    centroids, the second-best cost among partitions with other centroids)."""
    x, w, n = x.astype(np.float64), w.astype(np.float64), len(x)
    found = []
    for parts in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), parts - 1):
            found.append(_partition_cost(x, w, (0, *cuts, n)))
    found.sort(key=lambda cm: cm[0])
    best_cost, best_means = found[0]
    others = [c for c, m in found if len(m) != len(best_means) or not np.allclose(m, best_means)]
    return best_cost, np.array(best_means), min(others, default=np.inf)


def _exact_dp(x, w, k):
    """The float64 O(k K^2) dynamic program -> the optimal weighted SSE."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    x = x - x.mean()
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, w * x, w * x * x))
    s0 = p0[None, :] - p0[:, None]  # [j, i]: the run x[j:i]
    s1 = p1[None, :] - p1[:, None]
    s2 = p2[None, :] - p2[:, None]
    cost = np.where(s0 > 0, s2 - s1 ** 2 / np.where(s0 > 0, s0, 1.0), 0.0)
    cost = np.where(np.triu(np.ones_like(cost, bool)), np.maximum(cost, 0.0), np.inf)
    d = cost[0]
    for _ in range(k - 1):
        d = np.min(d[:, None] + cost, axis=0)
    return d[-1]


def _sse64(x, w, c):
    """float64 weighted SSE with every value at its nearest centroid."""
    x, w, c = (np.asarray(a, np.float64) for a in (x, w, c))
    return np.sum(w * np.min((x[:, :, None] - c[:, None, :]) ** 2, axis=2), axis=1)


def _realistic_rows(rng, r, n):
    """Student-t values (LLM-like outliers) with lognormal sample weights, sorted."""
    x = rng.standard_t(4, (r, n)).astype(np.float32)
    w = rng.lognormal(0.0, 1.0, (r, n)).astype(np.float32)
    xs, ws = sort_rows(jnp.asarray(x), jnp.asarray(w))
    return np.asarray(xs), np.asarray(ws)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_equals_brute_force_on_tiny_rows(rng, k):
    rows, width = 60, 12
    xs, ws, lengths = [], [], []
    for trial in range(rows):
        n = int(rng.integers(1, width + 1))
        # every other row: small integers, so duplicate values and exact ties abound
        x = rng.integers(0, 5, n) if trial % 2 else rng.standard_normal(n)
        x = np.sort(x).astype(np.float32)
        w = rng.uniform(0.0, 2.0, n).astype(np.float32)
        w[rng.uniform(size=n) < 0.25] = 0.0  # zero weights among the values
        # one call for all rows: pad each with zero-weight copies of its largest value
        xs.append(np.concatenate([x, np.full(width - n, x[-1], np.float32)]))
        ws.append(np.concatenate([w, np.zeros(width - n, np.float32)]))
        lengths.append(n)
    c, cost = _solve(np.stack(xs), np.stack(ws), k)
    checked_partitions = 0
    for i, n in enumerate(lengths):
        x, w = xs[i][:n], ws[i][:n]
        w_eff = w if w.sum() > 0 else np.ones_like(w)
        best, best_means, second = _brute_force(x, w_eff, k)
        assert cost[i] == pytest.approx(best, rel=1e-5, abs=1e-6), (x, w, k)
        assert _sse64(x[None], w_eff[None], c[i:i + 1])[0] == pytest.approx(best, rel=1e-5,
                                                                          abs=1e-6)
        if len(best_means) == k and second > best * (1 + 1e-3) + 1e-6:  # unique by a margin
            np.testing.assert_allclose(c[i], best_means, rtol=1e-5, atol=1e-5)
            checked_partitions += 1
    assert checked_partitions >= 10  # the partition itself was compared often enough


def test_exact_on_realistic_rows_against_float64_dp(rng):
    # Double-float prefix sums and cost: a float32 cost S2 - S1^2 / S0 lost up to 2e-5 of the
    # SSE on a third of such rows; here every row is within 1e-6 of the float64 optimum.
    xs, ws = _realistic_rows(rng, 6, 512)
    c, cost = _solve(xs, ws, 16)
    exact = np.array([_exact_dp(xs[i], ws[i], 16) for i in range(len(xs))])
    ours = _sse64(xs, ws, c)
    assert np.all(ours <= exact * (1 + 1e-6)), ours / exact
    np.testing.assert_allclose(cost, exact, rtol=1e-5)


def test_degenerate_rows():
    k = 4
    x = np.array([
        [1.0] * 6,                            # constant row
        [0.0, 0.0, 1.0, 1.0, 1.0, 3.0],       # 3 distinct values < k
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],       # all weights zero: solved with unit weights
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],       # 6 values, only 2 of them with weight
        [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0],     # exactly k distinct values with weight
    ], np.float32)
    w = np.array([
        [1.0, 2.0, 0.5, 0.0, 1.0, 1.0],
        [1.0, 0.0, 2.0, 1.0, 0.0, 1.0],
        [0.0] * 6,
        [0.0, 3.0, 0.0, 0.0, 1.0, 0.0],
        [1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
    ], np.float32)
    c, cost = _solve(x, w, k)
    np.testing.assert_array_equal(c[0], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(c[1], [0.0, 1.0, 3.0, 3.0])  # extras repeat the largest
    np.testing.assert_array_equal(c[3], [1.0, 4.0, 4.0, 4.0])
    np.testing.assert_array_equal(c[4], [-2.0, -1.0, 2.0, 3.0])
    np.testing.assert_array_equal(cost[[0, 1, 3, 4]], 0.0)
    c_ones, cost_ones = _solve(x[2:3], np.ones((1, 6), np.float32), k)
    np.testing.assert_array_equal(c[2], c_ones[0])
    assert cost[2] == cost_ones[0] == pytest.approx(_brute_force(x[2], np.ones(6), k)[0])


def test_fewer_values_than_clusters():
    x = np.array([[-1.0, 0.5, 2.0], [3.0, 3.0, 3.0]], np.float32)
    w = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 2.0]], np.float32)
    c, cost = _solve(x, w, 16)
    assert c.shape == (2, 16)
    np.testing.assert_array_equal(c[0], [-1.0, 0.5] + [2.0] * 14)
    np.testing.assert_array_equal(c[1], [3.0] * 16)
    np.testing.assert_array_equal(cost, 0.0)
    c1, cost1 = _solve(x, w, 1)  # k = 1: the weighted mean
    np.testing.assert_allclose(c1[:, 0], [0.5, 3.0], rtol=1e-6)


@pytest.mark.parametrize("n, k, rows", [
    (256, 8, 64),
    pytest.param(4096, 16, 16, marks=pytest.mark.slow),
])
def test_never_worse_than_lloyd_or_scikit_learn(rng, n, k, rows):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    xs, ws = _realistic_rows(rng, rows, n)
    c, cost = _solve(xs, ws, k)
    assert np.all(np.diff(c, axis=1) >= 0)
    ours = np.asarray(weighted_sse(jnp.asarray(xs), jnp.asarray(ws), jnp.asarray(c)))
    np.testing.assert_allclose(cost, ours, rtol=1e-5)

    lloyd, _ = kmeans_rows(jnp.asarray(xs), jnp.asarray(ws), jnp.arange(rows), k=k,
                           config=KMeansConfig())
    theirs = np.asarray(weighted_sse(jnp.asarray(xs), jnp.asarray(ws), jnp.sort(lloyd, 1)))
    assert np.all(ours <= theirs * (1 + 1e-6)), (ours / theirs).max()  # on every row
    assert np.median(ours / theirs) < 0.999  # and the optimum is clearly better on most

    for i in range(3):
        km = sklearn_cluster.KMeans(n_clusters=k, n_init=10, random_state=i)
        km.fit(xs[i, :, None].astype(np.float64), sample_weight=ws[i].astype(np.float64))
        sk = np.sort(km.cluster_centers_[:, 0])
        sk_sse = _sse64(xs[i:i + 1], ws[i:i + 1], sk[None])[0]
        assert _sse64(xs[i:i + 1], ws[i:i + 1], c[i:i + 1])[0] <= sk_sse * (1 + 1e-6)


def test_jit_vmap_shapes_determinism_and_row_independence(rng):
    xs, ws = _realistic_rows(rng, 128, 24)  # two chunks of rows
    c, cost = optimal_kmeans_rows(jnp.asarray(xs), jnp.asarray(ws), k=16)
    assert c.shape == (128, 16) and c.dtype == jnp.float32
    assert cost.shape == (128,) and cost.dtype == jnp.float32
    c2, cost2 = optimal_kmeans_rows(jnp.asarray(xs), jnp.asarray(ws), k=16)
    np.testing.assert_array_equal(c, c2)  # bit-identical
    np.testing.assert_array_equal(cost, cost2)

    # a row's table does not depend on the rows solved beside it
    perm = rng.permutation(128)
    c_perm, cost_perm = _solve(xs[perm], ws[perm], 16)
    np.testing.assert_array_equal(c_perm, c[perm])
    np.testing.assert_array_equal(cost_perm, cost[perm])

    # inside a caller's jit and vmap (two matrices stacked): the same tables
    both = jax.jit(jax.vmap(lambda a, b: optimal_kmeans_rows(a, b, k=16)))(
        jnp.asarray(xs).reshape(2, 64, 24), jnp.asarray(ws).reshape(2, 64, 24))
    assert both[0].shape == (2, 64, 16) and both[1].shape == (2, 64)
    np.testing.assert_allclose(np.asarray(both[0]).reshape(128, 16), c, rtol=1e-6, atol=1e-6)


def test_rejects_bad_arguments():
    x = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="k=0"):
        optimal_kmeans_rows(x, x, k=0)
    with pytest.raises(ValueError, match="shapes"):
        optimal_kmeans_rows(x, jnp.zeros((2, 4)), k=4)
