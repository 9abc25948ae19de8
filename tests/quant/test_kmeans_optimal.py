"""Globally optimal weighted k-means (KMeansConfig(method="optimal")): the compiled CPU solver
against brute-force enumeration, degenerate rows, never worse than Lloyd or scikit-learn on
any row, end to end through quantize_weight, and agreement with the XLA solver."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.quant import KMeansConfig, QuantConfig, quantize_weight
from any4_jax.quant.config import KMEANS_METHODS


@pytest.fixture(scope="module")
def solver():
    from any4_jax.quant import kmeans_cpu

    if not kmeans_cpu.available_optimal():
        pytest.skip("the CPU optimal k-means library could not be built (no C++ compiler?)")
    return lambda x, w, k: tuple(np.asarray(a) for a in kmeans_cpu.optimal_rows_cpu(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), k=k))


def _sse64(x, w, c):
    """Per-row weighted SSE in float64, each value to its nearest centroid."""
    x, w, c = (np.asarray(a, np.float64) for a in (x, w, c))
    d = (x[:, :, None] - c[:, None, :]) ** 2  # [R, K, k]
    return (w * d.min(-1)).sum(1)


def _partition_cost(x, w, labels, k):
    cost = 0.0
    for c in range(k):
        m = labels == c
        sw = w[m].sum()
        if sw > 0:
            mu = (w[m] * x[m]).sum() / sw
            cost += (w[m] * (x[m] - mu) ** 2).sum()
    return cost


def _brute_all_partitions(x, w, k):
    """The minimum weighted SSE over every assignment of the values to k labels (k^n)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if not w.sum() > 0:
        w = np.ones_like(w)
    return min(_partition_cost(x, w, np.array(lab), k)
               for lab in itertools.product(range(k), repeat=len(x)))


def _brute_contiguous(x, w, k):
    """The minimum over partitions of the sorted values into k contiguous runs (C(n-1, k-1))."""
    order = np.argsort(x, kind="stable")
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    if not w.sum() > 0:
        w = np.ones_like(w)
    n, best = len(x), np.inf
    for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
        labels = np.searchsorted(np.array(cuts), np.arange(n), side="right")
        best = min(best, _partition_cost(x, w, labels, k))
    return best


def _tiny_rows(rng, r, n, *, ties, zeros):
    x = (rng.integers(0, 5, (r, n)) if ties else rng.uniform(0, 15, (r, n))).astype(np.float32)
    w = rng.uniform(0.1, 2.0, (r, n)).astype(np.float32)
    if zeros:
        w[rng.uniform(size=(r, n)) < 0.3] = 0.0
    return x, w


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("zeros", [False, True])
def test_equals_brute_force_over_all_partitions(solver, rng, ties, zeros):
    for n, k in [(5, 2), (7, 3), (8, 3), (6, 4)]:
        x, w = _tiny_rows(rng, 24, n, ties=ties, zeros=zeros)
        c, cost = solver(x, w, k)
        assert np.all(np.diff(c, axis=1) >= 0), "centroids must be ascending"
        for i in range(len(x)):
            ref = _brute_all_partitions(x[i], w[i], k)
            ww = w[i] if w[i].sum() > 0 else np.ones_like(w[i])
            np.testing.assert_allclose(cost[i], ref, rtol=1e-5, atol=1e-6, err_msg=f"{n=} {k=}")
            # the returned table itself reaches the optimum (values to their nearest centroid)
            assert _sse64(x[i:i + 1], ww[None], c[i:i + 1])[0] <= ref * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("k", [2, 4, 8])
def test_equals_brute_force_over_contiguous_partitions(solver, rng, k):
    for ties, zeros in [(False, False), (True, True)]:
        x, w = _tiny_rows(rng, 16, 13, ties=ties, zeros=zeros)
        c, cost = solver(x, w, k)
        for i in range(len(x)):
            ref = _brute_contiguous(x[i], w[i], k)
            np.testing.assert_allclose(cost[i], ref, rtol=1e-5, atol=1e-6)


def test_deterministic_and_independent_of_the_batch(solver, rng):
    x, w = _tiny_rows(rng, 64, 200, ties=True, zeros=True)
    c1, s1 = solver(x, w, 16)
    c2, s2 = solver(x[::-1], w[::-1], 16)
    np.testing.assert_array_equal(c1, c2[::-1])
    np.testing.assert_array_equal(s1, s2[::-1])
    perm = rng.permutation(x.shape[1])  # the order of a row's values does not matter either
    c3, _ = solver(x[:, perm], w[:, perm], 16)
    np.testing.assert_array_equal(c1, c3)


