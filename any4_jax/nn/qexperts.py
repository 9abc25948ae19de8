"""`QuantExpertDense`: stacked expert projections held as one quantized [E*N, K] weight.

It takes the place of a model's `ExpertDense` (kernel [E, K, N]) as `QuantDense` takes a
Dense's: experts are just more rows (expert e owns rows e*N .. (e+1)*N), quantized in one call
and stored as one `QuantizedWeight`. Called on the expert-grouped tiles of
`models.llama.moe` (`layer(x, routing)`), each tile multiplies by its expert's rows only,
through `lut_matmul`: a decode step reads the selected experts' codes and no others.
"""

from __future__ import annotations

import dataclasses

from jax import lax

from any4_jax.kernels.api import can_use, lut_matmul
from any4_jax.models.llama.moe import Routing, map_tiles
from any4_jax.nn.qdense import QuantDense
from any4_jax.quant.act_quant import fake_quantize
from any4_jax.quant.qweight import QuantizedWeight


class QuantExpertDense(QuantDense):
    """E experts' [N, K] projections as one quantized [E*N, K] weight; canonical layout only
    (`prepare_model` leaves it so: each call slices one expert's rows)."""

    def __init__(self, qweight: QuantizedWeight, num_experts: int, *,
                 implementation: str | None = None, act_quant=None):
        n = qweight.shape[0]
        if num_experts < 1 or n % num_experts:
            raise ValueError(f"QuantExpertDense: {n} rows cannot be split into "
                             f"num_experts={num_experts} experts of equal size")
        super().__init__(qweight, implementation=implementation, act_quant=act_quant)
        self.num_experts = num_experts
        self.expert_meta = dataclasses.replace(self.meta, shape=(n // num_experts,
                                                                 self.meta.shape[1]))

    # per expert, as ExpertDense reads: out_features is one expert's
    out_features = property(lambda self: self.expert_meta.shape[0])

    def prepare(self, implementation: str | None) -> None:
        """Stays canonical: the CUDA layout's tiles are not sliced per expert."""

    def expert(self, e) -> QuantizedWeight:
        """Expert `e`'s [N, K] weight (e may be traced): a slice of rows of every array."""
        n = self.out_features
        rows = lambda a: lax.dynamic_slice_in_dim(a[...], e * n, n, axis=0)
        return QuantizedWeight.from_meta(self.expert_meta, codes=rows(self.codes),
                                         lut=rows(self.lut), scales=rows(self.scales),
                                         zeros=rows(self.zeros))

    def __call__(self, x, routing: Routing):
        """x: [tiles, B, K] -> [tiles, B, N], tile t through expert routing.tile_expert[t]."""
        impl = self.implementation
        if self.act_quant is not None:  # per token row: the same wherever it is routed
            x = fake_quantize(x, self.act_quant)

        def one(e, xt):
            w = self.expert(e)
            use = impl if impl is not None and not can_use(impl, xt, w) else None
            return lut_matmul(xt, w, implementation=use)

        return map_tiles(one, x, routing, self.out_features, x.dtype)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "num_experts": self.num_experts}

    @classmethod
    def placeholder(cls, meta: dict) -> QuantExpertDense:
        base = QuantDense.placeholder({**meta, "bias": False, "num_experts": 0})
        return cls(base.qweight, int(meta["num_experts"]), act_quant=base.act_quant)
