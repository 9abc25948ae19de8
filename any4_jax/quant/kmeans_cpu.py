"""The k-means of `kmeans.py` as a compiled CPU kernel (XLA FFI), built on first use.

XLA:CPU runs the row-wise k-means as many small gathers and scans; a C++ loop over each row
(radix sort, prefix sums in float64, prefix-sum k-means++ and Lloyd, rows split over
threads) does the same work several times faster. The source (`csrc/kmeans_cpu.cc`) is
compiled with the system C++ compiler against the installed jaxlib's FFI headers into the
cache (`$ANY4_JAX_CACHE/lib`), once per source/jax version; without a compiler, or with
ANY4_JAX_CPU_KMEANS=0, quantization uses the XLA implementation (same algorithm, float32
prefix sums, different random streams: results agree in quality, not bit for bit).
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "any4_kmeans_rows"
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "kmeans_cpu.cc")


@functools.cache
def _library() -> str | None:
    """Path of the compiled library (building it if needed), or None with a warning."""
    if os.environ.get("ANY4_JAX_CPU_KMEANS", "1") == "0":
        return None
    from any4_jax.cpu_build import build_library

    return build_library("kmeans_cpu", SOURCE, what="any-n k-means")


@functools.cache
def available() -> bool:
    path = _library()
    if path is None:
        return False
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Any4KMeansRows), platform="cpu")
    return True


def kmeans_rows_cpu(ws, sws, row_ids, init, *, k: int, max_iter: int, tol: float, seed: int,
                    plusplus: bool):
    """ws, sws: [R, K] float32 values and sample weights (unsorted); init [R, k] (used when
    not plusplus). Returns (sorted centroids [R, k] float32, Lloyd iterations [R] int32)."""
    r = ws.shape[0]
    return jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct((r, k), jnp.float32), jax.ShapeDtypeStruct((r,), jnp.int32)),
        vmap_method="sequential",
    )(ws.astype(jnp.float32), sws.astype(jnp.float32), row_ids.astype(jnp.int32),
      init.astype(jnp.float32), k=np.int64(k), max_iter=np.int64(max_iter),
      tol=np.float32(tol), seed=np.int64(seed), plusplus=np.int64(plusplus))
