"""GPTQ (Frantar et al., 2022): codes chosen column by column with inverse-Hessian error
feedback, against fixed per-row tables and group scales (docs/design.md s.4, "GPTQ").

Every format of this package dequantizes as `lut[row, code] * scale[row, group] + zero[row,
group]`, so one routine serves them all: the tables, scales and zeros come from the
round-to-nearest quantization (`quantize_weight`: the integer grid, nf4/fp4's table, or any4's
per-row k-means table learned first), and GPTQ only re-chooses the codes. Column j's value is
rounded to the nearest table entry in its group's scaled domain; its error, divided by the
j-th diagonal of the upper Cholesky factor U of H^-1, is pushed onto the columns not yet
quantized through U's j-th row. Columns go in blocks of `block` (updates inside a block one
column at a time, to the rest once per block: "lazy batch"); with `act_order` in order of
decreasing H diagonal, each column keeping its own group's scale and zero (static groups).

H = 2 X^T X / n over the calibration inputs X [n, K] of the layer; columns never seen
(H_jj = 0, "dead") are set to zero weight and quantized as such; `percdamp` times the mean
diagonal is added to the diagonal before the inversion.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.quant.qweight import QuantizedWeight, pack_codes


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """percdamp: dampening, this fraction of the mean H diagonal added to the diagonal.
    block: columns per lazy-batch block. act_order: columns in order of decreasing H_jj."""

    percdamp: float = 0.01
    block: int = 128
    act_order: bool = False

    def __post_init__(self):
        if not isinstance(self.percdamp, int | float) or not 0 <= self.percdamp < 1:
            raise ValueError(f"GPTQConfig: percdamp={self.percdamp!r} must be in [0, 1) (e.g. "
                             "0.01)")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"GPTQConfig: block={self.block!r} must be a positive integer")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQConfig: act_order={self.act_order!r} must be True or False")


def inverse_hessian_factor(h, *, percdamp: float = 0.01):
    """h: [K, K] -> (U [K, K] upper with U^T U = (H + damp I)^-1, dead [K] bool)."""
    h = jnp.asarray(h, jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    damp = percdamp * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(h.shape[0], dtype=h.dtype)
    low = jnp.linalg.cholesky(h)  # H = L L^T
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    linv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
    hinv = linv.T @ linv  # H^-1
    u = jnp.linalg.cholesky(hinv).T  # upper, U^T U = H^-1
    return u, dead


def nearest_code(v, lut):
    """v: [N] scaled values, lut: [N, 16] -> [N] int32, the nearest entry (ties: lowest code)."""
    return jnp.argmin(jnp.abs(v[:, None] - lut), axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("block", "n_levels"))
def _gptq(w, u, lut, scales, zeros, group_of, *, block: int, n_levels: int):
    """w: [N, Kp] (columns in processing order, padded to whole blocks), u: [Kp, Kp], lut:
    [N, 16], scales/zeros: [N, G], group_of: [Kp] -> codes [N, Kp] int32."""
    n, kp = w.shape
    lut = jnp.where(jnp.arange(16) < n_levels, lut.astype(jnp.float32), jnp.inf)
    scales, zeros = scales.astype(jnp.float32), zeros.astype(jnp.float32)
    cols = jnp.arange(kp)

    def one_block(b, carry):
        w, codes = carry
        start = b * block
        wb = jax.lax.dynamic_slice_in_dim(w, start, block, axis=1)
        ub = jax.lax.dynamic_slice_in_dim(u, start, block, axis=0)  # [block, Kp]
        ubb = jax.lax.dynamic_slice_in_dim(ub, start, block, axis=1)  # [block, block]

        def one_col(j, c):
            wb, err, cb = c
            col = start + j
            s = scales[:, group_of[col]]
            z = zeros[:, group_of[col]]
            x = wb[:, j]
            code = nearest_code((x - z) / s, lut)
            q = jnp.take_along_axis(lut, code[:, None], axis=1)[:, 0] * s + z
            e = (x - q) / ubb[j, j]
            wb = wb - e[:, None] * jnp.where(jnp.arange(block) > j, ubb[j], 0.0)[None, :]
            return wb, err.at[:, j].set(e), cb.at[:, j].set(code)

        err0 = jnp.zeros((n, block), jnp.float32)
        cb0 = jnp.zeros((n, block), jnp.int32)
        _, err, cb = jax.lax.fori_loop(0, block, one_col, (wb, err0, cb0))
        # the block's errors onto every later column at once (lazy batch)
        later = jnp.where(cols[None, :] >= start + block, ub, 0.0)
        w = w - err @ later
        return w, jax.lax.dynamic_update_slice_in_dim(codes, cb, start, axis=1)

    codes = jnp.zeros((n, kp), jnp.int32)
    _, codes = jax.lax.fori_loop(0, kp // block, one_block, (w, codes))
    return codes


def gptq_quantize(w, h, rtn: QuantizedWeight, config: GPTQConfig | None = None
                  ) -> QuantizedWeight:
    """w: [N, K] the float weight, h: [K, K] its input Hessian (2 X^T X / n), rtn: its
    round-to-nearest quantization (tables, scales and zeros are kept) -> the same weight with
    GPTQ's codes."""
    config = config or GPTQConfig()
    percdamp, block, act_order = config.percdamp, config.block, config.act_order
    w = jnp.asarray(w, jnp.float32)
    n, k = w.shape
    if rtn.shape != (n, k):
        raise ValueError(f"gptq_quantize: the RTN weight is {rtn.shape}, the weight {(n, k)}")
    if tuple(np.shape(h)) != (k, k):
        raise ValueError(f"gptq_quantize: the Hessian is {tuple(np.shape(h))}, expected "
                         f"{(k, k)} for K={k}")
    h = jnp.asarray(h, jnp.float32)
    order = (jnp.argsort(-jnp.diagonal(h), stable=True) if act_order
             else jnp.arange(k))
    h = h[order][:, order]
    u, dead = inverse_hessian_factor(h, percdamp=percdamp)
    w = jnp.where(dead[None, :], 0.0, w[:, order])
    kp = -(-k // block) * block
    pad = kp - k
    # padded columns: zero weight, identity rows of U, so they push no error anywhere
    w = jnp.pad(w, ((0, 0), (0, pad)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros((k,)), jnp.ones((pad,))]))
    group_of = jnp.pad(order // rtn.group_size, (0, pad))
    codes = _gptq(w, u, rtn.lut, rtn.scales, rtn.zeros, group_of, block=block,
                  n_levels=2 ** rtn.n_bit)[:, :k]
    codes = jnp.zeros_like(codes).at[:, order].set(codes)  # back to the original order
    return QuantizedWeight.from_meta(rtn.meta, codes=pack_codes(codes), lut=rtn.lut,
                                     scales=rtn.scales, zeros=rtn.zeros)
