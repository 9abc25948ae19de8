"""Where the native sources are, and the identity (hash) of the CUDA library's sources.

A source checkout has them in `ffi_kernels/` beside the package; an installed wheel has the
CPU sources in `any4_jax/_ffi_kernels/` (CMakeLists.txt installs them there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

# the repository root of a source checkout (in an installed wheel: site-packages)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SOURCES = ["ffi_kernels/lut_gemm_ffi.cu"]
CUDA_HEADERS = ["ffi_kernels/lut_gemm.cuh", "ffi_kernels/lut_gemm_unit.cuh",
                "ffi_kernels/mma_bf16.cuh"]
CUDA_LIB_NAME = "libany4_cuda.so"
INSTALLED_SOURCES = "_ffi_kernels"


def package_dirs() -> list[str]:
    """Every directory of the `any4_jax` package: an editable install has two (the source tree
    and the CMake install tree). Found without importing the package."""
    spec = importlib.util.find_spec("any4_jax")
    return list(spec.submodule_search_locations or []) if spec else []


def source_path(name: str) -> str:
    """The path of the native source `name` (e.g. "kmeans_cpu.cc"), with an error that says
    where it was looked for."""
    candidates = [os.path.join(ROOT, "ffi_kernels", name)]
    candidates += [os.path.join(d, INSTALLED_SOURCES, name) for d in package_dirs()]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"the native source {name} is not in {' nor '.join(candidates)}; "
                            "reinstall any4-jax (`pip install .` copies it into the package)")


def cuda_library_candidates(override: str | None = None) -> list[str]:
    """Where the CUDA library may be: `override` ($ANY4_JAX_CUDA_LIB), else `_lib/` of every
    directory of the package."""
    if override:
        return [override]
    return [os.path.join(d, "_lib", CUDA_LIB_NAME) for d in package_dirs()]


def source_hash(root: str | None = None) -> str | None:
    """sha256 of the CUDA sources' sha256s (one hex line each, in name order): the rule of
    CMakeLists.txt. None when the sources are not there (an installed wheel)."""
    root = root or ROOT
    lines = []
    for f in sorted(CUDA_SOURCES + CUDA_HEADERS):
        path = os.path.join(root, f)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as fh:
            lines.append(hashlib.sha256(fh.read()).hexdigest() + "\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
