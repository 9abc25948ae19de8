"""`lut_matmul`: the one entry point for a matmul against a `QuantizedWeight`.

Every implementation registers a function and a `can_use(x, qweight) -> list[str]` that
returns, in words, each reason it declines an input (an empty list means it can run).
`implementation=None` picks the first usable one in `PREFERENCE` for the input's platform;
"xla" (the reference) always can, so a CPU-only user loses nothing.

Kernel-specific layouts are prepared once, not per call: `prepare(qweight, "cuda")` returns a
`CudaWeight` (what `QuantDense.prepare` / `prepare_model` store in a model), which `lut_matmul`
takes in place of the QuantizedWeight; the other implementations read the canonical form
(given a CudaWeight they convert it back first, which costs a pass over the codes per call).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from any4_jax import settings
from any4_jax.kernels.cuda_layout import CudaWeight, prepare_cuda
from any4_jax.kernels.reference import lut_matmul_reference
from any4_jax.kernels.tuning import cuda_dense_threshold
from any4_jax.quant.bcq import BCQWeight
from any4_jax.quant.qweight import QuantizedWeight

# BCQWeight (LO-BCQ: a codebook chosen per block, not a table per row) runs on "xla" only
Weight = QuantizedWeight | CudaWeight | BCQWeight

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    fn: Callable[[jax.Array, QuantizedWeight], jax.Array]
    can_use: Callable[[jax.Array, QuantizedWeight], list[str]]
    # Picked by implementation=None only once it has passed its tests on real hardware
    # (or with ANY4_JAX_UNVERIFIED_KERNELS=1; docs/kernels.md has the table); asking for it by
    # name always works.
    verified: bool = True


def _common_reasons(x, qweight) -> list[str]:
    reasons = []
    if not isinstance(qweight, QuantizedWeight | CudaWeight | BCQWeight):
        return [f"qweight must be a QuantizedWeight (or a prepared CudaWeight, or a "
                f"BCQWeight), got {type(qweight).__name__}"]
    n, k = qweight.shape
    if x.ndim < 1 or x.shape[-1] != k:
        reasons.append(f"x has shape {tuple(x.shape)}; its last dim must be K={k} of the "
                       f"[{n}, {k}] weight")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        reasons.append(f"x dtype {x.dtype} is not one of bfloat16, float16, float32")
    if isinstance(qweight, QuantizedWeight) and qweight.codes.ndim != 2:
        reasons.append(f"qweight holds a stack of layers (codes {tuple(qweight.codes.shape)}); "
                       "vmap over the stack axis")
    return reasons


def _lazy(module: str, name: str) -> Callable:
    """`module.name`, imported on the first call (a kernel module may build or load a
    library when imported or first used; `import any4_jax` must stay cheap)."""

    def call(x, q):
        return getattr(importlib.import_module(module), name)(x, q)

    call.__name__ = name
    return call


# The kernel modules are imported (and their libraries built / loaded) on first use.
_REGISTRY: dict[str, Implementation] = {
    "xla": Implementation("xla", lut_matmul_reference, lambda x, q: []),
    "pallas": Implementation("pallas", _lazy("any4_jax.kernels.pallas_gpu", "lut_matmul_pallas"),
                             _lazy("any4_jax.kernels.pallas_gpu", "can_use_pallas")),
    "cuda": Implementation("cuda", _lazy("any4_jax.kernels.cuda_ffi", "lut_matmul_cuda"),
                           _lazy("any4_jax.kernels.cuda_ffi", "can_use_cuda")),
    "cpu": Implementation("cpu", _lazy("any4_jax.kernels.cpu", "lut_matmul_cpu"),
                          _lazy("any4_jax.kernels.cpu", "can_use_cpu")),
}

# Tried in this order when implementation=None.
PREFERENCE = ("cuda", "pallas", "cpu", "xla")
KNOWN = tuple(_REGISTRY)  # the names `implementation` takes


def available() -> list[str]:
    """Every implementation, in the order `implementation=None` tries them."""
    return list(PREFERENCE)


def prepare(qweight: Weight, implementation: str | None) -> Weight:
    """`qweight` in the layout `implementation` reads (once, at load or quantize time):
    a CudaWeight for "cuda", the canonical QuantizedWeight for every other."""
    if isinstance(qweight, BCQWeight):
        return qweight  # one layout: the reference reads it
    if implementation == "cuda":
        return qweight if isinstance(qweight, CudaWeight) else prepare_cuda(qweight)
    if implementation is not None and implementation not in KNOWN:
        raise ValueError(f"unknown implementation {implementation!r}; choose one of "
                         f"{', '.join(KNOWN)}")
    return qweight.canonical() if isinstance(qweight, CudaWeight) else qweight


def pick(x: jax.Array, qweight: Weight) -> str:
    """What `implementation=None` runs for this input: a weight prepared for "cuda" asks for
    the CUDA kernel first; otherwise the first usable verified implementation in PREFERENCE
    (unverified ones too with ANY4_JAX_UNVERIFIED_KERNELS=1); "xla" always can. The CUDA
    kernel is skipped above `tuning.cuda_dense_threshold` rows of x."""
    allow_unverified = settings.unverified_kernels()
    order = available()
    if isinstance(qweight, CudaWeight) and "cuda" in order:
        order = ["cuda"] + [n for n in order if n != "cuda"]
    m = math.prod(x.shape[:-1])  # rows of x
    for name in order:
        if name == "cuda" and m > cuda_dense_threshold(n=qweight.shape[0], k=qweight.shape[1]):
            continue  # many rows: dequantize-then-dense (or Pallas) is the faster path
        verified = _REGISTRY[name].verified or allow_unverified
        if (verified or (name == "cuda" and isinstance(qweight, CudaWeight))) and \
                not can_use(name, x, qweight):
            return name
    return "xla"


def can_use(implementation: str, x: jax.Array, qweight: Weight) -> list[str]:
    """Why `implementation` cannot run this input: [] if it can."""
    reasons = _common_reasons(x, qweight)
    if implementation not in _REGISTRY:
        return reasons + [f"unknown implementation {implementation!r}; choose one of "
                          f"{', '.join(KNOWN)} or None for the best available"]
    if implementation != "cuda" and isinstance(qweight, CudaWeight):
        # the others read the canonical form (`lut_matmul` converts); judge its shapes
        qweight = jax.eval_shape(CudaWeight.canonical, qweight)
    if isinstance(qweight, BCQWeight) and implementation != "xla":
        return reasons + [f"the {implementation} kernel reads a table per row; a 'bcq' weight "
                          "(a codebook per block) runs on the reference, implementation='xla'"]
    return reasons + _REGISTRY[implementation].can_use(x, qweight)


def lut_matmul(x: jax.Array, qweight: Weight, *,
               implementation: str | None = None) -> jax.Array:
    """y = x @ dequantize(qweight).T with float32 accumulation.

    x: [..., K] bfloat16 / float16 / float32; qweight: a [N, K] QuantizedWeight, or the
    weight `prepare` made for an implementation, or a BCQWeight (reference only). Returns
    [..., N] in x's dtype. Works under jit and vmap. implementation: "xla", "pallas", "cuda",
    or None for `pick(x, qweight)`.
    """
    name = implementation or pick(x, qweight)
    reasons = can_use(name, x, qweight)
    if reasons:
        raise ValueError(f"lut_matmul(implementation={implementation!r}) cannot run: "
                         + "; ".join(reasons))
    if name != "cuda" and isinstance(qweight, CudaWeight):
        qweight = qweight.canonical()
    return _REGISTRY[name].fn(x, qweight)
