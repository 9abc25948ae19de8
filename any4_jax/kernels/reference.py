"""The pure-jnp LUT matmul: the specification every kernel is tested against, and the
fallback on any platform.

y[..., n] = sum_k x[..., k] * w[n, k], with w = qweight.dequantize(x.dtype) (table lookup,
then one multiply-add per group) and float32 accumulation; y in x's dtype. It takes an LO-BCQ
`BCQWeight` the same way (its `dequantize` is exact in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from any4_jax.quant.bcq import BCQWeight
from any4_jax.quant.qweight import QuantizedWeight


def lut_matmul_reference(x: jax.Array, qweight: QuantizedWeight | BCQWeight) -> jax.Array:
    """x: [..., K] -> [..., N]."""
    w = qweight.dequantize(x.dtype)  # [N, K], dequantized in float32, rounded to x's dtype
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32,
                   precision=precision)
    return y.astype(x.dtype)
