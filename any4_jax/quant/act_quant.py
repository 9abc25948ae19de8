"""Activation fake-quantization for simulated W4A4 (docs/design.md s.7, docs/bcq.md).

`ActQuantConfig` says how a layer's input `x [..., K]` is rounded before its matmul; it is
static (hashable: the codebooks are a tuple), so a layer keeps it as plain metadata.

- "bcq": each token row cut into arrays of `array_len` (an e4m3 scale each, under a per-row
  power of two) and blocks of `block_len`; every block takes the codebook with the least
  squared error and its scalars their nearest entries: what LO-BCQ evaluates at W4A4. The
  codebooks hold -qmax and qmax (learned with `pin_range`), and each array's largest |x|
  (the first, on ties) is stored as sign * qmax: a quantized array then has the very scale it
  was quantized with, so the fake-quantizer is idempotent (exactly, in float32).
- "int4": per-token groups of `group_size`, asymmetric min/max scaling onto 0..15, round half
  to even: the usual W4A4 baseline.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.quant.bcq import array_scales, normalize, qmax_of
from any4_jax.quant.bcq_fit import block_errors, nearest_index
from any4_jax.quant.scaling import asymmetric

ACT_KINDS = ("bcq", "int4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuantConfig:
    """kind: "bcq" or "int4". bcq: block_len, array_len, codebook_bits and `codebooks`
    ([Nc][16] integers, e.g. `BCQCodebooks.activations`). int4: group_size."""

    kind: str
    group_size: int = 64
    block_len: int = 8
    array_len: int = 64
    codebook_bits: int = 6
    codebooks: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        if self.kind not in ACT_KINDS:
            raise ValueError(f"ActQuantConfig: unknown kind={self.kind!r}; choose one of "
                             f"{ACT_KINDS}")
        if self.kind == "bcq":
            if self.codebooks is None:
                raise ValueError("ActQuantConfig(kind='bcq') needs codebooks: learn them with "
                                 "`any4 bcq-calibrate --activations` (BCQCodebooks.activations)")
            c = np.asarray(self.codebooks, np.float64)
            qmax = qmax_of(self.codebook_bits)
            if c.ndim != 2 or c.shape[1] != 16 or not 1 <= c.shape[0] <= 16 or \
                    np.any(c != np.round(c)) or np.abs(c).max() > qmax:
                raise ValueError(f"ActQuantConfig: codebooks must be [Nc <= 16][16] integers "
                                 f"in [-{qmax}, {qmax}], got an array of shape {c.shape}")
            if np.any(c.min(-1) != -qmax) or np.any(c.max(-1) != qmax):
                raise ValueError(f"ActQuantConfig: every activation codebook must hold -{qmax} "
                                 f"and {qmax} (learn them with pin_range=True, as "
                                 "`any4 bcq-calibrate --activations` does)")
            if self.array_len % self.block_len:
                raise ValueError(f"ActQuantConfig: array_len={self.array_len} must be a "
                                 f"multiple of block_len={self.block_len}")
            object.__setattr__(self, "codebooks", tuple(tuple(float(v) for v in sorted(r))
                                                        for r in c))
        elif not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"ActQuantConfig: group_size={self.group_size!r} must be a "
                             "positive integer")

    @property
    def unit(self) -> int:
        """K must be a multiple of this."""
        return self.array_len if self.kind == "bcq" else self.group_size

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["codebooks"] = None if self.codebooks is None else [list(r) for r in self.codebooks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ActQuantConfig:
        d = dict(d)
        if d.get("codebooks") is not None:
            d["codebooks"] = tuple(tuple(r) for r in d["codebooks"])
        return cls(**d)


def fake_quantize(x, config: ActQuantConfig):
    """x [..., K] -> x rounded as `config` says, in x's dtype (computed in float32)."""
    k = x.shape[-1]
    if k % config.unit:
        raise ValueError(f"activation quantizer {config.kind}: the input's last dim K={k} is not "
                         f"a multiple of {config.unit}; choose a group/array length dividing it")
    return _fake_quantize(x, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _fake_quantize(x, config: ActQuantConfig):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)  # [T, K]
    if config.kind == "int4":
        scale, _, ws = asymmetric(x2, config.group_size, 4)
        q = jnp.clip(jnp.round(ws), 0, 15)  # [T, K]
        g = config.group_size
        mn = x2.reshape(-1, k // g, g).min(-1)  # dequant: c alpha + mn (scaling.asymmetric)
        # an all-zero group has scale 0 and min 0: it stays 0
        y = q.reshape(-1, k // g, g) * scale[..., None] + mn[..., None]
    else:
        e, ts = array_scales(x2, config.array_len, qmax_of(config.codebook_bits), per_row=True)
        xn = normalize(x2, e, ts, config.array_len).reshape(-1, config.block_len)  # [T*K/Lb, Lb]
        c = jnp.asarray(config.codebooks, jnp.float32)
        sel = jnp.argmin(block_errors(xn, jnp.ones_like(xn), c), axis=-1)
        cb = c[sel]  # [T*K/Lb, 16]
        vals = jnp.take_along_axis(cb, nearest_index(xn, cb), axis=-1)
        la, qmax = config.array_len, qmax_of(config.codebook_bits)
        vals = vals.reshape(-1, k // la, la)  # [T, A, La]
        xa = xn.reshape(-1, k // la, la)
        top = jnp.argmax(jnp.abs(xa), axis=-1)[..., None] == jnp.arange(la)  # first largest
        vals = jnp.where(top, jnp.where(xa < 0, -qmax, qmax), vals)
        y = vals * (e * ts).reshape(-1, k // la, 1)
    return y.reshape(*lead, k).astype(x.dtype)