def test_degenerate_rows(solver):
    k = 4
    x = np.array([[3.0, 1.0, 3.0, 2.0, 1.0, 2.0],   # 3 distinct values < k
                  [5.0] * 6,                          # constant
                  [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # zero weights but on 2 values
                  [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # all-zero weights: weighed equally
                  [9.0, 1.0, 8.0, 2.0, 7.0, 3.0]], np.float32)
    w = np.ones_like(x)
    w[2] = [0, 2, 0, 0, 1, 0]
    w[3] = 0
    c, cost = solver(x, w, k)
    np.testing.assert_array_equal(c[0], [1, 2, 3, 3])  # the largest repeats
    np.testing.assert_array_equal(c[1], [5, 5, 5, 5])
    np.testing.assert_array_equal(c[2], [1, 4, 4, 4])
    np.testing.assert_array_equal(cost[:3], 0)
    ref, _ = solver(x[3:4], np.ones((1, 6), np.float32), k)
    np.testing.assert_array_equal(c[3], ref[0])
    np.testing.assert_allclose(cost[3], 1.0, rtol=1e-6)  # two pairs and two singletons
    np.testing.assert_allclose(cost[4], _brute_contiguous(x[4], w[4], k), rtol=1e-6)


def test_method_is_validated_and_defaults_to_optimal():
    assert KMEANS_METHODS == ("lloyd", "optimal")
    assert KMeansConfig().method == "optimal" and KMeansConfig() == KMeansConfig(method="optimal")
    assert QuantConfig().kmeans.method == "optimal"
    # Lloyd's own settings ask for Lloyd; with method="optimal" they are an error, not ignored
    for kw in ({"init": "int"}, {"max_iter": 0}, {"tol": 1e-3}, {"seed": 1}):
        assert KMeansConfig(**kw).method == "lloyd"
        with pytest.raises(ValueError, match=f"{next(iter(kw))}=.*method='lloyd'"):
            KMeansConfig(method="optimal", **kw)
    with pytest.raises(ValueError, match="method='exact'"):
        KMeansConfig(method="exact")


def _scaled(w, xbar, config):
    """The group-scaled values and k-means sample weights quantize_weight uses."""
    from any4_jax.quant.quantize import _scale_rows

    g = config.resolve_group_size(w.shape[1])
    _, _, ws, sw = _scale_rows(jnp.asarray(w), jnp.asarray(xbar), spec=config.spec, g=g,
                               symmetric=config.symmetric, weighting=config.sample_weighting)
    return np.asarray(ws), np.asarray(sw)


def _tables(w, xbar, config):
    qw = quantize_weight(jnp.asarray(w), config, sample_weight=xbar)
    shift = 0 if config.symmetric else 2 ** (config.spec.n_bit - 1)
    return qw, np.asarray(qw.lut, np.float32)[:, : config.spec.n_levels] + shift


def _compare_with_lloyd(w, xbar, fmt="any4", group_size=128):
    lloyd = QuantConfig(format=fmt, group_size=group_size, kmeans=KMeansConfig(method="lloyd"))
    optimal = lloyd.replace(kmeans=KMeansConfig(method="optimal"))
    ws, sw = _scaled(w, xbar, lloyd)
    _, c_l = _tables(w, xbar, lloyd)
    _, c_o = _tables(w, xbar, optimal)
    return _sse64(ws, sw, c_o), _sse64(ws, sw, c_l)


def _real_looking(rng, n=512, k=1024):
    w = (rng.standard_t(4.0, size=(n, k)) * 0.02).astype(np.float32)
    return w, np.exp(rng.standard_normal(k)).astype(np.float32)


def test_never_worse_than_lloyd_on_any_row(solver, rng):
    w, xbar = _real_looking(rng)
    sse_o, sse_l = _compare_with_lloyd(w, xbar)
    assert np.all(sse_o <= sse_l * (1 + 1e-5)), np.max(sse_o / sse_l)
    assert np.median(sse_o / sse_l) < 0.999  # and strictly better on most rows


def test_never_worse_than_lloyd_any3(solver, rng):
    w, xbar = _real_looking(rng, 128, 512)
    sse_o, sse_l = _compare_with_lloyd(w, xbar, fmt="any3")
    assert np.all(sse_o <= sse_l * (1 + 1e-5)), np.max(sse_o / sse_l)


@pytest.mark.slow
def test_never_worse_than_lloyd_on_a_smollm2_layer(solver, smollm2):
    from any4_jax.nn.layers import dense_layers

    path, layer = next((p, m) for p, m in dense_layers(smollm2.model) if "down_proj" in p)
    w = np.asarray(layer.kernel.get_value(), np.float32).T  # [out, in]
    xbar = np.ones(w.shape[1], np.float32)
    sse_o, sse_l = _compare_with_lloyd(w, xbar, group_size=64)
    assert np.all(sse_o <= sse_l * (1 + 1e-5)), (path, np.max(sse_o / sse_l))


def test_never_worse_than_scikit_learn_best_of_ten(solver, rng):
    cluster = pytest.importorskip("sklearn.cluster")
    w, xbar = _real_looking(rng, 32, 512)
    ws, sw = _scaled(w, xbar, QuantConfig(format="any4", group_size=128))
    c, _ = solver(ws, sw, 16)
    ref = np.stack([np.sort(cluster.KMeans(16, n_init=10, random_state=0).fit(
        ws[i, :, None].astype(np.float64), sample_weight=sw[i]).cluster_centers_[:, 0])
        for i in range(len(ws))])
    sse_o, sse_s = _sse64(ws, sw, c), _sse64(ws, sw, ref)
    assert np.all(sse_o <= sse_s * (1 + 1e-5)), np.max(sse_o / sse_s)


def test_quantize_weight_end_to_end(solver, rng):
    w, xbar = _real_looking(rng, 64, 256)
    cfg = QuantConfig(format="any4", group_size=64, kmeans=KMeansConfig(method="optimal"))
    qw, info = quantize_weight(jnp.asarray(w), cfg, sample_weight=xbar, return_info=True)
    ql = quantize_weight(jnp.asarray(w), cfg.replace(kmeans=KMeansConfig(method="lloyd")),
                         sample_weight=xbar)
    assert qw.codes.shape == ql.codes.shape and qw.lut.shape == (64, 16)
    assert info["kmeans_iters_max"] == 0
    # the weighted reconstruction error (the k-means objective, in weight units) is not worse
    scales = np.repeat(np.asarray(qw.scales, np.float64), 64, axis=1)
    s = xbar[None, :] * scales  # activations x scales: SSE of the scaled values, times alpha^2

    def err(q):
        return (s * (np.asarray(q.dequantize(), np.float64) - w) ** 2 / scales ** 2).sum(1)

    e_o, e_l = err(qw), err(ql)
    assert np.all(e_o <= e_l * (1 + 1e-4))


def test_quantize_weight_symmetric_and_any2(solver, rng):
    w, xbar = _real_looking(rng, 32, 128)
    lloyd = KMeansConfig(method="lloyd")
    for cfg in [QuantConfig(format="any4", symmetric=True, kmeans=lloyd),
                QuantConfig(format="any2", kmeans=lloyd)]:
        opt = cfg.replace(kmeans=KMeansConfig(method="optimal"))
        ws, sw = _scaled(w, xbar, cfg)
        _, c_o = _tables(w, xbar, opt)
        _, c_l = _tables(w, xbar, cfg)
        assert np.all(_sse64(ws, sw, c_o) <= _sse64(ws, sw, c_l) * (1 + 1e-5))


def test_cpu_and_xla_agree(solver, rng):
    mod = pytest.importorskip("any4_jax.quant.kmeans_optimal")
    from any4_jax.quant.kmeans import sort_rows

    w, xbar = _real_looking(rng, 64, 512)
    ws, sw = _scaled(w, xbar, QuantConfig(format="any4", group_size=128))
    c_cpu, cost_cpu = solver(ws, sw, 16)
    xs, sws = sort_rows(jnp.asarray(ws), jnp.asarray(sw))
    c_xla, cost_xla = (np.asarray(a) for a in mod.optimal_kmeans_rows(xs, sws, k=16))
    np.testing.assert_allclose(cost_xla, cost_cpu, rtol=1e-5)
    span = np.ptp(ws, axis=1, keepdims=True)
    same = np.all(np.abs(c_xla - c_cpu) <= 1e-5 * span, axis=1)
    assert same.mean() >= 0.9, same.mean()
    # a row whose tables differ is a near-tie (float32 DP values in XLA): both tables optimal
    sse_c, sse_x = _sse64(ws, sw, c_cpu), _sse64(ws, sw, c_xla)
    np.testing.assert_allclose(sse_x[~same], sse_c[~same], rtol=1e-6)


def test_cli_flag():
    import argparse

    from any4_jax.cli.args import add_quant_settings

    p = argparse.ArgumentParser()
    add_quant_settings(p)
    assert p.parse_args([]).kmeans_method is None  # KMeansConfig's default: optimal
    assert p.parse_args(["--kmeans-method", "optimal"]).kmeans_method == "optimal"
    with pytest.raises(SystemExit):
        p.parse_args(["--kmeans-method", "exact"])


def test_cli_refuses_lloyd_settings_with_the_optimal_solver(capsys):
    from any4_jax.cli import main

    assert main(["quantize", "--kmeans-method", "optimal", "--seed", "3"]) == 2
    assert "--kmeans-method lloyd" in capsys.readouterr().err


def _dp_reference(x, w, k):
    """The optimal weighted SSE by the plain O(k n^2) dynamic program (float64, numpy)."""
    order = np.argsort(x, kind="stable")
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    n = len(x)
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, w * x, w * x * x))

    def cost(j, i):  # points [j, i) for an array of j
        s0, s1 = p0[i] - p0[j], p1[i] - p1[j]
        return (p2[i] - p2[j]) - s1 * s1 / s0

    d = np.concatenate([[0.0], cost(np.zeros(n, int), np.arange(1, n + 1))])
    for _ in range(2, k + 1):
        nd = np.full(n + 1, np.inf)
        for i in range(1, n + 1):
            j = np.arange(0, i)
            nd[i] = np.min(d[j] + cost(j, i))
        d = nd
    return d[n]


