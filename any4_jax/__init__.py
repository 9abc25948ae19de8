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


def __getattr__(name):
    # The model-level API imports flax/transformers machinery: loaded on first use only.
    if name in ("quantize_params", "model_from_params", "Calibration"):
        from any4_jax import functional

        return getattr(functional, name)
    if name == "load_model":
        from any4_jax.models.load import load_model

        return load_model
    raise AttributeError(f"module 'any4_jax' has no attribute {name!r}")

__all__ = [
    "FORMAT_NAMES",
    "Calibration",
    "KMeansConfig",
    "QuantConfig",
    "load_model",
    "model_from_params",
    "QuantizedWeight",
    "pack_codes",
    "quantize_params",
    "quantize_weight",
    "row_mesh",
    "unpack_codes",
]
