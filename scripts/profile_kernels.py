"""One call of each kernel per shape and M, for Nsight Compute (a GPU script).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python3 scripts/profile_kernels.py

Everything is compiled and run twice first; only the calls between cudaProfilerStart and
cudaProfilerStop (one per implementation, shape and M) are profiled, so ncu's report holds the
kernels of interest: the CUDA LUT GEMM (`lut_gemm_kernel`), the Pallas kernel (Triton) and
XLA's dense bf16 product, each with its exact device time (`gpu__time_duration`) free of
dispatch overhead, and the CUDA kernel's stall reasons. `ANY4_PROFILE_IMPLS` picks the
implementations (default cuda,pallas,dense).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _cudart():
    names = [ctypes.util.find_library("cudart")]
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))
    try:
        import nvidia.cuda_runtime as rt  # pip wheel of the CUDA runtime

        for d in rt.__path__:
            names += sorted(glob.glob(os.path.join(d, "lib", "libcudart.so*")))
    except ImportError:
        pass
    for n in names:
        if n:
            try:
                return ctypes.CDLL(n)
            except OSError:
                continue
    raise RuntimeError("libcudart not found: cannot bracket the profiled region")


def main():
    from any4_jax import QuantConfig, quantize_weight
    from any4_jax.kernels import lut_matmul, prepare
    from any4_jax.shapes import LLAMA_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama3-8b/gate_up,llama3-8b/down,llama3-8b/o")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--impls", default=os.environ.get("ANY4_PROFILE_IMPLS", "cuda,pallas,dense"))
    args = ap.parse_args()
    impls = args.impls.split(",")
    rng = np.random.default_rng(0)
    calls = []
    for name in args.shapes.split(","):
        n, k = LLAMA_SHAPES[name]
        w = jnp.asarray(rng.standard_t(4, size=(n, k)) * 0.02, jnp.bfloat16)
        qw = quantize_weight(w, QuantConfig(format="any4", group_size=args.group_size,
                                            sample_weighting="none"))
        for m in (int(s) for s in args.ms.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            for impl in impls:
                if impl == "dense":
                    f, wt = jax.jit(lambda x, w: x @ w.T), w
                else:
                    wt = prepare(qw, impl)
                    f = jax.jit(lambda x, q, impl=impl: lut_matmul(x, q, implementation=impl))
                calls.append((f"{impl} {name} M={m}", f, x, wt))
    for _ in range(2):
        for _, f, x, wt in calls:
            jax.block_until_ready(f(x, wt))
    rt = _cudart()
    rt.cudaDeviceSynchronize()
    rt.cudaProfilerStart()
    for label, f, x, wt in calls:
        print("profiling", label, file=sys.stderr)
        jax.block_until_ready(f(x, wt))
    rt.cudaDeviceSynchronize()
    rt.cudaProfilerStop()


if __name__ == "__main__":
    main()