@pytest.mark.parametrize("n,k", [(300, 16), (257, 8), (400, 5)])
def test_equals_the_plain_dynamic_program(solver, rng, n, k):
    """Rows long enough for the wide (vectorised) windows and the pruned first positions of
    the middle layers: the cost equals the O(k n^2) DP's."""
    x = rng.standard_t(4.0, (6, n)).astype(np.float32)
    w = np.exp(rng.standard_normal((6, n))).astype(np.float32)
    _, cost = solver(x, w, k)
    for i in range(len(x)):
        np.testing.assert_allclose(cost[i], _dp_reference(x[i], w[i], k), rtol=1e-5)


def test_portable_build_equals_the_vectorised_one(solver, rng):
    """The same source built without AVX-512 (the scalar window scan, as on CPUs without it)
    gives the same tables and costs, bit for bit."""
    import jax

    from any4_jax.native import loader
    from any4_jax.quant import kmeans_cpu

    loaded = loader.load_cpu("kmeans_optimal_cpu", ("-mno-avx512f",))
    assert loaded.lib is not None, loaded.reason
    target = f"{kmeans_cpu.OPTIMAL_TARGET}_portable"
    assert loader.register(loaded, target=target, symbol="Any4OptimalKMeansRows",
                           platform="cpu", what="the portable optimal k-means") is None
    x = rng.standard_t(4.0, (16, 1024)).astype(np.float32)
    w = np.exp(rng.standard_normal((16, 1024))).astype(np.float32)
    w[:, ::7] = 0.0
    for k in (16, 8, 3):
        c, cost = jax.ffi.ffi_call(
            target, (jax.ShapeDtypeStruct((16, k), jnp.float32),
                     jax.ShapeDtypeStruct((16,), jnp.float32)), vmap_method="sequential",
        )(jnp.asarray(x), jnp.asarray(w), k=np.int64(k))
        c_ref, cost_ref = solver(x, w, k)
        np.testing.assert_array_equal(np.asarray(c), c_ref)
        np.testing.assert_array_equal(np.asarray(cost), cost_ref)


