"""The k-means of `kmeans.py` as a compiled CPU kernel (XLA FFI), built on first use, and the
globally optimal k-means (method "optimal") as another.

XLA:CPU runs the row-wise k-means as many small gathers and scans; a C++ loop over each row
(radix sort, prefix sums in float64, prefix-sum k-means++ and Lloyd, rows split over
threads) does the same work several times faster. The source (`ffi_kernels/kmeans_cpu.cc`)
is compiled by `native.loader` on first use; without a compiler, or with
ANY4_JAX_CPU_KMEANS=0, quantization uses the XLA implementation (same algorithm, float32
prefix sums, different random streams: results agree in quality, not bit for bit).

The optimal solver (`ffi_kernels/kmeans_optimal_cpu.cc`, `optimal_rows_cpu`) is the exact
dynamic program over the sorted row (float64 prefix sums, divide and conquer over each layer);
its XLA counterpart is `kmeans_optimal.optimal_kmeans_rows`, which gives the same tables.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import settings
from any4_jax.native import loader

TARGET = "any4_kmeans_rows"
OPTIMAL_TARGET = "any4_optimal_kmeans_rows"


def available() -> bool:
    """Whether the compiled k-means runs here: ANY4_JAX_CPU_KMEANS (read on every call) and
    the library (built, loaded and registered once)."""
    return settings.cpu_kmeans_enabled() and _registered()


@functools.cache
def _registered() -> bool:
    why = loader.register(loader.load_cpu("kmeans_cpu"), target=TARGET,
                          symbol="Any4KMeansRows", platform="cpu", what="the CPU k-means")
    if why:
        warnings.warn(f"{why}; any-n k-means runs on the (slower) XLA path", stacklevel=2)
    return why is None


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


def available_optimal() -> bool:
    """Whether the compiled optimal k-means runs here: ANY4_JAX_CPU_KMEANS (read on every
    call) and the library (built, loaded and registered once)."""
    return settings.cpu_kmeans_enabled() and _registered_optimal()


@functools.cache
def _registered_optimal() -> bool:
    why = loader.register(loader.load_cpu("kmeans_optimal_cpu"), target=OPTIMAL_TARGET,
                          symbol="Any4OptimalKMeansRows", platform="cpu",
                          what="the CPU optimal k-means")
    if why:
        warnings.warn(f"{why}; optimal k-means runs on the (slower) XLA path", stacklevel=2)
    return why is None


def optimal_rows_cpu(ws, sws, *, k: int):
    """Globally optimal weighted k-means of each row. ws, sws: [R, K] float32 values and
    non-negative sample weights (unsorted; the solver sorts). Returns (centroids [R, k] float32
    ascending, weighted SSE [R] float32). Rows with at most k distinct values of positive
    weight get those values, the largest repeated; a row of zero weights weighs values equally.
    """
    r = ws.shape[0]
    return jax.ffi.ffi_call(
        OPTIMAL_TARGET,
        (jax.ShapeDtypeStruct((r, k), jnp.float32), jax.ShapeDtypeStruct((r,), jnp.float32)),
        vmap_method="sequential",
    )(ws.astype(jnp.float32), sws.astype(jnp.float32), k=np.int64(k))
