"""Compile a CPU XLA FFI library (C++ in the package) on first use, into the cache.

Used by the compiled CPU k-means (`quant/kmeans_cpu.py`) and the CPU LUT GEMM
(`kernels/cpu.py`). Built with the system C++ compiler, `-O3 -march=native`, against the
installed jaxlib's FFI headers, into `$ANY4_JAX_CACHE/lib`; the file name carries a hash of
the source, the jax version, the compiler, the CPU's flags and any extra flags, so a change
of any of them builds anew. The write is atomic (a temporary file, then a rename). Returns
None with a warning when there is no compiler or the build fails: callers fall back to XLA.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import warnings


def _cpu_signature() -> bytes:
    sig = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            sig += next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig.encode()


def build_library(name: str, source: str, *, what: str, extra_flags: tuple[str, ...] = ()
                  ) -> str | None:
    """Path of the compiled `source` (building it if needed), or None with a warning that
    says `what` falls back to XLA."""
    import jax

    from any4_jax.assets import cache_dir

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        warnings.warn(f"no C++ compiler found: {what} runs on the (slower) XLA path",
                      stacklevel=3)
        return None
    with open(source, "rb") as fh:
        src = fh.read()
    # -march=native: the library is specific to this CPU, so its flags are part of the key
    tag = hashlib.sha256(src + jax.__version__.encode() + cxx.encode() + _cpu_signature()
                         + " ".join(extra_flags).encode()).hexdigest()[:16]
    out = os.path.join(cache_dir(), "lib", f"{name}-{tag}.so")
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [cxx, "-O3", "-march=native", *extra_flags, "-std=c++17", "-shared", "-fPIC",
           "-pthread", "-Wno-return-type", "-Wno-attributes", "-I", jax.ffi.include_dir(),
           source, "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        warnings.warn(f"building {name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}\n"
                      f"{what} falls back to the XLA path", stacklevel=3)
        return None
    os.replace(tmp, out)
    return out
