"""The LUT GEMM on the CPU (XLA FFI, C++): `implementation="cpu"` of `lut_matmul`.

For the small M of decoding, where the reference path dequantizes the whole weight to float32
on every call and then reads it again: this kernel reads the packed 4-bit codes once per four
rows of x and dequantizes in registers (AVX-512: one permute looks up 16 table entries; AVX2
and a scalar loop otherwise), rows of the weight spread over the calling thread and helper
threads that stay awake between calls for `ANY4_JAX_CPU_SPIN_US` microseconds
(`ffi_kernels/lut_gemm_cpu.cc`, `spin_pool_cpu.h`). Above `MAX_ROWS` rows of x the reference's
dense GEMM is faster and this kernel declines. The library is compiled on first use into the cache
(`native.loader`); `ANY4_JAX_CPU_KERNEL=0` turns it off.

Numerics follow the reference: the weight is `fma(lut[c], scale, zero)` in float32 rounded to
x's dtype (bit for bit `dequantize(x.dtype)`, so identity activations give the dequantized
weight exactly), products and sums in float32 (only the order of the sum differs), y rounded
to x's dtype. Post-scaled instead (the weight not rounded to x's dtype; within the dtype's
tolerance, as on the GPU): on CPUs with AVX512_BF16, every bf16 call whose tables are bf16
(vdpbf16ps; docs/cpu_kernel_notes.md, v6).
"""

from __future__ import annotations

import ctypes
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import settings
from any4_jax.native import loader
from any4_jax.quant.qweight import QuantizedWeight

TARGET = "any4_lut_gemm_cpu"
# Rows of x above which the reference (dequantize once, XLA's GEMM) wins on the CPU: measured
# with `scripts/kernel_bench.py bench` on the 2-core development machine (docs/kernels.md).
MAX_ROWS = 32


@functools.cache
def _registered() -> str | None:
    loaded = loader.load_cpu("lut_gemm_cpu")
    if loaded.lib is not None:  # how long its helper threads stay awake between calls
        loaded.lib.Any4LutGemmCpuSetSpinUs(ctypes.c_long(settings.cpu_spin_us()))
    return loader.register(loaded, target=TARGET, symbol="Any4LutGemmCpu", platform="cpu",
                           what="the CPU LUT GEMM")


def _register() -> str | None:
    """Builds, loads and registers the handler (once); a reason when it cannot run."""
    if not settings.cpu_kernel_enabled():
        return "the CPU kernel is turned off (ANY4_JAX_CPU_KERNEL=0)"
    why = _registered()
    return None if why is None else f"the CPU kernel cannot run: {why}"


def vector_width(extra_flags: tuple[str, ...] = ()) -> int:
    """Floats per vector in the built library: 16 (AVX-512), 8 (AVX2) or 0 (scalar)."""
    lib = loader.load_cpu("lut_gemm_cpu", extra_flags).lib
    return 0 if lib is None else int(lib.Any4LutGemmCpuVectorWidth())


def can_use_cpu(x, qweight) -> list[str]:
    reasons = []
    if jax.default_backend() != "cpu":
        reasons.append(f"the CPU kernel runs on the CPU backend (jax's backend is "
                       f"{jax.default_backend()!r})")
    m = math.prod(x.shape[:-1])  # rows of x
    if m > MAX_ROWS:
        reasons.append(f"M={m} rows exceed {MAX_ROWS}, above which dequantize-then-dense "
                       "(XLA's GEMM) is the faster path on the CPU")
    if qweight.group_size % 2:
        reasons.append(f"group size {qweight.group_size} is odd: the CPU kernel reads a byte's "
                       "two codes together, so it takes even group sizes (the reference runs "
                       "odd ones)")
    if not reasons:
        why = _register()
        if why:
            reasons.append(why)
    return reasons


_ROUND = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}


# The kernel reads tables, scales and zeros in these dtypes as they are (one dtype for the
# three); anything else is widened to float32 first.
_PARAM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _call(x2, codes, lut, scales, zeros, *, group_size: int, target: str = TARGET):
    """x2 [M, K] -> y [M, N] float32."""
    return _call_many(x2, [(codes, lut, scales, zeros)], group_size=group_size,
                      target=target)[0]


def _call_many(x2, weights, *, group_size: int, target: str = TARGET) -> list:
    """x2 [M, K] and weights [(codes [N_i, K/2], lut, scales, zeros)] sharing K, the group size
    and the tables' dtype -> [y_i [M, N_i] float32]: one kernel call (the rows of all the
    weights split over the threads together)."""
    m = x2.shape[0]
    f32 = jnp.float32
    args, outs = [], []
    for codes, lut, scales, zeros in weights:
        dt = jnp.dtype(lut.dtype)
        if dt not in _PARAM_DTYPES or scales.dtype != dt or zeros.dtype != dt:
            lut, scales, zeros = lut.astype(f32), scales.astype(f32), zeros.astype(f32)
        args += [codes, lut, scales, zeros]
        outs.append(jax.ShapeDtypeStruct((m, codes.shape[0]), f32))
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(
        x2.astype(f32), *args,
        group_size=np.int64(group_size), round=np.int64(_ROUND[jnp.dtype(x2.dtype)]))


def lut_matmul_cpu(x: jax.Array, qweight: QuantizedWeight) -> jax.Array:
    """x: [..., K] -> [..., N] in x's dtype."""
    return lut_matmul_cpu_many(x, [qweight])[0]


def lut_matmul_cpu_many(x: jax.Array, qweights) -> list[jax.Array]:
    """x: [..., K] against several weights of the same K and group size (a layer's q/k/v
    projections, say) in one kernel call -> [[..., N_i]] in x's dtype; each bit for bit
    `lut_matmul_cpu(x, qweight)`."""
    why = _register()
    if why:
        raise RuntimeError(why)
    if not qweights:
        raise ValueError("lut_matmul_cpu_many: give at least one weight")
    k = qweights[0].shape[1]
    shared = {(q.shape[1], q.group_size, jnp.dtype(q.lut.dtype).name) for q in qweights}
    if len(shared) != 1:
        raise ValueError("lut_matmul_cpu_many: the weights must share K, the group size and "
                         f"the tables' dtype; got (K, group size, dtype) {sorted(shared)}")
    lead = x.shape[:-1]
    ys = _call_many(x.reshape(-1, k), [(q.codes, q.lut, q.scales, q.zeros) for q in qweights],
                    group_size=qweights[0].group_size, target=TARGET)
    return [y.astype(x.dtype).reshape(*lead, q.shape[0]) for y, q in zip(ys, qweights, strict=True)]
