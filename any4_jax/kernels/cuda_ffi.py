"""The CUDA LUT GEMM through the XLA FFI: `implementation="cuda"` of `lut_matmul`.

The shared library (`libany4_cuda.so`, from `ffi_kernels/`) is built against the installed
jaxlib's FFI headers, by `pip install .` (CMake through scikit-build-core, when nvcc is
present) or by `python -m any4_jax.kernels.build_cuda` in a source checkout; both put it in
`any4_jax/_lib/`, and `$ANY4_JAX_CUDA_LIB` points elsewhere. It is loaded and its handler
registered with XLA on first use, never at import. A library whose recorded source hash differs
from the kernel sources of this checkout is refused (it would run other code than the tests
check), with the command that rebuilds it, and so is one built against a newer XLA FFI API than
the running jaxlib's (XLA would refuse its handler).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.kernels.build_cuda import source_hash
from any4_jax.kernels.cuda_layout import CudaWeight, layout_reasons, prepare_cuda
from any4_jax.quant.qweight import QuantizedWeight

TARGET = "any4_lut_gemm"
# The library's kernels (ffi_kernels/lut_gemm.cuh, enum Kernel, in this order), all on the same
# prepared layout: "scaled" scales each weight in float and rounds it to x's dtype before the
# MMA (the reference's arithmetic); "unit_pair" and "unit_lane" feed the raw table values to the
# MMA and apply each group's scale and zero to its partial sums (post-scale: the weight is never
# rounded, so slightly more accurate than the reference; identity activations still give the
# dequantized weight exactly), looking up two codes per shared load from a pair table or one
# per load from a conflict-free per-lane table.
KERNELS = ("scaled", "unit_pair", "unit_lane")
LIB_NAME = "libany4_cuda.so"
REBUILD = ("`pip install --no-build-isolation -e .` or `python -m any4_jax.kernels.build_cuda` "
           "on a machine with nvcc")


def library_candidates() -> list[str]:
    """Where the library may be: $ANY4_JAX_CUDA_LIB, else `_lib/` of every directory of the
    package (an editable install has the source tree and the CMake install tree)."""
    env = os.environ.get("ANY4_JAX_CUDA_LIB")
    if env:
        return [env]
    import any4_jax

    return [os.path.join(d, "_lib", LIB_NAME) for d in any4_jax.__path__]


def build_info(lib: ctypes.CDLL) -> dict[str, str]:
    """{"sources": sha256, "jaxlib": version} recorded in the library at build time."""
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


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """The library to use, or a reason why there is none."""
    found = [p for p in library_candidates() if os.path.isfile(p)]
    if not found:
        return None, (f"the CUDA library is not built ({' or '.join(library_candidates())} "
                      f"missing): run {REBUILD}")
    import jaxlib

    expected, running = source_hash(), running_ffi_api()
    problems = []
    for path in found:
        try:
            lib = ctypes.cdll.LoadLibrary(path)
        except OSError as e:
            problems.append(f"{path} does not load: {e}")
            continue
        info = build_info(lib)
        if expected is not None and info.get("sources") != expected:
            problems.append(f"{path} was built from other kernel sources than this checkout's "
                            f"ffi_kernels/ (a stale build)")
            continue
        built, built_api = info.get("jaxlib", "unknown"), info.get("ffi_api")
        if built_api and running:
            if not ffi_api_compatible(built_api, running):
                problems.append(
                    f"{path} was built against jaxlib {built} (XLA FFI API {built_api}), which "
                    f"this jaxlib {jaxlib.__version__} (FFI API {running[0]}.{running[1]}) "
                    "refuses to register")
                continue
        elif built.split(".")[:2] != jaxlib.__version__.split(".")[:2]:
            warnings.warn(f"{path} was built against jaxlib {built}, this is jaxlib "
                          f"{jaxlib.__version__}; if the FFI call fails, rebuild: {REBUILD}",
                          stacklevel=3)
        return lib, None
    return None, "the CUDA library cannot be used: " + "; ".join(problems) + f"; rebuild: {REBUILD}"


def default_kernel() -> str:
    """The kernel a call runs unless told otherwise: $ANY4_JAX_CUDA_KERNEL, else
    `tuning.DEFAULT_CUDA_KERNEL`. Read when a call is traced (a jitted function keeps the
    kernel it was traced with)."""
    from any4_jax.kernels.tuning import DEFAULT_CUDA_KERNEL

    value = os.environ.get("ANY4_JAX_CUDA_KERNEL") or DEFAULT_CUDA_KERNEL
    if value not in KERNELS:
        raise ValueError(f"ANY4_JAX_CUDA_KERNEL={value!r}: set it to one of "
                         f"{', '.join(KERNELS)} (or unset it for {DEFAULT_CUDA_KERNEL!r})")
    return value


def command_buffer_enabled() -> bool:
    """Whether the handler registered declares itself command-buffer compatible (XLA may then
    record it into a CUDA graph with its neighbours rather than launch it from the host):
    yes unless $ANY4_JAX_CUDA_COMMAND_BUFFER is "0". Read once, when the target is
    registered (first use in a process)."""
    value = os.environ.get("ANY4_JAX_CUDA_COMMAND_BUFFER", "1")
    if value not in ("0", "1"):
        raise ValueError(f"ANY4_JAX_CUDA_COMMAND_BUFFER={value!r}: set it to 1 (the default: "
                         "XLA may put the kernel into CUDA graphs) or 0 (launched from the host "
                         "every call)")
    return value == "1"


@functools.cache
def _register() -> str | None:
    """Loads the library and registers the FFI target; returns a reason on failure."""
    lib, why = _load()
    if lib is None:
        return why
    handler = lib.Any4LutGemm if command_buffer_enabled() else lib.Any4LutGemmNoCommandBuffer
    try:
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="CUDA")
    except Exception as e:  # XLA's own refusal (a version or platform mismatch), in its words
        return f"XLA refused the CUDA library's handler ({e}); rebuild: {REBUILD}"
    return None


def can_use_cuda(x, qweight) -> list[str]:
    reasons = []
    if jax.default_backend() != "gpu":
        reasons.append(f"the CUDA kernel needs a CUDA GPU (jax's backend is "
                       f"{jax.default_backend()!r})")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        reasons.append(f"x dtype {x.dtype}: the CUDA kernel takes bfloat16 or float16")
    n, k = qweight.shape
    reasons += layout_reasons(n, k, qweight.group_size)
    if not reasons:
        why = _register()
        if why:
            reasons.append(why)
    return reasons


def _call(x2, cw: CudaWeight, kernel: str):
    m = x2.shape[0]
    n, _ = cw.shape
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), x2.dtype),
                            vmap_method="sequential")(
        x2, cw.codes, cw.lut, cw.scales, cw.zeros,
        group_size=np.int64(cw.group_size), int_offset=np.int64(cw.int_offset),
        kernel=np.int64(KERNELS.index(kernel)))


def lut_matmul_cuda(x: jax.Array, w: QuantizedWeight | CudaWeight, *,
                    kernel: str | None = None) -> jax.Array:
    """x: [..., K] bf16/f16 -> [..., N]. Pass a `prepare_cuda` result to skip the per-call
    layout conversion (a QuantizedWeight is converted inside the call). kernel: one of
    KERNELS, None for `default_kernel()`."""
    if kernel is None:
        kernel = default_kernel()
    elif kernel not in KERNELS:
        raise ValueError(f"lut_matmul_cuda: kernel={kernel!r}; choose one of "
                         f"{', '.join(KERNELS)} or None (the default, {default_kernel()!r})")
    why = _register()
    if why:
        raise RuntimeError(why)
    cw = w if isinstance(w, CudaWeight) else prepare_cuda(w)
    n, k = cw.shape
    lead = x.shape[:-1]
    return _call(x.reshape(-1, k), cw, kernel).reshape(*lead, n)
