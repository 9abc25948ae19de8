"""LO-BCQ's storage format: block-clustered codebooks (docs/design.md s.7, docs/bcq.md).

A weight `[N, K]` is cut along K into blocks of `Lb` scalars and block arrays of `La`
scalars (La a multiple of 2 Lb). Every block picks one of `Nc` shared codebooks of 16 signed
integer entries (`b`-bit, |entry| <= qmax = 2^(b-1) - 1), and every array has one 8-bit scale:

  codes        [N, K // 2]        uint8    4-bit entry index, element 2j in the low nibble
  selectors    [N, K // Lb // 2]  uint8    4-bit codebook index per block, block 2j low
  codebooks    [Nc, 16]           int8     sorted ascending
  scales       [N, K // La]       uint8    the bits of a float8 e4m3 number e
  tensor_scale []                 float32  a power of two, one per tensor
  w[n, k] = codebooks[sel[n, k // Lb], code[n, k]] * e[n, k // La] * tensor_scale

The array scale is amax(array) / qmax rounded to e4m3 after dividing by the tensor's power of
two (chosen so the largest array scale lands in e4m3's top binade, (224, 448]); every product
above is exact in float32, so a tensor already on the grid keeps its scales (what makes the
activation fake-quantizer idempotent). Bits per scalar: 4 + log2(Nc) / Lb + 8 / La, plus the
codebooks (Nc * 16 * b bits) and 32 bits per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.quant.qweight import pack_codes, unpack_codes
from any4_jax.quant.scaling import exact_div, pow2

E4M3_MAX = 448.0


def qmax_of(codebook_bits: int) -> int:
    """The largest codebook magnitude of a b-bit signed entry (31 for 6 bits)."""
    return 2 ** (codebook_bits - 1) - 1


def bits_per_scalar(*, block_len: int, array_len: int, n_codebooks: int,
                    codebook_bits: int = 6, shape: tuple[int, int] | None = None) -> float:
    """LO-BCQ's bits per scalar: 4 + log2(Nc) / Lb + 8 / La; with `shape`, plus the codebooks
    and the tensor scale spread over its N * K scalars."""
    bits = 4 + math.log2(n_codebooks) / block_len + 8 / array_len
    if shape is not None:
        bits += (n_codebooks * 16 * codebook_bits + 32) / (shape[0] * shape[1])
    return bits


def check_bcq_shape(k: int, block_len: int, array_len: int, *, name: str = "weight") -> None:
    """K must hold whole arrays, and an array an even number of blocks (selectors are packed two
    per byte). A ValueError that names the fix."""
    if array_len % (2 * block_len):
        raise ValueError(f"{name}: array_len={array_len} must be a multiple of 2 * block_len = "
                         f"{2 * block_len} (whole blocks per array, two selectors per byte)")
    if k % array_len:
        ok = [a for a in (16, 32, 64, 128) if k % a == 0 and a % (2 * block_len) == 0]
        raise ValueError(f"{name}: in_features K={k} is not divisible by array_len="
                         f"{array_len}; choose an array length that divides it (e.g. {ok})")


def array_scales(x, array_len: int, qmax: int, *, per_row: bool = False):
    """x: [R, K] -> (e4m3 array scales [R, K // La] as float32, second-level power of two:
    [] for the tensor, or [R, 1] per row with per_row).

    The effective scale of an array is `e * ts`; an array whose scale falls below e4m3's
    smallest subnormal (2^-9 of ts, i.e. amax below ~2^-18 of the largest array's) gets 0."""
    r, k = x.shape
    xa = jnp.abs(x.astype(jnp.float32)).reshape(r, k // array_len, array_len)
    raw = exact_div(xa.max(-1), float(qmax))  # [R, A]
    top = raw.max(axis=-1, keepdims=True) if per_row else raw.max()
    m, ex = jnp.frexp(exact_div(top, E4M3_MAX))  # top / 448 = m 2^ex, m in [0.5, 1)
    ex = jnp.where(m == 0.5, ex - 1, ex)  # ts = 2^ceil(log2(top / 448)): top / ts in (224, 448]
    ts = pow2(jnp.clip(jnp.where(top > 0, ex, 0), -126, 127))
    e = jnp.minimum(raw / ts, E4M3_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return e, ts


def normalize(x, e, ts, array_len: int):
    """x [R, K] divided by its array scales (0 where the scale is 0): values in about
    [-qmax, qmax] (e4m3 rounding may overshoot qmax by 1/16)."""
    r, k = x.shape
    s = (e * ts).reshape(r, k // array_len, 1)
    xa = x.astype(jnp.float32).reshape(r, k // array_len, array_len)
    # a divisor XLA cannot see is a broadcast: it would multiply by a rounded reciprocal
    # instead, and a value on the grid (c * s) would no longer divide back to c exactly
    d = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(s > 0, s, 1.0), xa.shape))
    return jnp.where(s > 0, xa / d, 0.0).reshape(r, k)


def e4m3_bits(e) -> jax.Array:
    return jax.lax.bitcast_convert_type(e.astype(jnp.float8_e4m3fn), jnp.uint8)


def e4m3_value(bits) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class BCQMeta:
    """The static description of one LO-BCQ weight (hashable, compares by value)."""

    block_len: int
    array_len: int
    n_codebooks: int
    codebook_bits: int
    shape: tuple[int, int]
    dtype: str
    format: str = "bcq"

    # what layers and reports read off any quantized weight's metadata
    n_bit = property(lambda self: 4)
    group_size = property(lambda self: self.array_len)
    symmetric = property(lambda self: True)


@dataclasses.dataclass(frozen=True, eq=False)
class BCQWeight:
    """An LO-BCQ weight (the module docstring has the invariant); a pytree whose array leaves
    are codes, selectors, codebooks, scales, tensor_scale and whose aux data is `meta`."""

    codes: jax.Array
    selectors: jax.Array
    codebooks: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array
    meta: BCQMeta

    _DATA = ("codes", "selectors", "codebooks", "scales", "tensor_scale")

    format = property(lambda self: "bcq")
    shape = property(lambda self: self.meta.shape)
    dtype = property(lambda self: self.meta.dtype)
    group_size = property(lambda self: self.meta.array_len)

    def check(self) -> BCQWeight:
        """Raises a ValueError naming the field whose shape or dtype breaks the invariant."""
        m = self.meta
        n, k = m.shape
        check_bcq_shape(k, m.block_len, m.array_len, name="BCQWeight")
        want = {"codes": ((n, k // 2), jnp.uint8),
                "selectors": ((n, k // m.block_len // 2), jnp.uint8),
                "codebooks": ((m.n_codebooks, 16), jnp.int8),
                "scales": ((n, k // m.array_len), jnp.uint8),
                "tensor_scale": ((), jnp.float32)}
        for name, (shape, dt) in want.items():
            a = getattr(self, name)
            if tuple(a.shape) != shape or jnp.dtype(a.dtype) != jnp.dtype(dt):
                raise ValueError(f"BCQWeight.{name} is {jnp.dtype(a.dtype).name}{list(a.shape)}, "
                                 f"expected {jnp.dtype(dt).name}{list(shape)} for a [{n}, {k}] "
                                 f"weight with {m}")
        return self

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense weight [N, K], computed in float32 (exactly) and cast to `dtype`."""
        return _dequantize(self.codes, self.selectors, self.codebooks, self.scales,
                           self.tensor_scale, meta=self.meta,
                           dtype=jnp.dtype(dtype or self.meta.dtype))

    def nbytes(self) -> int:
        return sum(int(np.prod(getattr(self, f).shape)) * jnp.dtype(getattr(self, f).dtype)
                   .itemsize for f in self._DATA)

    def bits_per_weight(self) -> float:
        """The format's bits per scalar (log2(Nc) bits per selector; selectors are stored as
        nibbles, so Nc < 16 uses `nbytes()` = 4 bits per selector in memory)."""
        m = self.meta
        return bits_per_scalar(block_len=m.block_len, array_len=m.array_len,
                               n_codebooks=m.n_codebooks, codebook_bits=m.codebook_bits,
                               shape=m.shape)

    def __repr__(self) -> str:
        m = self.meta
        return (f"BCQWeight(shape={m.shape}, block_len={m.block_len}, array_len={m.array_len}, "
                f"n_codebooks={m.n_codebooks}, codebook_bits={m.codebook_bits}, dtype={m.dtype})")


def encode(codes, selectors, codebooks, e, ts, meta: BCQMeta) -> BCQWeight:
    """Packs unpacked parts: codes [N, K] and selectors [N, K // Lb] in [0, 16), codebooks
    [Nc, 16] integer-valued floats, e [N, K // La] e4m3 values, ts [] -> a checked BCQWeight."""
    return BCQWeight(codes=pack_codes(codes), selectors=pack_codes(selectors),
                     codebooks=jnp.asarray(codebooks).astype(jnp.int8), scales=e4m3_bits(e),
                     tensor_scale=jnp.asarray(ts, jnp.float32).reshape(()), meta=meta).check()


@functools.partial(jax.jit, static_argnames=("meta", "dtype"))
def _dequantize(codes, selectors, codebooks, scales, tensor_scale, *, meta: BCQMeta, dtype):
    n, k = meta.shape
    q = unpack_codes(codes).astype(jnp.int32).reshape(n, k // meta.block_len, meta.block_len)
    sel = unpack_codes(selectors).astype(jnp.int32)  # [N, K // Lb]
    flat = codebooks.astype(jnp.float32).reshape(-1)  # [Nc * 16]
    vals = flat[sel[..., None] * 16 + q].reshape(n, k // meta.array_len, meta.array_len)
    s = e4m3_value(scales) * tensor_scale  # [N, A]
    return (vals * s[..., None]).reshape(n, k).astype(dtype)


jax.tree_util.register_dataclass(BCQWeight, data_fields=list(BCQWeight._DATA),
                                 meta_fields=["meta"])
