"""Compile a CPU XLA FFI library (C++ from `ffi_kernels/`) on first use, into the cache.

Used for the compiled k-means (`quant/kmeans_cpu.py`) and the CPU LUT GEMM (`kernels/cpu.py`),
through `loader.load_cpu`. Built with the system C++ compiler, `-O3 -march=native`, against
the installed jaxlib's FFI headers, into `$ANY4_JAX_CACHE/lib`; the file name carries a hash
of the source (and of the headers it includes from its folder), the jax version, the compiler,
the CPU's flags and any extra flags, so a change of any of them builds anew. The write is
atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess

import jax

from any4_jax import settings


class BuildError(RuntimeError):
    """A native library could not be built; the message says why and what runs instead."""


def _cpu_signature() -> bytes:
    sig = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            sig += next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig.encode()


def _source_and_headers(source: str, _seen: set[str] | None = None) -> bytes:
    """The source's bytes, then those of each header it includes with quotes from its own
    directory (`#include "spin_pool_cpu.h"`), and theirs in turn: a change of any builds
    anew."""
    seen = set() if _seen is None else _seen
    seen.add(os.path.abspath(source))
    with open(source, "rb") as fh:
        src = fh.read()
    out = src
    here = os.path.dirname(source)
    for name in re.findall(rb'^#include "([^"/]+)"', src, flags=re.M):
        path = os.path.join(here, name.decode())
        if os.path.isfile(path) and os.path.abspath(path) not in seen:
            out += b"\0" + name + b"\0" + _source_and_headers(path, seen)
    return out


def build_library(name: str, source: str, *, extra_flags: tuple[str, ...] = ()) -> str:
    """Path of the compiled `source` (building it if needed); a BuildError when there is no
    compiler or the compiler fails."""
    cxx = settings.cxx()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    src = _source_and_headers(source)
    # -march=native: the library is specific to this CPU, so its flags are part of the key
    tag = hashlib.sha256(src + jax.__version__.encode() + cxx.encode() + _cpu_signature()
                         + " ".join(extra_flags).encode()).hexdigest()[:16]
    out = os.path.join(settings.cache_dir(), "lib", f"{name}-{tag}.so")
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [cxx, "-O3", "-march=native", *extra_flags, "-std=c++17", "-shared", "-fPIC",
           "-pthread", "-Wno-return-type", "-Wno-attributes", "-I", jax.ffi.include_dir(),
           "-I", os.path.dirname(source), source, "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BuildError(f"building {name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out
