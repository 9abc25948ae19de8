"""Globally optimal weighted 1-D k-means per row, in XLA (docs/design.md s.4; issue 22).

On a sorted row the best partition into at most k clusters is made of contiguous runs, and
the dynamic program of Wang & Song (Ckmeans.1d.dp) finds it exactly:

    D[1][i] = cost(0, i)
    D[m][i] = min_{0 <= j <= i} D[m-1][j] + cost(j, i)        (j = i: an empty cluster)

where cost(j, i) = S2 - S1^2 / S0 is the weighted SSE of x[j:i] from prefix sums of w, w x and
w x^2. The smallest optimal split opt[m][i] is non-decreasing in i (the cost is Monge), so a
layer is solved by divide and conquer over i. Here the recursion runs level by level with fixed
shapes: with the row padded to N = 2^L values, level l settles the 2^l midpoints
t * s + s / 2 (s = N / 2^l) from the splits already known at the multiples of s, O[t]. The
search range of midpoint t is [O[t], min(O[t+1], mid_t)]; these ranges tile [0, N] and overlap
only at their ends, so every candidate j is evaluated once, for its owner segment (the last t
with O[t] <= j), followed by a segmented argmin, and each segment's right end O[t+1] is
evaluated once more for t itself. The owner of j at the next level is 2 t + (opt_t <= j), a
gather, so no level sorts or searches. A layer costs L (N + 1) + N evaluations; k layers and a
backtrack of the stored splits ([k, N + 1] int32 per row) give the clusters.

Numerics (float32 only; x64 is never enabled): the values are centred on the middle of the
row's range and the weights scaled by a power of two (exact). The prefix sums are double-float
(hi + lo, error-free transformations) and cost(j, i) is evaluated as

    m = S1 / S0 (float32);  cost = (S2 - m S1) - m (S1 - m S0) - (S1 - m S0)^2 / S0

with both products m S1 and m S0 exact (Dekker's two-product), so the large, nearly equal
terms S2 and m S1 cancel without losing the cluster's own SSE to rounding. The DP values D
are float32 (relative error ~1e-7 of the row's SSE). The returned cost is recomputed directly,
sum w (x - centroid)^2 over the clusters, with the caller's weights.

Ties and degenerate rows (the rules the compiled CPU version follows too):
  * Ties between splits go to the smallest j (the leftmost argmin), in every layer.
  * A row whose weights are all zero is solved with all weights one (as `kmeans_rows` does);
    its cost is reported for those unit weights.
  * A row with d <= k distinct values among its positive-weight entries (including K < k, a
    constant row) gets those d values, ascending, followed by k - d copies of the largest; its
    cost is exactly 0.
  * Otherwise every cluster of the optimum is non-empty in exact arithmetic; should rounding
    leave one without weight, it takes the mean of the nearest non-empty cluster above it (or,
    if none, below it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from any4_jax.quant.kmeans import pow2_normalize_rows

_ROW_CHUNK = 64  # rows solved at once: bounds the [chunk, k, N + 1] table of stored splits
_SPLIT = 4097.0  # 2^12 + 1: Dekker's splitter for float32's 24-bit significand


# ---- double-float arithmetic (error-free transformations; XLA does not reassociate floats) --

def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _dd_add(a, b):
    """(hi, lo) + (hi, lo), renormalised."""
    s, e = _two_sum(a[0], b[0])
    e = e + (a[1] + b[1])
    hi = s + e
    return hi, e - (hi - s)


def _dd_sub(ah, al, bh, bl):
    """(ah + al) - (bh + bl) as an unnormalised (hi, lo) pair."""
    s, e = _two_sum(ah, -bh)
    return s, e + (al - bl)


def _split(a):
    c = _SPLIT * a
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a, a_split, b):
    """a * b exactly as (p, e), for float32 a, b; a_split = _split(a)."""
    p = a * b
    ah, al = a_split
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _prefix_dd(v):
    """[B, n] -> exclusive double-float prefix sums (hi, lo), each [B, n + 1]."""
    hi, lo = lax.associative_scan(_dd_add, (v, jnp.zeros_like(v)), axis=1)
    zero = jnp.zeros_like(v[:, :1])
    return jnp.concatenate([zero, hi], axis=1), jnp.concatenate([zero, lo], axis=1)


# ---- the cost of one cluster ----------------------------------------------------------------

def _cost(pi, pj):
    """Weighted SSE of the run x[j:i] from the prefix sums at i and at j (tuples of six arrays
    (S0 hi, S0 lo, S1 hi, S1 lo, S2 hi, S2 lo), broadcastable). 0 for a run without weight."""
    s0h, s0l = _dd_sub(pi[0], pi[1], pj[0], pj[1])
    s1h, s1l = _dd_sub(pi[2], pi[3], pj[2], pj[3])
    s2h, s2l = _dd_sub(pi[4], pi[5], pj[4], pj[5])
    s0 = s0h + s0l
    pos = s0 > 0
    m = s1h / jnp.where(pos, s0, 1.0)
    m_split = _split(m)
    p, pe = _two_prod(m, m_split, s1h)  # m S1, exactly (up to m s1l's rounding)
    ah, al = _two_sum(s2h, -p)
    a = ah + (al + (s2l - (pe + m * s1l)))  # S2 - m S1
    q, qe = _two_prod(m, m_split, s0h)  # m S0
    th, tl = _two_sum(s1h, -q)
    t = th + (tl + (s1l - (qe + m * s0l)))  # S1 - m S0: the rounding of m, times S0
    c = a - m * t - t * t / jnp.where(pos, s0, 1.0)
    return jnp.where(pos, jnp.maximum(c, 0.0), 0.0)


# ---- one row --------------------------------------------------------------------------------

def _solve_row(pre, k: int):
    """pre: six [N + 1] prefix arrays of one row (N = 2^L) -> cluster bounds [k + 1] int32."""
    n = pre[0].shape[0] - 1
    levels = n.bit_length() - 1
    pos = jnp.arange(n + 1, dtype=jnp.int32)
    at = lambda idx: tuple(p[idx] for p in pre)  # noqa: E731  prefix sums at positions idx
    first = tuple(p[0] for p in pre)
    d1 = _cost(pre, first)  # D[1][i] = cost(0, i)

    def full_search(d_prev):  # the split for i = N over every j
        v = d_prev + _cost(tuple(p[n] for p in pre), pre)
        o = jnp.argmin(v).astype(jnp.int32)  # first minimum: the smallest j
        return o, v[o]

    def layer(d_prev, _):
        o_n, d_n = full_search(d_prev)
        opt = jnp.stack([jnp.int32(0), o_n])  # splits at positions 0, N
        dv = jnp.stack([jnp.float32(0.0), d_n])
        owner = jnp.zeros(n + 1, jnp.int32)
        for lv in range(levels):
            s, nseg = n >> lv, 1 << lv
            mids = jnp.arange(nseg, dtype=jnp.int32) * s + s // 2  # [nseg]
            p_mid = tuple(p[s // 2::s] for p in pre)  # prefix sums at the midpoints
            # every j, for its owner segment; only j <= min(mid, O[t+1]) may split there
            hi = jnp.minimum(owner * s + s // 2, opt[owner + 1])
            v = d_prev + _cost(tuple(p[owner] for p in p_mid), pre)
            v = jnp.where(pos <= hi, v, jnp.inf)
            seg_min = jax.ops.segment_min(v, owner, nseg, indices_are_sorted=True)
            cand = jnp.where(v == seg_min[owner], pos, n + 1)
            seg_arg = jax.ops.segment_min(cand, owner, nseg, indices_are_sorted=True)
            # each segment's right end, O[t+1] (capped at the midpoint), for the segment itself
            j_end = jnp.minimum(opt[1:], mids)
            v_end = d_prev[j_end] + _cost(p_mid, at(j_end))
            take_end = v_end < seg_min  # strictly: ties keep the smaller j
            o_mid = jnp.where(take_end, j_end, seg_arg)
            d_mid = jnp.where(take_end, v_end, seg_min)
            owner = 2 * owner + (o_mid[owner] <= pos).astype(jnp.int32)
            # interleave the midpoints' answers between the known ones: [2 nseg + 1]
            opt = jnp.concatenate([jnp.stack([opt[:-1], o_mid], 1).reshape(-1), opt[-1:]])
            dv = jnp.concatenate([jnp.stack([dv[:-1], d_mid], 1).reshape(-1), dv[-1:]])
        return dv, opt

    if k == 1:
        return jnp.array([0, n], jnp.int32)
    d_prev, opts = d1, jnp.zeros((0, n + 1), jnp.int32)
    if k > 2:
        d_prev, opts = lax.scan(layer, d1, None, length=k - 2)  # layers 2 .. k-1
    o_last, _ = full_search(d_prev)  # layer k only needs i = N
    bounds = [jnp.int32(n), o_last]
    for m in range(k - 3, -1, -1):  # back through layers k-1 .. 2
        bounds.append(opts[m][bounds[-1]])
    bounds.append(jnp.int32(0))
    return jnp.stack(bounds[::-1])


# ---- rows -----------------------------------------------------------------------------------

def _distinct_values(xs, ws, k: int):
    """Rows with at most k distinct positive-weight values: (flag [R], table [R, k])."""
    xp = jnp.where(ws > 0, xs, -jnp.inf)
    before = lax.cummax(xp, axis=1)
    before = jnp.concatenate([jnp.full_like(xp[:, :1], -jnp.inf), before[:, :-1]], axis=1)
    new = (ws > 0) & (xs > before)  # the first positive-weight copy of each value
    d = jnp.sum(new, axis=1)  # [R]
    rank = jnp.where(new, jnp.cumsum(new, axis=1) - 1, k)
    table = jax.vmap(lambda x, r: jnp.zeros(k, xs.dtype).at[r].set(x, mode="drop"))(xs, rank)
    idx = jnp.minimum(jnp.arange(k), jnp.maximum(d, 1)[:, None] - 1)  # pad with the largest
    return d <= k, jnp.take_along_axis(table, idx, axis=1)


def _fill_empty(c, empty):
    """Empty clusters take the nearest non-empty centroid above, else below. c: [R, k]."""
    k = c.shape[1]
    for m in range(k - 2, -1, -1):  # from the right
        use = empty[:, m] & ~empty[:, m + 1]
        c = c.at[:, m].set(jnp.where(use, c[:, m + 1], c[:, m]))
        empty = empty.at[:, m].set(empty[:, m] & empty[:, m + 1])
    for m in range(1, k):  # what is still empty has nothing above it
        use = empty[:, m]
        c = c.at[:, m].set(jnp.where(use, c[:, m - 1], c[:, m]))
        empty = empty.at[:, m].set(empty[:, m - 1] & empty[:, m])
    return c


def _solve_chunk(xs, ws, w_cost, k: int):
    """xs, ws: [B, K] sorted rows with normalised weights -> (centroids [B, k], cost [B])."""
    b_, k_in = xs.shape
    n = 1 << max(1, math.ceil(math.log2(k_in)))
    pad = n - k_in
    if pad:  # zero-weight copies of the largest value change no cluster's sums
        xs_p = jnp.concatenate([xs, jnp.broadcast_to(xs[:, -1:], (b_, pad))], axis=1)
        ws_p = jnp.concatenate([ws, jnp.zeros((b_, pad), ws.dtype)], axis=1)
    else:
        xs_p, ws_p = xs, ws
    center = 0.5 * (xs[:, :1] + xs[:, -1:])  # [B, 1]
    xc = xs_p - center
    pre = []
    for v in (ws_p, ws_p * xc, ws_p * xc * xc):
        pre.extend(_prefix_dd(v))  # each [B, N + 1]
    bounds = jax.vmap(lambda *p: _solve_row(p, k))(*pre)  # [B, k + 1]

    g = lambda p, b: jnp.take_along_axis(p, b, axis=1)  # noqa: E731
    lo_b, hi_b = bounds[:, :-1], bounds[:, 1:]
    s0 = (g(pre[0], hi_b) - g(pre[0], lo_b)) + (g(pre[1], hi_b) - g(pre[1], lo_b))
    s1 = (g(pre[2], hi_b) - g(pre[2], lo_b)) + (g(pre[3], hi_b) - g(pre[3], lo_b))
    empty = ~(s0 > 0)
    c = center + s1 / jnp.where(empty, 1.0, s0)  # [B, k]
    c = _fill_empty(c, empty)
    c = jnp.sort(c, axis=1)  # means of contiguous runs are ascending; this guards rounding

    # cost, recomputed directly: cluster of each sorted position from the bounds
    cid = jnp.sum(jnp.arange(k_in)[None, :, None] >= bounds[:, None, 1:-1], axis=2)  # [B, K]
    cost = jnp.sum(w_cost * (xs - jnp.take_along_axis(c, cid, axis=1)) ** 2, axis=1)

    few, table = _distinct_values(xs, ws, k)
    c = jnp.where(few[:, None], table, c)
    cost = jnp.where(few, 0.0, cost)
    return c, cost


@functools.partial(jax.jit, static_argnames="k")
def optimal_kmeans_rows(xs: jax.Array, ws: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
    """The globally optimal weighted k-means of each row (see the module docstring).

    xs, ws: [R, K] float32, each row's values sorted ascending with their (>= 0) sample weights
    carried along (see `kmeans.sort_rows`). Returns (centroids [R, k] float32 ascending, cost
    [R] float32): the minimum over all partitions of the row into at most k contiguous clusters
    of sum_i w_i (x_i - c(x_i))^2, the centroids being the clusters' weighted means. Rows never
    interact; they are solved `_ROW_CHUNK` at a time (one compiled body for all chunks).
    """
    if k < 1:
        raise ValueError(f"optimal_kmeans_rows: k={k} must be >= 1")
    if xs.ndim != 2 or xs.shape != ws.shape:
        raise ValueError(f"optimal_kmeans_rows: xs {xs.shape} and ws {ws.shape} must be equal "
                         "[rows, K] shapes")
    xs = xs.astype(jnp.float32)
    w_in = ws.astype(jnp.float32)
    # A row with no positive weight has no distribution to fit: weigh its values equally.
    w_in = jnp.where(jnp.sum(w_in, axis=1, keepdims=True) > 0, w_in, 1.0)
    wn = pow2_normalize_rows(w_in)

    r, n = xs.shape
    chunk = min(_ROW_CHUNK, r)
    pad = -r % chunk  # padded rows are all zeros: cheap, and sliced off below
    tile = lambda v: jnp.pad(v, ((0, pad), (0, 0))).reshape(-1, chunk, n)  # noqa: E731
    c, cost = lax.map(lambda a: _solve_chunk(*a, k), (tile(xs), tile(wn), tile(w_in)))
    return c.reshape(-1, k)[:r], cost.reshape(-1)[:r]
