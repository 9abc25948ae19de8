"""Group scaling (docs/design.md s.4), all in float32 on the unquantized weight.

Each function takes w: [R, K] and the group size g and returns per-group (scale, zero) of
shape [R, K // g] plus the scaled values [R, K] that the codes are chosen from.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def exact_div(x, d: float):
    """x / d, correctly rounded. XLA rewrites division by a constant into a multiply by its
    rounded reciprocal (off by an ulp); the barrier hides the constant so exact grids stay
    exact (15 * alpha / 15 == alpha)."""
    return x / lax.optimization_barrier(jnp.full_like(x, d))


def _groups(w, g):
    r, k = w.shape
    return w.astype(jnp.float32).reshape(r, k // g, g)  # [R, G, g]


# Floors that keep alpha > 0 (a constant group has mx - mn = 0; XLA:CPU flushes subnormals to
# zero, so alpha must stay a normal float32). The relative floor is a sixteenth of float32's
# epsilon times the group's max|w|: any group holding two distinct values has a range of at least
# 2^-25 max|w|, so the floor only ever applies to a constant group, whose scale it makes small
# enough (2^(n-1) alpha below half an ulp of its value) that zero = mn and every code
# dequantizes to mn exactly. It scales with the weights, so w * 1e-15 and w * 1e20 quantize like
# w; a fixed floor (it was 1e-6) swamped the range of small weights. The absolute floor,
# 2^-122, only matters below ~1e-29, where the weights are about to flush to zero anyway.
REL_FLOOR = 2.0**-27
ABS_FLOOR = 2.0**-122


def asymmetric(w, g: int, n_bit: int):
    """alpha = max(mx - mn, 2^-27 max|w|, 2^-122) / (2^n - 1); zero = mn + alpha 2^(n-1);
    ws = (w - mn) / alpha.

    ws lies in [0, 2^n - 1]; dequant of level c is (c - 2^(n-1)) * alpha + zero = c alpha + mn.
    An all-zero group gets scale 0 and zero 0: it dequantizes to 0 exactly whatever its codes,
    and its elements weigh nothing in k-means (see `_any_sample_weights`).
    """
    wg = _groups(w, g)
    mn, mx = wg.min(-1), wg.max(-1)  # [R, G]
    mag = jnp.maximum(jnp.abs(mn), jnp.abs(mx))  # [R, G] max|w|
    floor = jnp.maximum(mag * REL_FLOOR, ABS_FLOOR)
    alpha = exact_div(jnp.maximum(mx - mn, floor), 2**n_bit - 1)
    zero = mn + alpha * 2 ** (n_bit - 1)
    ws = (wg - mn[..., None]) / alpha[..., None]
    nonzero = mag > 0
    return (jnp.where(nonzero, alpha, 0.0), jnp.where(nonzero, zero, 0.0),
            ws.reshape(w.shape))


def symmetric(w, g: int, n_bit: int):
    """alpha = max(max|w|, 2^-122) / (2^(n-1) - 1); zero = 0; ws = w / alpha.

    An all-zero group gets scale 0 (it dequantizes to 0 exactly whatever its code)."""
    wg = _groups(w, g)
    mag = jnp.abs(wg).max(-1)  # [R, G]
    alpha = exact_div(jnp.maximum(mag, ABS_FLOOR), 2 ** (n_bit - 1) - 1)
    ws = wg / alpha[..., None]
    return jnp.where(mag > 0, alpha, 0.0), jnp.zeros_like(alpha), ws.reshape(w.shape)


def pow2(e):
    """2.0 ** e in float32, exactly, for integers e in [-126, 127] (built from its bits; XLA's
    exp2 need not be exact)."""
    return lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, jnp.float32)


def absmax(w, g: int):
    """bitsandbytes' blockwise rule: absmax = max|w|; y = clip(w * (1 / absmax), -1, 1)."""
    wg = _groups(w, g)
    am = jnp.abs(wg).max(-1)  # [R, G]
    # w * (1 / absmax) is formed as (w 2^-e) * (1 / m), with absmax = m 2^e and m in [0.5, 1):
    # the same product bit for bit (powers of two scale exactly), but without 1 / absmax,
    # which for absmax beyond 2^126 is a subnormal that XLA flushes to zero. 2^-e is applied
    # in two halves, each a normal float32.
    m, e = jnp.frexp(am)
    half = e // 2
    wn = wg * pow2(-half)[..., None] * pow2(half - e)[..., None]  # |wn| <= m < 1
    # bitsandbytes clamps absmax at 1e-38, a subnormal that XLA flushes to zero: an all-zero
    # block would give 0 * inf = NaN. Its values all map to 0 either way.
    inv = jnp.where(am > 0, 1.0 / jnp.where(am > 0, m, 1.0), 0.0)
    y = jnp.clip(wn * inv[..., None], -1.0, 1.0)
    return am, jnp.zeros_like(am), y.reshape(w.shape)


def expand_groups(per_group, g: int):
    """[R, G] -> [R, G * g], each group value repeated over its g elements."""
    return jnp.repeat(per_group, g, axis=1)
