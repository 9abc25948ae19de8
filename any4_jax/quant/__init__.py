"""Quantization core: formats, group scaling, weighted k-means, matrix -> QuantizedWeight."""

from any4_jax.quant.config import KMeansConfig, QuantConfig
from any4_jax.quant.formats import FORMAT_NAMES, parse_format
from any4_jax.quant.quantize import quantize_weight, row_mesh
from any4_jax.quant.qweight import QuantizedWeight, pack_codes, unpack_codes

__all__ = [
    "FORMAT_NAMES",
    "KMeansConfig",
    "QuantConfig",
    "QuantizedWeight",
    "pack_codes",
    "parse_format",
    "quantize_weight",
    "row_mesh",
    "unpack_codes",
]
