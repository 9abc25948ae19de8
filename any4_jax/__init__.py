"""any4-jax: learned 4-bit weight quantization (any4) for LLMs in JAX/Flax.

The pipeline, one package per step (each imports only those below it):
  loading / checkpoint  a model from GGUF, Hugging Face or our checkpoints; save and load
  ptq                   calibration and whole-model quantization (`quantize_model`, ...)
  nn                    `QuantDense`, the layer that replaces a model's Dense
  models                the Llama family (knows nothing of quantization)
  kernels               `lut_matmul` and its backends (reference, CPU, Pallas, CUDA)
  quant                 formats, k-means, `quantize_weight` -> `QuantizedWeight`

The public API is re-exported here. Nothing heavy runs at import: each name loads its module
on first use, and compiled libraries load when a kernel first runs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "QuantConfig": "any4_jax.quant.config",
    "KMeansConfig": "any4_jax.quant.config",
    "QuantizedWeight": "any4_jax.quant.qweight",
    "quantize_weight": "any4_jax.quant.quantize",
    "lut_matmul": "any4_jax.kernels.api",
    "QuantDense": "any4_jax.nn.qdense",
    "CalibrationConfig": "any4_jax.ptq.calibrate",
    "quantize_model": "any4_jax.ptq.quantize_model",
    "quantize_params": "any4_jax.ptq.functional",
    "model_from_params": "any4_jax.ptq.functional",
    "Calibration": "any4_jax.ptq.functional",
    "save_quantized": "any4_jax.checkpoint",
    "load_quantized": "any4_jax.checkpoint",
    "load_model": "any4_jax.loading",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    # importing jax, flax and orbax takes seconds: each name costs that only when first used
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'any4_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
