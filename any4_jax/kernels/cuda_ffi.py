"""The CUDA LUT GEMM through the XLA FFI: `implementation="cuda"` of `lut_matmul`.

The shared library (`libany4_cuda.so`, from `ffi_kernels/`) is built against the installed
jaxlib's FFI headers by `python -m any4_jax.kernels.build_cuda` (nvcc) and
placed in `any4_jax/_lib/`; `$ANY4_JAX_CUDA_LIB` points elsewhere. It is loaded and its
handler registered with XLA on first use, never at import.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.kernels.cuda_layout import CudaWeight, layout_reasons, prepare_cuda
from any4_jax.quant.qweight import QuantizedWeight

TARGET = "any4_lut_gemm"
LIB_NAME = "libany4_cuda.so"


def library_path() -> str:
    return os.environ.get("ANY4_JAX_CUDA_LIB") or os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "_lib", LIB_NAME)


@functools.cache
def _register() -> str | None:
    """Loads the library and registers the FFI target; returns a reason on failure."""
    path = library_path()
    if not os.path.isfile(path):
        return (f"the CUDA library is not built ({path} missing): run "
                "`python -m any4_jax.kernels.build_cuda` on a machine with nvcc")
    try:
        lib = ctypes.cdll.LoadLibrary(path)
    except OSError as e:
        return f"the CUDA library {path} does not load: {e}"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Any4LutGemm), platform="CUDA")
    return None


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


def _call(x2, cw: CudaWeight):
    m = x2.shape[0]
    n, _ = cw.shape
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), x2.dtype),
                            vmap_method="sequential")(
        x2, cw.codes, cw.lut, cw.scales, cw.zeros,
        group_size=np.int64(cw.group_size), int_offset=np.int64(cw.int_offset))


def lut_matmul_cuda(x: jax.Array, w: QuantizedWeight | CudaWeight) -> jax.Array:
    """x: [..., K] bf16/f16 -> [..., N]. Pass a `prepare_cuda` result to skip the per-call
    layout conversion (a QuantizedWeight is converted inside the call)."""
    why = _register()
    if why:
        raise RuntimeError(why)
    cw = w if isinstance(w, CudaWeight) else prepare_cuda(w)
    n, k = cw.shape
    lead = x.shape[:-1]
    return _call(x.reshape(-1, k), cw).reshape(*lead, n)
