"""Weighted 1-D k-means on every row of a matrix at once (docs/design.md s.4, "Weighted k-means").

Each row's values are sorted once. With sorted values and sorted centroids, every Lloyd
cluster is a contiguous run of the sorted row whose ends are found by binary search of the
midpoints between centroids, and its weighted sum is a difference of two prefix sums. A Lloyd
iteration then costs O(k log K) per row instead of O(k K), so running to convergence
(max_iter 300) is cheap; the sort and the k-means++ seeding dominate.

Rows never interact: a converged row is frozen while others iterate, and each row draws its
random numbers from fold_in(seed, global row index). A row's result is therefore the same
whatever rows share its chunk or device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from any4_jax.quant.config import KMeansConfig
from any4_jax.quant.formats import NF4_TABLE
from any4_jax.quant.scaling import pow2


def _searchsorted_rows(sorted_rows: jax.Array, queries: jax.Array, side: str) -> jax.Array:
    """sorted_rows: [R, K], queries: [R, Q] -> [R, Q] int32 insertion points per row."""
    return jax.vmap(lambda a, v: jnp.searchsorted(a, v, side=side, method="scan"))(
        sorted_rows, queries
    ).astype(jnp.int32)


def _row_keys(seed: int, row_ids: jax.Array) -> jax.Array:
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids)


_BLOCK = 64  # rows are padded to a multiple of this for the blocked scans below


def _blocked_cumsum(v):
    """Inclusive cumsum along axis 1 of [R, K] (K % 64 == 0) as 64-wide triangular matmuls plus
    a short scan of block totals: ~5x faster on CPU than XLA's log-depth scan, which dominated
    the k-means time."""
    r_, n = v.shape
    vb = v.reshape(r_, n // _BLOCK, _BLOCK)  # [R, nb, B]
    tri = jnp.triu(jnp.ones((_BLOCK, _BLOCK), v.dtype))
    inner = jnp.einsum("rnb,bc->rnc", vb, tri, precision=lax.Precision.HIGHEST)  # [R, nb, B]
    offset = jnp.cumsum(inner[:, :, -1], axis=1) - inner[:, :, -1]  # [R, nb] exclusive
    return (inner + offset[:, :, None]).reshape(r_, n)


def _range_sums(prefix, b):
    """prefix [R, K+1], bounds b [R, c+1] -> per-run sums [R, c]."""
    return jnp.take_along_axis(prefix, b[:, 1:], 1) - jnp.take_along_axis(prefix, b[:, :-1], 1)


def _cell_potentials(xs, c, center, pw, pwx, pwx2):
    """Weighted squared distance of each Voronoi cell to its centroid, from prefix sums.

    c: [R, k] sorted centroids (duplicates allowed). Returns (bounds [R, k+1], pot [R, k]).
    With d = c - center: sum w (x - c)^2 = S(w (x-center)^2) - 2 d S(w (x-center)) + d^2 S(w).
    """
    b = _cluster_bounds(xs, c)
    d = c - center
    pot = _range_sums(pwx2, b) - 2.0 * d * _range_sums(pwx, b) + d * d * _range_sums(pw, b)
    return b, jnp.maximum(pot, 0.0)


def _draw_d2(key, trials, xs, c, center, pw, pwx, pwx2):
    """`trials` indices per row drawn with probability proportional to w * D(x)^2, where D is
    the distance to the nearest of the centroids c [R, k] (sorted), without touching the K
    values: pick a cell by its potential, then binary-search the cell's cumulative potential
    (a quadratic form of the prefix sums) for the drawn mass."""
    r_, n = xs.shape
    b, pot = _cell_potentials(xs, c, center, pw, pwx, pwx2)
    cum = jnp.cumsum(pot, axis=1)  # [R, k]
    u = jax.vmap(lambda kk: jax.random.uniform(kk, (trials,)))(key) * cum[:, -1:]  # [R, T]
    cell = jnp.minimum(_searchsorted_rows(cum, u, "right"), c.shape[1] - 1)  # [R, T]
    lo = jnp.take_along_axis(b[:, :-1], cell, 1)
    hi = jnp.take_along_axis(b[:, 1:], cell, 1)
    d = jnp.take_along_axis(c, cell, 1) - center  # [R, T]
    rem = u - (jnp.take_along_axis(cum, cell, 1) - jnp.take_along_axis(pot, cell, 1))

    def a_at(i):  # cumulative potential of the cell's centroid over x[0:i]
        g = lambda p: jnp.take_along_axis(p, i, 1)  # noqa: E731
        return g(pwx2) - 2.0 * d * g(pwx) + d * d * g(pw)

    base = a_at(lo)

    def step(_, lh):  # smallest p in [lo, hi) with a_at(p + 1) - base > rem
        lo_, hi_ = lh
        mid = (lo_ + hi_) // 2
        go_right = a_at(mid + 1) - base <= rem
        return jnp.where(go_right, mid + 1, lo_), jnp.where(go_right, hi_, mid)

    steps = max(1, math.ceil(math.log2(n + 1)))
    p, _ = lax.fori_loop(0, steps, step, (lo, jnp.maximum(hi - 1, lo)))
    return jnp.clip(p, 0, n - 1)


def _kmeans_pp(xs, ws, keys, k: int, center, pw, pwx, pwx2):
    """Weighted greedy k-means++ (scikit-learn's rule) on sorted rows, from prefix sums.

    xs, ws: [R, K] sorted values and their weights; keys: [R] PRNG keys; center [R, 1] and the
    prefix sums of w, w (x - center), w (x - center)^2 ([R, K+1]). Each candidate's potential
    and each D^2 draw cost O(k log K) instead of a pass over the row, which made seeding the
    most expensive step on CPU. Returns [R, k] centroids.
    """
    r_, n = xs.shape
    trials = 2 + int(math.log(k))
    keys = jax.vmap(lambda kk: jax.random.split(kk, k))(keys)  # [R, k, 2]
    u = jax.vmap(lambda kk: jax.random.uniform(kk, (1,)))(keys[:, 0]) * pw[:, -1:]
    first = jnp.minimum(_searchsorted_rows(pw[:, 1:], u, "right"), n - 1)  # [R, 1]
    # Unused slots hold copies of the first centroid: a duplicate changes no potential.
    c = jnp.broadcast_to(jnp.take_along_axis(xs, first, 1), (r_, k))

    def step(i, c):
        idx = _draw_d2(keys[:, i], trials, xs, jnp.sort(c, axis=1), center, pw, pwx, pwx2)
        cand = jnp.take_along_axis(xs, idx, 1)  # [R, T]
        pots = jnp.stack([
            jnp.sum(_cell_potentials(xs, jnp.sort(c.at[:, i].set(cand[:, t]), axis=1), center,
                                     pw, pwx, pwx2)[1], axis=1)
            for t in range(trials)], axis=1)  # [R, T]
        best = jnp.take_along_axis(cand, jnp.argmin(pots, axis=1)[:, None], 1)[:, 0]
        return c.at[:, i].set(best)

    return lax.fori_loop(1, k, step, c)


def _random_init(xs, ws, keys, k: int):
    def one(key, x, w):
        idx = jax.random.choice(key, x.shape[0], (k,), replace=False, p=w / jnp.sum(w))
        return x[idx]

    return jax.vmap(one)(keys, xs, ws)


def grid_init(r: int, k: int, lo: float, hi: float, kind: str) -> jax.Array:
    """The `int` (uniform) or `nf4` grid spanning [lo, hi], for r rows -> [r, k]."""
    if kind == "int":
        # lo + i * step: exact integers when the step is 1 (the int-n grid itself).
        step = (hi - lo) / (k - 1)
        return jnp.broadcast_to(lo + jnp.arange(k, dtype=jnp.float32) * step, (r, k))
    if k != 16:
        raise ValueError(f"KMeansConfig(init='nf4') needs 16 levels (any4), got k={k}; "
                         "use init='int' or 'kmeans++' for any3/any2")
    grid = (jnp.asarray(NF4_TABLE) + 1.0) / 2.0
    return jnp.broadcast_to(lo + grid * (hi - lo), (r, k))


def _cluster_bounds(xs, centroids):
    """Sorted values [R, K] and sorted centroids [R, k] -> run boundaries [R, k + 1]."""
    r_, n = xs.shape
    mids = (centroids[:, :-1] + centroids[:, 1:]) * 0.5  # [R, k-1]
    inner = _searchsorted_rows(xs, mids, "right")  # values <= mid stay in the lower cluster
    zero = jnp.zeros((r_, 1), jnp.int32)
    return jnp.concatenate([zero, inner, jnp.full((r_, 1), n, jnp.int32)], axis=1)


def pow2_normalize_rows(x):
    """x [R, C] >= 0 -> x times a power of two per row that brings the row's max into [0.5, 1)
    (below 4 for maxima beyond 2^126; a row of zeros is unchanged). The product is exact, so
    every ratio of weights, which is all that weighted k-means depends on, stays as it was, bit
    for bit; the weights' absolute size (xbar * alpha follows the weights' scale) then cannot
    overflow the prefix sums or flush to zero."""
    _, e = jnp.frexp(jnp.max(x, axis=1, keepdims=True))  # max = m 2^e, m in [0.5, 1)
    e = jnp.clip(e, -125, 126)
    return x * pow2(-e)


def sort_rows(x, w):
    """Sorts each row of x ascending, carrying w along: [R, K] x2 -> (xs, ws)."""
    return lax.sort((x, w), dimension=1, num_keys=1)


def kmeans_rows(xs, ws, row_ids, *, k: int, config: KMeansConfig, grid=None):
    """Weighted Lloyd's k-means on each row.

    xs: [R, K] float32 values, each row sorted ascending (see `sort_rows`);
    ws: [R, K] float32 non-negative sample weights, permuted with xs;
    row_ids: [R] int32 global row indices (for per-row random streams);
    grid: (lo, hi) of the scaled range for the `int` / `nf4` inits.
    Returns (centroids [R, k] sorted ascending, iterations [R] int32 used per row).
    """
    r_, n = xs.shape
    xs = xs.astype(jnp.float32)
    ws = pow2_normalize_rows(ws.astype(jnp.float32))
    # A row with no positive weight has no sampling distribution: weigh its values equally.
    ws = jnp.where(jnp.sum(ws, axis=1, keepdims=True) > 0, ws, 1.0)
    limit = config.tol * jnp.var(xs, axis=1)  # [R]
    pad = -n % _BLOCK
    if pad:  # zero-weight copies of the row's largest value change no sum and no boundary
        xs = jnp.concatenate([xs, jnp.broadcast_to(xs[:, -1:], (r_, pad))], axis=1)
        ws = jnp.concatenate([ws, jnp.zeros((r_, pad), ws.dtype)], axis=1)
        n += pad
    keys = _row_keys(config.seed, row_ids)

    # Prefix sums of w, w * (x - center) and w * (x - center)^2: centring the values on the
    # middle of the row's range keeps the running sums small, so differences of them (cluster
    # sums) lose little to cancellation in float32.
    center = 0.5 * (xs[:, :1] + xs[:, -1:])  # [R, 1]
    zero = jnp.zeros((r_, 1), jnp.float32)
    xc = xs - center
    pw = jnp.concatenate([zero, _blocked_cumsum(ws)], axis=1)  # [R, K+1]
    pwx = jnp.concatenate([zero, _blocked_cumsum(ws * xc)], axis=1)  # [R, K+1]

    if config.init == "kmeans++":
        pwx2 = jnp.concatenate([zero, _blocked_cumsum(ws * xc * xc)], axis=1)
        c = _kmeans_pp(xs, ws, keys, k, center, pw, pwx, pwx2)
    elif config.init == "random":
        c = _random_init(xs, ws, keys, k)
    else:
        lo, hi = grid if grid is not None else (0.0, float(k - 1))
        c = grid_init(r_, k, lo, hi, config.init)
    c = jnp.sort(c, axis=1)

    def body(state):
        it, c, done, iters = state
        b = _cluster_bounds(xs, c)
        sw = jnp.take_along_axis(pw, b[:, 1:], 1) - jnp.take_along_axis(pw, b[:, :-1], 1)
        swx = jnp.take_along_axis(pwx, b[:, 1:], 1) - jnp.take_along_axis(pwx, b[:, :-1], 1)
        # An empty (or zero-weight) cluster keeps its centroid.
        new = jnp.where(sw > 0, center + swx / jnp.where(sw > 0, sw, 1.0), c)
        new = jnp.sort(new, axis=1)  # guards against rounding in the prefix differences
        shift = jnp.max((new - c) ** 2, axis=1)
        new = jnp.where(done[:, None], c, new)
        iters = iters + (~done).astype(jnp.int32)
        done = done | (shift <= limit)
        return it + 1, new, done, iters

    def cond(state):
        it, _, done, _ = state
        return (it < config.max_iter) & ~jnp.all(done)

    init_state = (jnp.int32(0), c, jnp.zeros((r_,), bool), jnp.zeros((r_,), jnp.int32))
    _, c, _, iters = lax.while_loop(cond, body, init_state)

    return c, iters


def assign_sorted_codes(x, centroids):
    """Nearest-centroid index for every value: x [R, K], sorted centroids [R, k] -> [R, K].

    Ties (a value exactly on a midpoint) go to the lower centroid.
    """
    mids = (centroids[:, :-1] + centroids[:, 1:]) * 0.5  # [R, k-1]
    q = jnp.zeros(x.shape, jnp.int32)
    for j in range(centroids.shape[1] - 1):
        q = q + (x > mids[:, j : j + 1]).astype(jnp.int32)
    return q


def weighted_sse(x, w, centroids):
    """Per-row sum of w * (x - nearest centroid)^2: x, w [R, K], centroids [R, k] -> [R]."""
    q = assign_sorted_codes(x, centroids)
    return jnp.sum(w * (x - jnp.take_along_axis(centroids, q, axis=1)) ** 2, axis=1)
