"""LUT-dequantizing matmul kernels behind one entry point, `lut_matmul`."""

from any4_jax.kernels.api import available, can_use, lut_matmul, pick, prepare
from any4_jax.kernels.cuda_layout import CudaWeight
from any4_jax.kernels.reference import lut_matmul_reference

__all__ = ["CudaWeight", "available", "can_use", "lut_matmul", "lut_matmul_reference", "pick",
           "prepare"]
