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
import hashlib
import os
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "any4_kmeans_rows"
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "kmeans_cpu.cc")


def _cache_lib_dir() -> str:
    from any4_jax.assets import cache_dir

    return os.path.join(cache_dir(), "lib")


def _cpu_signature() -> bytes:
    import platform

    sig = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            sig += next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig.encode()


@functools.cache
def _library() -> str | None:
    """Path of the compiled library (building it if needed), or None with a warning."""
    if os.environ.get("ANY4_JAX_CPU_KMEANS", "1") == "0":
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        warnings.warn("no C++ compiler found: any-n k-means runs on the (slower) XLA path",
                      stacklevel=3)
        return None
    with open(SOURCE, "rb") as fh:
        src = fh.read()
    # -march=native: the library is specific to this CPU, so its flags are part of the key
    tag = hashlib.sha256(src + jax.__version__.encode() + cxx.encode()
                         + _cpu_signature()).hexdigest()[:16]
    out = os.path.join(_cache_lib_dir(), f"kmeans_cpu-{tag}.so")
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread",
           "-Wno-return-type", "-Wno-attributes", "-I", jax.ffi.include_dir(), SOURCE,
           "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        warnings.warn(f"building the CPU k-means failed ({' '.join(cmd)}):\n"
                      f"{r.stderr[-2000:]}\nfalling back to the XLA path", stacklevel=3)
        return None
    os.replace(tmp, out)
    return out


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
