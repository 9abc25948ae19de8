"""The CUDA LUT GEMM through the XLA FFI: `implementation="cuda"` of `lut_matmul`.

The shared library (`libany4_cuda.so`, from `ffi_kernels/`) is built against the installed
jaxlib's FFI headers, by `pip install .` (CMake through scikit-build-core, when nvcc is
present) or by `python -m any4_jax.native.build_cuda` in a source checkout; `native.loader`
finds, checks and loads it on first use (never at import) and this module registers its
handler with XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import settings
from any4_jax.kernels.cuda_layout import CudaWeight, layout_reasons, prepare_cuda
from any4_jax.kernels.tuning import DEFAULT_CUDA_KERNEL
from any4_jax.native import loader
from any4_jax.quant.qweight import QuantizedWeight

TARGET = "any4_lut_gemm"
# The library's kernels (ffi_kernels/lut_gemm.cuh, enum Kernel, in this order), all on the same
# prepared layout: "scaled" scales each weight in float and rounds it to x's dtype before the
# MMA (the reference's arithmetic); "unit_pair" and "unit_lane" feed the raw table values to the
# MMA and apply each group's scale and zero to its partial sums (post-scale: the weight is never
# rounded, so slightly more accurate than the reference; identity activations still give the
# dequantized weight exactly), looking up two codes per shared load from a pair table or one
# per load from a conflict-free per-lane table.
KERNELS = ("scaled", "unit_pair", "unit_lane")


def default_kernel() -> str:
    """The kernel a call runs unless told otherwise: $ANY4_JAX_CUDA_KERNEL, else
    `tuning.DEFAULT_CUDA_KERNEL`. Read when a call is traced (a jitted function keeps the
    kernel it was traced with)."""
    return settings.cuda_kernel(DEFAULT_CUDA_KERNEL, KERNELS)


@functools.cache
def _register() -> str | None:
    """Loads the library and registers the FFI target (once, with the command-buffer trait
    unless $ANY4_JAX_CUDA_COMMAND_BUFFER=0); returns a reason on failure."""
    symbol = "Any4LutGemm" if settings.cuda_command_buffer() else "Any4LutGemmNoCommandBuffer"
    return loader.register(loader.load_cuda(), target=TARGET, symbol=symbol, platform="CUDA",
                           what="the CUDA library", fix=f"rebuild: {loader.REBUILD}")


def can_use_cuda(x, qweight) -> list[str]:
    reasons = []
    if jax.default_backend() != "gpu":
        reasons.append(f"the CUDA kernel needs a CUDA GPU (jax's backend is "
                       f"{jax.default_backend()!r})")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        reasons.append(f"x dtype {x.dtype}: the CUDA kernel takes bfloat16 or float16")
    n, k = qweight.shape
    reasons += layout_reasons(n, k, qweight.group_size)
    if not reasons:
        why = _register()
        if why:
            reasons.append(why)
    return reasons


def _call(x2, cw: CudaWeight, kernel: str):
    m = x2.shape[0]
    n, _ = cw.shape
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), x2.dtype),
                            vmap_method="sequential")(
        x2, cw.codes, cw.lut, cw.scales, cw.zeros,
        group_size=np.int64(cw.group_size), int_offset=np.int64(cw.int_offset),
        kernel=np.int64(KERNELS.index(kernel)))


def lut_matmul_cuda(x: jax.Array, w: QuantizedWeight | CudaWeight, *,
                    kernel: str | None = None) -> jax.Array:
    """x: [..., K] bf16/f16 -> [..., N]. Pass a `prepare_cuda` result to skip the per-call
    layout conversion (a QuantizedWeight is converted inside the call). kernel: one of
    KERNELS, None for `default_kernel()`."""
    if kernel is None:
        kernel = default_kernel()
    elif kernel not in KERNELS:
        raise ValueError(f"lut_matmul_cuda: kernel={kernel!r}; choose one of "
                         f"{', '.join(KERNELS)} or None (the default, {default_kernel()!r})")
    why = _register()
    if why:
        raise RuntimeError(why)
    cw = w if isinstance(w, CudaWeight) else prepare_cuda(w)
    n, k = cw.shape
    lead = x.shape[:-1]
    return _call(x.reshape(-1, k), cw, kernel).reshape(*lead, n)
