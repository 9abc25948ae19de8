"""any4-jax: learned 4-bit weight quantization (any4) for LLMs in JAX/Flax.

Nothing heavy runs at import; compiled kernel libraries load on first use.
"""

from any4_jax.quant import (
    FORMAT_NAMES,
    KMeansConfig,
    QuantConfig,
    QuantizedWeight,
    pack_codes,
    quantize_weight,
    row_mesh,
    unpack_codes,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_NAMES",
    "KMeansConfig",
    "QuantConfig",
    "QuantizedWeight",
    "pack_codes",
    "quantize_weight",
    "row_mesh",
    "unpack_codes",
]
