"""Runs the CUDA LUT GEMM on small awkward cases for compute-sanitizer (a GPU script).

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck \\
        --kernel-name kns=lut_gemm --error-exitcode 1 python3 scripts/sanitize_cuda.py

(`scripts/device_run.sh` step "sanitize" runs memcheck and racecheck.) The platform allocator
gives every buffer its own allocation, so a read or write past the end of x, the codes, the
tables or y is an error the tool reports, not a silent access into a pooled neighbour. Cases:
table and integer-grid paths, bf16 and f16 activations with 16-bit or float32 tables, ragged
M on both batch-block widths, several 16-row tiles, groups of 32 to 256 with K of one to
several chunks per warp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def main():
    from any4_jax import QuantConfig, quantize_weight
    from any4_jax.kernels.cuda_ffi import lut_matmul_cuda
    from any4_jax.kernels.cuda_layout import prepare_cuda
    from any4_jax.kernels.reference import lut_matmul_reference

    rng = np.random.default_rng(0)
    f = jax.jit(lut_matmul_cuda)
    worst = 0.0
    for n, k, g in ((16, 32, 32), (48, 192, 64), (32, 512, 256), (80, 384, 128)):
        for fmt in ("any4", "int4"):
            # activations bf16 / f16, tables in the activation dtype or float32
            for dtype, wdt in ((jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16),
                               (jnp.bfloat16, jnp.float32)):
                w = rng.standard_t(4, size=(n, k)) * 0.02
                qw = quantize_weight(jnp.asarray(w, wdt), QuantConfig(format=fmt, group_size=g))
                cw = prepare_cuda(qw)
                for m in (1, 3, 8, 9, 17, 33):
                    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
                    y = np.asarray(f(x, cw).astype(jnp.float32))
                    ref = np.asarray(lut_matmul_reference(x, qw).astype(jnp.float32))
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    worst = max(worst, err)
                    assert err < 2e-2, (n, k, g, fmt, dtype, m, err)
    print(f"sanitize_cuda: all cases ran; worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
