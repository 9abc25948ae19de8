"""Quantization numerics: formats, group scaling, batched weighted k-means, and
`quantize_weight`: one [N, K] matrix -> `QuantizedWeight` (the contract with the kernels), or
an LO-BCQ `BCQWeight`; activation fake-quantization (`ActQuantConfig`).
No flax, no kernels, no models."""

from any4_jax.quant.act_quant import ActQuantConfig
from any4_jax.quant.bcq import BCQWeight
from any4_jax.quant.bcq_codebooks import BCQCodebooks
from any4_jax.quant.bcq_fit import BCQFitConfig
from any4_jax.quant.config import DEFAULT_GROUP_SIZE, KMeansConfig, QuantConfig
from any4_jax.quant.formats import FORMAT_NAMES, parse_format
from any4_jax.quant.quantize import quantize_weight, row_mesh
from any4_jax.quant.qweight import QuantizedWeight, WeightMeta, pack_codes, unpack_codes

__all__ = [
    "ActQuantConfig",
    "BCQCodebooks",
    "BCQFitConfig",
    "BCQWeight",
    "DEFAULT_GROUP_SIZE",
    "FORMAT_NAMES",
    "KMeansConfig",
    "QuantConfig",
    "QuantizedWeight",
    "WeightMeta",
    "pack_codes",
    "parse_format",
    "quantize_weight",
    "row_mesh",
    "unpack_codes",
]
