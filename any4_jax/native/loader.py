"""One loader for our native libraries: find (or build), check, load, register.

A library is a `Loaded`: the ctypes handle, or the reason there is none, in words that name
the fix. Callers (`quant/kmeans_cpu.py`, `kernels/cpu.py`, `kernels/cuda_ffi.py`) turn a reason
into a fallback (XLA) or into `can_use`'s answer; nothing is loaded at import.
- CPU libraries (`load_cpu`): compiled at first use from `ffi_kernels/NAME.cc` into the cache.
- The CUDA library (`load_cuda`): built by `pip install` (CMake) or `build_cuda`, found in the
  package's `_lib/` (or $ANY4_JAX_CUDA_LIB); refused if it was built from other sources than
  this checkout's or against a newer XLA FFI API than the running jaxlib's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
import warnings

import jax
import jaxlib

from any4_jax import settings
from any4_jax.native import build_cpu, sources

REBUILD = ("`pip install --no-build-isolation -e .` or `python -m any4_jax.native.build_cuda` "
           "on a machine with nvcc")


@dataclasses.dataclass(frozen=True)
class Loaded:
    lib: ctypes.CDLL | None
    reason: str | None = None  # why there is no library (None when lib is set)


@functools.cache
def load_cpu(name: str, extra_flags: tuple[str, ...] = ()) -> Loaded:
    """The CPU library built from `ffi_kernels/{name}.cc` (compiled on first use)."""
    try:
        path = build_cpu.build_library(name, sources.source_path(f"{name}.cc"),
                                       extra_flags=extra_flags)
    except (build_cpu.BuildError, FileNotFoundError) as e:
        return Loaded(None, str(e))
    return Loaded(ctypes.cdll.LoadLibrary(path))


def build_info(lib: ctypes.CDLL) -> dict[str, str]:
    """{"sources": sha256, "jaxlib": version, "ffi_api": "major.minor"} recorded in the CUDA
    library at build time."""
    try:
        fn = lib.Any4CudaBuildInfo
    except AttributeError:
        return {}
    fn.restype = ctypes.c_char_p
    return dict(kv.split("=", 1) for kv in fn().decode().split(";") if "=" in kv)


def running_ffi_api() -> tuple[int, int] | None:
    """(major, minor) of the running jaxlib's XLA FFI API, read from its own `c_api.h` (the
    headers ship with the jaxlib they describe); None when they cannot be read."""
    path = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    found = [re.search(rf"#define XLA_FFI_API_{part}\s+(\d+)", text)
             for part in ("MAJOR", "MINOR")]
    return (int(found[0][1]), int(found[1][1])) if all(found) else None


def ffi_api_compatible(built: str, running: tuple[int, int]) -> bool:
    """XLA's rule for registering a handler built against FFI API `built` ("0.5"): the same
    major version and a minor version no newer than the runtime's (older ones are accepted)."""
    major, minor = (int(v) for v in built.split("."))
    return major == running[0] and minor <= running[1]


def _cuda_problem(path: str, lib: ctypes.CDLL, expected: str | None,
                  running: tuple[int, int] | None) -> str | None:
    """Why the CUDA library at `path` must not be used (None: it may)."""
    info = build_info(lib)
    if expected is not None and info.get("sources") != expected:
        return (f"{path} was built from other kernel sources than this checkout's "
                "ffi_kernels/ (a stale build)")
    built, built_api = info.get("jaxlib", "unknown"), info.get("ffi_api")
    if built_api and running:
        if not ffi_api_compatible(built_api, running):
            return (f"{path} was built against jaxlib {built} (XLA FFI API {built_api}), which "
                    f"this jaxlib {jaxlib.__version__} (FFI API {running[0]}.{running[1]}) "
                    "refuses to register")
    elif built.split(".")[:2] != jaxlib.__version__.split(".")[:2]:
        warnings.warn(f"{path} was built against jaxlib {built}, this is jaxlib "
                      f"{jaxlib.__version__}; if the FFI call fails, rebuild: {REBUILD}",
                      stacklevel=3)
    return None


def load_cuda() -> Loaded:
    """The CUDA library to use, or the reason there is none."""
    candidates = sources.cuda_library_candidates(settings.cuda_lib_override())
    found = [p for p in candidates if os.path.isfile(p)]
    if not found:
        return Loaded(None, f"the CUDA library is not built ({' or '.join(candidates)} "
                            f"missing): run {REBUILD}")
    expected, running = sources.source_hash(), running_ffi_api()
    problems = []
    for path in found:
        try:
            lib = ctypes.cdll.LoadLibrary(path)
        except OSError as e:
            problems.append(f"{path} does not load: {e}")
            continue
        problem = _cuda_problem(path, lib, expected, running)
        if problem is None:
            return Loaded(lib)
        problems.append(problem)
    return Loaded(None, "the CUDA library cannot be used: " + "; ".join(problems)
                  + f"; rebuild: {REBUILD}")


def register(loaded: Loaded, *, target: str, symbol: str, platform: str, what: str,
             fix: str = "") -> str | None:
    """Registers `symbol` of the library as the FFI target `target` for `platform`; returns
    the reason it could not (no library, or XLA's own refusal in its words, then `fix`)."""
    if loaded.lib is None:
        return loaded.reason
    try:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded.lib, symbol)),
                                    platform=platform)
    except Exception as e:  # noqa: BLE001 - XLA's refusal (version or platform), in its words
        return f"XLA refused {what}'s handler ({e})" + (f"; {fix}" if fix else "")
    return None
