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


def asymmetric(w, g: int, n_bit: int):
    """alpha = max(mx - mn, 1e-6) / (2^n - 1); zero = mn + alpha 2^(n-1); ws = (w - mn) / alpha.

    ws lies in [0, 2^n - 1]; dequant of level c is (c - 2^(n-1)) * alpha + zero = c alpha + mn.
    """
    wg = _groups(w, g)
    mn, mx = wg.min(-1), wg.max(-1)  # [R, G]
    alpha = exact_div(jnp.maximum(mx - mn, 1e-6), 2**n_bit - 1)
    zero = mn + alpha * 2 ** (n_bit - 1)
    ws = (wg - mn[..., None]) / alpha[..., None]
    return alpha, zero, ws.reshape(w.shape)


def symmetric(w, g: int, n_bit: int):
    """alpha = max(max|w|, 1e-6) / (2^(n-1) - 1); zero = 0; ws = w / alpha."""
    wg = _groups(w, g)
    alpha = exact_div(jnp.maximum(jnp.abs(wg).max(-1), 1e-6), 2 ** (n_bit - 1) - 1)  # [R, G]
    ws = wg / alpha[..., None]
    return alpha, jnp.zeros_like(alpha), ws.reshape(w.shape)


def absmax(w, g: int):
    """bitsandbytes' blockwise rule: absmax = max|w|; y = clip(w * (1 / absmax), -1, 1)."""
    wg = _groups(w, g)
    am = jnp.abs(wg).max(-1)  # [R, G]
    # bitsandbytes clamps absmax at 1e-38, a subnormal that XLA flushes to zero: an all-zero
    # block would give 0 * inf = NaN. Its values all map to 0 either way.
    inv = jnp.where(am > 0, 1.0 / jnp.where(am > 0, am, 1.0), 0.0)
    y = jnp.clip(wg * inv[..., None], -1.0, 1.0)
    return am, jnp.zeros_like(am), y.reshape(w.shape)


def expand_groups(per_group, g: int):
    """[R, G] -> [R, G * g], each group value repeated over its g elements."""
    return jnp.repeat(per_group, g, axis=1)
