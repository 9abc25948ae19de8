"""`BCQDense`: the layer that holds an LO-BCQ `BCQWeight` (docs/bcq.md).

A `QuantDense` in every way a model, a checkpoint or a report sees (one canonical layout,
`QuantState` arrays, `checkpoint_meta` / `placeholder`, an optional activation quantizer for
simulated W4A4); its arrays are the BCQ ones and its matmul runs on the reference.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.kernels.api import lut_matmul
from any4_jax.nn.qdense import QuantDense, QuantState, act_quant_from_meta
from any4_jax.quant.act_quant import ActQuantConfig, fake_quantize
from any4_jax.quant.bcq import BCQMeta, BCQWeight


class BCQDense(QuantDense):
    """y = x @ dequantize(bcq_weight).T (+ bias), float32 accumulation, y in x's dtype."""

    def __init__(self, qweight: BCQWeight, bias=None, *, implementation: str | None = None,
                 act_quant: ActQuantConfig | None = None):
        qweight.check()
        self.act_quant = act_quant
        self.meta: BCQMeta = qweight.meta
        self.table_dtype = "int8"
        self._store(qweight)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.implementation = implementation

    def _store(self, w: BCQWeight) -> None:
        for f in BCQWeight._DATA:
            setattr(self, f, QuantState(getattr(w, f)))
        self.layout = "canonical"

    @property
    def weight(self) -> BCQWeight:
        return BCQWeight(**{f: getattr(self, f)[...] for f in BCQWeight._DATA}, meta=self.meta)

    qweight = weight

    def prepare(self, implementation: str | None) -> None:
        """One layout: nothing to convert."""

    def __call__(self, x, *, out_dtype=None):
        if out_dtype is not None and jnp.dtype(out_dtype) != x.dtype:
            x = x.astype(jnp.promote_types(x.dtype, out_dtype))
        if self.act_quant is not None:
            x = fake_quantize(x, self.act_quant)
        y = lut_matmul(x, self.weight, implementation="xla")
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y if out_dtype is None else y.astype(out_dtype)

    def checkpoint_meta(self) -> dict:
        m = self.meta
        return {"format": "bcq", "block_len": m.block_len, "array_len": m.array_len,
                "n_codebooks": m.n_codebooks, "codebook_bits": m.codebook_bits,
                "shape": list(m.shape), "dtype": m.dtype, "bias": self.bias is not None,
                **self._act_meta()}

    @classmethod
    def placeholder(cls, meta: dict) -> BCQDense:
        n, k = (int(v) for v in meta["shape"])
        m = BCQMeta(block_len=int(meta["block_len"]), array_len=int(meta["array_len"]),
                    n_codebooks=int(meta["n_codebooks"]),
                    codebook_bits=int(meta["codebook_bits"]), shape=(n, k), dtype=meta["dtype"])
        u8 = jnp.uint8
        qw = BCQWeight(codes=jnp.zeros((n, k // 2), u8),
                       selectors=jnp.zeros((n, k // m.block_len // 2), u8),
                       codebooks=jnp.zeros((m.n_codebooks, 16), jnp.int8),
                       scales=jnp.zeros((n, k // m.array_len), u8),
                       tensor_scale=jnp.zeros((), jnp.float32), meta=m)
        bias = np.zeros((n,), jnp.dtype(meta["dtype"])) if meta.get("bias") else None
        return cls(qw, bias, act_quant=act_quant_from_meta(meta))