def test_quantize_weight_through_the_xla_solver(solver, rng, monkeypatch):
    """`quantize_weight` with the compiled k-means off (ANY4_JAX_CPU_KMEANS=0, what runs on a
    GPU) takes the XLA solver: the same tables as the compiled one up to near-ties."""
    w, xbar = _real_looking(rng, 64, 256)
    cfg = QuantConfig(format="any4", group_size=64, kmeans=KMeansConfig(method="optimal"))
    cpu = quantize_weight(jnp.asarray(w), cfg, sample_weight=xbar)
    from any4_jax.quant.quantize import _use_cpu_kmeans

    monkeypatch.setenv("ANY4_JAX_CPU_KMEANS", "0")
    assert not _use_cpu_kmeans(cfg.kmeans)
    xla, info = quantize_weight(jnp.asarray(w), cfg, sample_weight=xbar, return_info=True)
    assert info["kmeans_iters_max"] == 0
    # the tables in the scaled domain k-means works in (any4 stores centroid - 8)
    lut_c, lut_x = (np.asarray(q.lut, np.float64) + 8 for q in (cpu, xla))
    same = np.all(np.abs(lut_c - lut_x) <= 1e-5 * np.ptp(lut_c, axis=1, keepdims=True), axis=1)
    assert same.mean() >= 0.9, same.mean()
    ws, sw = _scaled(w, xbar, cfg)  # near-ties aside, both optimal: the same SSE
    np.testing.assert_allclose(_sse64(ws, sw, lut_x), _sse64(ws, sw, lut_c), rtol=1e-4)
