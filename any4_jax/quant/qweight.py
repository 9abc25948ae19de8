"""`QuantizedWeight`: the contract between the quantizers and the kernels (docs/design.md s.3).

Invariant, for a weight of shape `[N, K]` with groups of `g` along K:
  codes  [..., N, K // 2]  uint8        element 2j in the low nibble, 2j+1 in the high one
  lut    [..., N, 16]      table dtype  per-row table, already shifted (one FMA dequantizes)
  scales [..., N, K // g]  table dtype  per-group multiplier
  zeros  [..., N, K // g]  table dtype  per-group offset
  w[n, k] = lut[n, code[n, k]] * scales[n, k // g] + zeros[n, k // g]
Leading `...` dims appear only when layers are stacked (e.g. for `vmap` over layers); the
static metadata always describes one `[N, K]` matrix.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.quant.formats import int_grid_table


def check_group_size(k: int, g: int, *, name: str = "weight") -> None:
    """The one rule of group sizes: g divides K, and K is even (two codes per byte). A
    ValueError that names the fix."""
    if k % 2:
        raise ValueError(f"{name}: in_features K={k} must be even (two 4-bit codes per byte)")
    if k % g:
        divisors = [d for d in (32, 64, 128, 192, 256, 512, 1024) if k % d == 0]
        raise ValueError(
            f"{name}: in_features {k=} is not divisible by group_size={g}; choose a group "
            f"size that divides {k} (e.g. {divisors or [k]}) or group_size=None for whole rows")


def pack_codes(codes: jax.Array) -> jax.Array:
    """codes: [..., K] integers in [0, 15] -> [..., K // 2] uint8, element 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_codes: the last dim {codes.shape[-1]} must be even")
    c = codes.astype(jnp.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """packed: [..., K // 2] uint8 -> [..., K] uint8 codes (inverse of `pack_codes`)."""
    lo = packed & jnp.uint8(0x0F)
    hi = packed >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@dataclasses.dataclass(frozen=True, eq=False)
class _MetaFields:
    """The static fields of a quantized [N, K] weight, declared once for `WeightMeta` and
    `QuantizedWeight`. dtype: what `dequantize()` returns by default (the original weight's)."""

    format: str
    n_bit: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]
    dtype: str

    def int_grid_offset(self) -> int | None:
        """For asymmetric int-n the table is exactly `code - 2^(n-1)`, so kernels can skip the
        lookup; None for every table that has to be read."""
        if self.format.startswith("int") and not self.symmetric:
            return 2 ** (self.n_bit - 1)
        return None


@dataclasses.dataclass(frozen=True)
class WeightMeta(_MetaFields):
    """The static description of one quantized weight alone (hashable, compares by value):
    what a QuantizedWeight's pytree aux data holds, and what a prepared layout
    (`kernels.CudaWeight`) or a layer (`QuantDense`) keeps of it instead of copies."""


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight(_MetaFields):
    """A quantized `[N, K]` weight; a pytree whose array leaves are codes, lut, scales, zeros.

    Metadata (static, pytree aux data): format, n_bit, group_size, symmetric, shape = (N, K),
    dtype (the dtype `dequantize()` returns by default: the original weight's).
    """

    codes: jax.Array
    lut: jax.Array
    scales: jax.Array
    zeros: jax.Array

    _DATA = ("codes", "lut", "scales", "zeros")
    _META = tuple(f.name for f in dataclasses.fields(_MetaFields))

    def check(self) -> QuantizedWeight:
        """Raises a ValueError naming the field whose shape or dtype breaks the invariant."""
        n, k = self.shape
        g = self.group_size
        check_group_size(k, g, name="QuantizedWeight")
        lead = tuple(self.codes.shape[:-2])
        want = {
            "codes": (lead + (n, k // 2), {jnp.dtype(jnp.uint8)}),
            "lut": (lead + (n, 16), None),
            "scales": (lead + (n, k // g), None),
            "zeros": (lead + (n, k // g), None),
        }
        for name, (shape, dtypes) in want.items():
            arr = getattr(self, name)
            if tuple(arr.shape) != shape:
                raise ValueError(
                    f"QuantizedWeight.{name} has shape {tuple(arr.shape)}, expected {shape} for "
                    f"a [{n}, {k}] weight with group_size={g}"
                )
            if dtypes is not None and jnp.dtype(arr.dtype) not in dtypes:
                raise ValueError(f"QuantizedWeight.{name} has dtype {arr.dtype}, expected uint8")
        if not (self.lut.dtype == self.scales.dtype == self.zeros.dtype):
            raise ValueError(
                "QuantizedWeight: lut, scales and zeros must share one dtype, got "
                f"{self.lut.dtype}, {self.scales.dtype}, {self.zeros.dtype}"
            )
        return self

    @property
    def meta(self) -> WeightMeta:
        return WeightMeta(*(getattr(self, f) for f in self._META))

    @classmethod
    def from_meta(cls, meta: WeightMeta, *, codes, lut, scales, zeros) -> QuantizedWeight:
        return cls(codes=codes, lut=lut, scales=scales, zeros=zeros,
                   **dataclasses.asdict(meta))

    @property
    def num_groups(self) -> int:
        return self.shape[1] // self.group_size

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense weight `[..., N, K]`, computed in float32 and cast to `dtype`."""
        dtype = jnp.dtype(dtype or self.dtype)
        return _dequantize(self.codes, self.lut, self.scales, self.zeros, g=self.group_size,
                           dtype=dtype)

    def nbytes(self) -> int:
        return sum(int(np.prod(getattr(self, f).shape)) * getattr(self, f).dtype.itemsize
                   for f in self._DATA)

    def bits_per_weight(self) -> float:
        n, k = self.shape
        lead = int(np.prod(self.codes.shape[:-2]))
        return 8.0 * self.nbytes() / (lead * n * k)

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(format={self.format!r}, shape={self.shape}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, dtype={self.dtype}, "
            f"codes={getattr(self.codes, 'shape', None)})"
        )


@functools.partial(jax.jit, static_argnames=("g", "dtype"))
def _dequantize(codes, lut, scales, zeros, *, g: int, dtype):
    # One compiled function for eager and traced callers alike, so that both round the same
    # way (XLA contracts the multiply-add into an FMA).
    q = unpack_codes(codes).astype(jnp.int32)  # [..., N, K]
    vals = jnp.take_along_axis(lut.astype(jnp.float32), q, axis=-1)  # [..., N, K]
    *lead, n, k = vals.shape
    vals = vals.reshape(*lead, n, k // g, g)  # [..., N, G, g]
    w = vals * scales.astype(jnp.float32)[..., None] + zeros.astype(jnp.float32)[..., None]
    return w.reshape(*lead, n, k).astype(dtype)


def _flatten_with_keys(qw: QuantizedWeight):
    children = tuple((jax.tree_util.GetAttrKey(f), getattr(qw, f)) for f in QuantizedWeight._DATA)
    aux = tuple(getattr(qw, f) for f in QuantizedWeight._META)
    return children, aux


def _unflatten(aux, children) -> QuantizedWeight:
    # Transformations rebuild the node with tracers or placeholders as leaves: no checks here.
    qw = object.__new__(QuantizedWeight)
    for f, v in zip(QuantizedWeight._DATA, children, strict=True):
        object.__setattr__(qw, f, v)
    for f, v in zip(QuantizedWeight._META, aux, strict=True):
        object.__setattr__(qw, f, v)
    return qw


jax.tree_util.register_pytree_with_keys(
    QuantizedWeight,
    _flatten_with_keys,
    _unflatten,
    flatten_func=lambda qw: (tuple(getattr(qw, f) for f in QuantizedWeight._DATA),
                             tuple(getattr(qw, f) for f in QuantizedWeight._META)),
)


def random_qweight(key, n: int, k: int, *, fmt: str = "any4", group_size: int = 128,
                   dtype=jnp.bfloat16) -> QuantizedWeight:
    """A QuantizedWeight of random contents (no k-means), made on the default device: uniform
    codes, sorted normal tables ("any4") or the integer grid ("int4"), scales in
    [0.002, 0.012) and zeros ~ 0.001 N(0, 1) varying per group. For kernel tests and benchmarks
    on large shapes, where quantizing a real matrix would cost more than what is measured."""
    check_group_size(k, group_size, name="random_qweight")
    k1, k2, k3, k4 = jax.random.split(key, 4)
    codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    if fmt == "any4":
        lut = jnp.sort(jax.random.normal(k2, (n, 16), jnp.float32), axis=-1)
    elif fmt == "int4":
        lut = jnp.broadcast_to(jnp.asarray(int_grid_table(4), jnp.float32), (n, 16))
    else:
        raise ValueError(f"random_qweight: fmt={fmt!r}; builds 'any4' or 'int4' weights")
    scales = 0.002 + 0.01 * jax.random.uniform(k3, (n, k // group_size), jnp.float32)
    zeros = 0.001 * jax.random.normal(k4, (n, k // group_size), jnp.float32)
    return QuantizedWeight(codes=codes, lut=lut.astype(dtype), scales=scales.astype(dtype),
                           zeros=zeros.astype(dtype), format=fmt, n_bit=4,
                           group_size=group_size, symmetric=False, shape=(n, k),
                           dtype=jnp.dtype(dtype).name).check()
