"""Every environment variable any4-jax reads, in one place (docs/settings.md lists them).

Each is read when it is used, not at import, so a test or a user can set it between calls
(a jitted function keeps what it saw when it was traced). A value that is not one of the
allowed ones is an error that names the variable and its values.

  ANY4_JAX_CACHE                where fetched assets and compiled CPU libraries go
                                (default ~/.cache/any4-jax)
  ANY4_JAX_CPU_KMEANS=0         quantize with the XLA k-means instead of the compiled one
  ANY4_JAX_CPU_KERNEL=0         turn off the compiled CPU LUT GEMM
  ANY4_JAX_CPU_SPIN_US=N        how long the CPU LUT GEMM's helper threads stay awake (200)
  ANY4_JAX_CUDA_LIB=PATH        the CUDA FFI library to load (default: the package's _lib/)
  ANY4_JAX_CUDA_KERNEL=NAME     the CUDA library's kernel: scaled, unit_pair or unit_lane
  ANY4_JAX_CUDA_COMMAND_BUFFER=0  register the CUDA handler without the command-buffer trait
  ANY4_JAX_UNVERIFIED_KERNELS=1 let `implementation=None` pick kernels marked unverified
  ANY4_JAX_DEBUG=1              the CLI shows Python tracebacks instead of one-line errors
  CXX                           the C++ compiler for the CPU libraries (default g++, then c++)
"""

from __future__ import annotations

import os
import shutil


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: set it to 1 or 0 (or unset it for the default, "
                         f"{int(default)})")
    return value == "1"


def cache_dir() -> str:
    """Where fetched assets and compiled libraries live: $ANY4_JAX_CACHE or ~/.cache/any4-jax
    (a ValueError if it names something that is not a directory)."""
    path = os.environ.get("ANY4_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "any4-jax")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"ANY4_JAX_CACHE={path!r} is not a directory; point it at a directory "
                         "(it is created if missing) or unset it for ~/.cache/any4-jax")
    return path


def debug() -> bool:
    """ANY4_JAX_DEBUG=1: the CLI lets errors through with their tracebacks."""
    return _flag("ANY4_JAX_DEBUG", False)


def cpu_kmeans_enabled() -> bool:
    return _flag("ANY4_JAX_CPU_KMEANS", True)


def cpu_kernel_enabled() -> bool:
    return _flag("ANY4_JAX_CPU_KERNEL", True)


CPU_SPIN_US_DEFAULT = 200


def cpu_spin_us() -> int:
    """ANY4_JAX_CPU_SPIN_US: microseconds the CPU LUT GEMM's helper threads wait awake for the
    next call before they sleep (0: they sleep at once)."""
    value = os.environ.get("ANY4_JAX_CPU_SPIN_US")
    if value is None or value == "":
        return CPU_SPIN_US_DEFAULT
    if not value.isdigit() or int(value) > 1_000_000:
        raise ValueError(f"ANY4_JAX_CPU_SPIN_US={value!r}: set it to a whole number of "
                         f"microseconds from 0 to 1000000 (or unset it for "
                         f"{CPU_SPIN_US_DEFAULT})")
    return int(value)


def cuda_lib_override() -> str | None:
    return os.environ.get("ANY4_JAX_CUDA_LIB") or None


def cuda_kernel(default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get("ANY4_JAX_CUDA_KERNEL") or default
    if value not in allowed:
        raise ValueError(f"ANY4_JAX_CUDA_KERNEL={value!r}: set it to one of "
                         f"{', '.join(allowed)} (or unset it for {default!r})")
    return value


def cuda_command_buffer() -> bool:
    """Whether the CUDA handler declares itself command-buffer compatible (XLA may then record
    it into a CUDA graph with its neighbours rather than launch it from the host)."""
    return _flag("ANY4_JAX_CUDA_COMMAND_BUFFER", True)


def unverified_kernels() -> bool:
    return _flag("ANY4_JAX_UNVERIFIED_KERNELS", False)


def cxx() -> str | None:
    """The C++ compiler for the CPU libraries, or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
