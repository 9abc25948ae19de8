"""The CUDA kernel's weight layout (`ffi_kernels/lut_gemm.cuh`), prepared once per weight.

Codes go into tensor-core A-fragment order: for each 16-row tile of N and 32-wide chunk of K,
lane L (g = L // 4, t = L % 4) holds two uint32 (k-steps 0 and 1 of the chunk), nibble i of
which is the code of
    row = 16 * tile + g + 8 * ((i >> 1) & 1),
    col = 32 * chunk + 16 * step + 2 * t + (i & 1) + 8 * (i >> 2).
Scales and zeros go tile-major, [N/16, K/g, 16] (a tile's 16 rows side by side per group), so
the two rows a lane reads share one 32-byte sector with the other lanes' rows.
Tables, scales and zeros keep the canonical dtype when it is bfloat16 or float16 (the kernel
widens them exactly on load; half the bytes of float32) and are float32 otherwise.
`CudaWeight.canonical()` goes
back (bit-exact), so a prepared model still saves, analyses and runs on other paths.
`emulate` replays the kernel's data flow in numpy from the prepared arrays, so the layout is
tested on machines without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.kernels.limits import multiple_reasons
from any4_jax.quant.qweight import QuantizedWeight, WeightMeta, pack_codes, unpack_codes

TILE_N, CHUNK_K = 16, 32


def _fragment_index():
    """rows, cols [32 lanes, 2 steps, 8 nibbles] within a 16 x 32 tile."""
    lane = np.arange(32)[:, None, None]
    step = np.arange(2)[None, :, None]
    i = np.arange(8)[None, None, :]
    g, t = lane // 4, lane % 4
    rows = g + 8 * ((i >> 1) & 1) + 0 * step
    cols = 16 * step + 2 * t + (i & 1) + 8 * (i >> 2)
    return rows, cols


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CudaWeight:
    """A QuantizedWeight in the CUDA kernel's layout (a pytree; metadata static)."""

    codes: jax.Array  # [N/16, K/32, 32, 2] uint32
    lut: jax.Array  # [N, 16] bfloat16, float16 or float32 (one dtype for the three)
    scales: jax.Array  # [N/16, K/g, 16]: tile-major (`tile_groups`)
    zeros: jax.Array  # [N/16, K/g, 16]
    meta: WeightMeta = dataclasses.field(metadata=dict(static=True))  # the canonical weight's
    table_dtype: str = dataclasses.field(metadata=dict(static=True))  # the canonical lut's

    @property
    def shape(self) -> tuple[int, int]:
        return self.meta.shape

    @property
    def group_size(self) -> int:
        return self.meta.group_size

    @property
    def int_offset(self) -> int:
        """The integer grid's offset (the kernel skips the table), or -1: read the table."""
        offset = self.meta.int_grid_offset()
        return -1 if offset is None else offset

    def canonical(self) -> QuantizedWeight:
        """The canonical QuantizedWeight this was prepared from (bit-exact; jit-able)."""
        n, k = self.shape
        tdt = jnp.dtype(self.table_dtype)
        return QuantizedWeight.from_meta(
            self.meta, codes=_unprepare_codes_jnp(self.codes, n=n, k=k),
            lut=self.lut.astype(tdt), scales=untile_groups(self.scales).astype(tdt),
            zeros=untile_groups(self.zeros).astype(tdt))

    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize
                   for a in (self.codes, self.lut, self.scales, self.zeros))


