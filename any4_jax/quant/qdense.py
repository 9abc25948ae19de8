"""`QuantDense`: the NNX layer that holds a `QuantizedWeight` and calls `lut_matmul`.

It takes the place of a model's Dense layer (`x [..., K] -> [..., N]`) with no change to the
model code. The four arrays are `QuantState` variables (not `Param`s: they are not trained),
the format metadata static attributes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.kernels.api import lut_matmul
from any4_jax.quant.qweight import QuantizedWeight


class QuantState(nnx.Variable):
    """An array of a quantized weight (codes, lut, scales or zeros)."""


class QuantDense(nnx.Module):
    """y = lut_matmul(x, qweight) (+ bias): float32 accumulation, y in x's dtype."""

    def __init__(self, qweight: QuantizedWeight, bias=None, *, implementation: str | None = None):
        qweight.check()
        self.out_features, self.in_features = qweight.shape
        self.codes = QuantState(qweight.codes)
        self.lut = QuantState(qweight.lut)
        self.scales = QuantState(qweight.scales)
        self.zeros = QuantState(qweight.zeros)
        self.format, self.n_bit = qweight.format, qweight.n_bit
        self.group_size, self.symmetric = qweight.group_size, qweight.symmetric
        self.weight_dtype = qweight.dtype
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.implementation = implementation

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            codes=self.codes[...], lut=self.lut[...], scales=self.scales[...],
            zeros=self.zeros[...], format=self.format, n_bit=self.n_bit,
            group_size=self.group_size, symmetric=self.symmetric,
            shape=(self.out_features, self.in_features), dtype=self.weight_dtype)

    def __call__(self, x, *, out_dtype=None):
        """out_dtype: None = x's dtype; float32 for logits (x is promoted first)."""
        if out_dtype is not None and jnp.dtype(out_dtype) != x.dtype:
            x = x.astype(jnp.promote_types(x.dtype, out_dtype))
        y = lut_matmul(x, self.qweight, implementation=self.implementation)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y if out_dtype is None else y.astype(out_dtype)

    def meta(self) -> dict:
        """What `placeholder` needs to rebuild this layer's shapes (for checkpoint restore)."""
        return {"format": self.format, "n_bit": self.n_bit, "group_size": self.group_size,
                "symmetric": self.symmetric, "shape": [self.out_features, self.in_features],
                "dtype": self.weight_dtype, "table_dtype": str(self.lut.get_value().dtype),
                "bias": self.bias is not None}

    @classmethod
    def placeholder(cls, meta: dict) -> QuantDense:
        """A layer of the right shapes and dtypes filled with zeros (restore target)."""
        n, k = meta["shape"]
        g = meta["group_size"]
        tdt = jnp.dtype(meta["table_dtype"])
        qw = QuantizedWeight(
            codes=jnp.zeros((n, k // 2), jnp.uint8), lut=jnp.zeros((n, 16), tdt),
            scales=jnp.zeros((n, k // g), tdt), zeros=jnp.zeros((n, k // g), tdt),
            format=meta["format"], n_bit=int(meta["n_bit"]), group_size=int(g),
            symmetric=bool(meta["symmetric"]), shape=(int(n), int(k)), dtype=meta["dtype"])
        return cls(qw, np.zeros((n,), tdt) if meta.get("bias") else None)