def tile_groups(a):
    """[N, G] -> [N/16, G, 16] (row-within-tile last); numpy or jax arrays."""
    n, groups = a.shape
    return a.reshape(n // TILE_N, TILE_N, groups).transpose(0, 2, 1)


def untile_groups(a):
    """[N/16, G, 16] -> [N, G] (inverse of `tile_groups`)."""
    nt, groups, _ = a.shape
    return a.transpose(0, 2, 1).reshape(nt * TILE_N, groups)


def layout_reasons(n: int, k: int, g: int) -> list[str]:
    """Why the layout cannot hold an [N, K] weight with groups of g: tiles of 16 rows and
    chunks of 32 along K, each inside one group."""
    return multiple_reasons(n=n, k=k, g=g, n_multiple=TILE_N, k_multiple=CHUNK_K,
                            g_multiple=CHUNK_K)


# The fragment order is a pure permutation of index bits: lane = 4g + t and nibble
# i = 4 i2 + 2 i1 + i0 sit at row = 8 i1 + g, col = 16 step + 8 i2 + 2t + i0 of the tile, so
# both directions are a reshape and a transpose (no gather or scatter over the codes).
_TILE_AXES = (0, 3, 2, 6, 4, 5, 1, 7)  # [nt, i1, g, kc, step, i2, t, i0] -> fragment order
_FRAG_AXES = (0, 6, 2, 1, 4, 5, 3, 7)  # [nt, kc, g, t, step, i2, i1, i0] -> tile order


@functools.partial(jax.jit, static_argnames=("n", "k"))
def _prepare_codes(packed, *, n, k):
    codes = unpack_codes(packed).astype(jnp.uint32)  # [N, K]
    bits = codes.reshape(n // TILE_N, 2, 8, k // CHUNK_K, 2, 2, 4, 2)
    frag = bits.transpose(_TILE_AXES).reshape(n // TILE_N, k // CHUNK_K, 32, 2, 8)
    shifts = (4 * jnp.arange(8, dtype=jnp.uint32))
    return jnp.sum(frag << shifts, axis=-1, dtype=jnp.uint32)  # [nt, kc, 32, 2]


@functools.partial(jax.jit, static_argnames=("n", "k"))
def _unprepare_codes_jnp(codes, *, n, k):
    """[N/16, K/32, 32, 2] uint32 -> packed [N, K/2] uint8 (inverse of `_prepare_codes`)."""
    nib = (codes[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 0xF  # [nt,kc,32,2,8]
    bits = nib.astype(jnp.uint8).reshape(n // TILE_N, k // CHUNK_K, 8, 4, 2, 2, 2, 2)
    return pack_codes(bits.transpose(_FRAG_AXES).reshape(n, k))


def prepare_cuda(qw: QuantizedWeight) -> CudaWeight:
    """Converts a canonical QuantizedWeight ([N, K] codes etc.) into the kernel's layout."""
    n, k = qw.shape
    reasons = layout_reasons(n, k, qw.group_size)
    if reasons:
        raise ValueError("prepare_cuda: " + "; ".join(reasons))
    if qw.codes.ndim != 2:
        raise ValueError("prepare_cuda: one [N, K] weight at a time (vmap over a stack)")
    tdt = jnp.dtype(qw.lut.dtype)
    if tdt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        tdt = jnp.dtype(jnp.float32)
    return CudaWeight(codes=_prepare_codes(qw.codes, n=n, k=k),
                      lut=qw.lut.astype(tdt), scales=tile_groups(qw.scales.astype(tdt)),
                      zeros=tile_groups(qw.zeros.astype(tdt)), meta=qw.meta,
                      table_dtype=str(jnp.dtype(qw.lut.dtype)))


def unprepare_codes(codes: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of the code layout: [N/16, K/32, 32, 2] uint32 -> [N, K] codes (uint8)."""
    codes = np.asarray(codes)
    nib = (codes[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF  # [nt, kc, 32, 2, 8]
    rows, cols = _fragment_index()
    out = np.zeros((n // TILE_N, TILE_N, k // CHUNK_K, CHUNK_K), np.uint8)
    out[:, rows, :, cols] = np.moveaxis(nib, (0, 1), (3, 4))
    return out.reshape(n, k)


def emulate(x: np.ndarray, cw: CudaWeight, *, post_scale: bool = False) -> np.ndarray:
    """What the kernel computes, replayed from the prepared arrays (float32 result [M, N]):
    decode each lane's nibbles by the fragment formula, look up / offset, then
    - post_scale False (the "scaled" kernel): apply the group's scale and zero with one
      multiply-add, round to x's dtype, accumulate in float64;
    - post_scale True (the unit kernels): the raw table values (exact in x's dtype there)
      times x summed per group, then `s * sum(v x) + z * sum(x)` per group: the weight is
      never rounded (float64 sums; the kernel's are float32, by the MMA)."""
    n, k = cw.shape
    codes = unprepare_codes(cw.codes, n, k).astype(np.int64)
    if cw.int_offset >= 0:
        vals = codes.astype(np.float32) - np.float32(cw.int_offset)
    else:
        vals = np.take_along_axis(np.asarray(cw.lut, np.float32), codes, axis=1)
    g = cw.group_size
    xf = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    if post_scale:
        s = untile_groups(np.asarray(cw.scales, np.float64))  # [N, G]
        z = untile_groups(np.asarray(cw.zeros, np.float64))
        xg = xf.reshape(xf.shape[0], k // g, g)  # [M, G, g]
        pv = np.einsum("mgj,ngj->mng", xg, vals.astype(np.float64).reshape(n, k // g, g))
        p1 = xg.sum(axis=2)[:, None, :]  # [M, 1, G]
        return (pv * s[None] + p1 * z[None]).sum(axis=2).astype(np.float32)
    s = np.repeat(untile_groups(np.asarray(cw.scales, np.float32)), g, axis=1)
    z = np.repeat(untile_groups(np.asarray(cw.zeros, np.float32)), g, axis=1)
    w = (vals.astype(np.float64) * s + z).astype(np.float32)  # fmaf: one rounding
    w = np.asarray(jnp.asarray(w).astype(x.dtype).astype(jnp.float32), np.float64)
    return (xf @ w.T).astype(np.float32)
