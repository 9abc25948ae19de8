"""The GPU correctness matrix of a short device session (`scripts/device_run.sh`, step
`gpucheck`): each CUDA kernel and each Pallas lookup variant on the Llama-3-8B shapes and one
odd shape, M in {1, 3, 16, 33}, bf16 and f16, g64 and g128, any4 and int4 tables, against the
rounded-weight product and the reference, plus identity activations against the dequantized
weight. Fresh random inputs per case; the allocator's free memory of the output's size is
filled with NaN before each call, so an element the kernel never writes fails the check.

Tests come in priority order (pytest-xdist hands them out in collection order, and a capped
run keeps what finished): the default CUDA kernel, the other CUDA kernels, the Pallas kernel
as `implementation="pallas"` configures it, then each Pallas lookup variant on a subset that
still covers every shape, M, dtype, group size and format.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.kernels import lut_matmul
from any4_jax.kernels.reference import lut_matmul_reference
from any4_jax.quant.qweight import random_qweight
from any4_jax.shapes import LLAMA_SHAPES

from .base import TOLERANCE as _TOL

pytestmark = pytest.mark.gpu
TOLERANCE = {jnp.dtype(t).name: v for t, v in _TOL.items()}

SHAPES = {name: LLAMA_SHAPES[f"llama3-8b/{name}"] for name in ("qkv", "o", "gate_up", "down")}
SHAPES["odd"] = (2064, 1408)  # 129 tiles of 16 rows, 11 groups of 128 (22 of 64)
MS = (1, 3, 16, 33)
CASES = [(dt, g, fmt) for dt in ("bfloat16", "float16") for g in (64, 128)
         for fmt in ("any4", "int4")]
# every shape, M, dtype, group size and format at least once, with half the compiles
SUBSET = [("bfloat16", 128, "any4"), ("float16", 64, "int4")]
CUDA_KERNELS = ("unit_lane", "scaled", "unit_pair")  # tuning.DEFAULT_CUDA_KERNEL first
PALLAS_VARIANTS = ("select", "select+post", "gather", "gather+post", "pair+post")


def _ids(params):
    return "-".join(str(p) for p in params)


def _seed(*params) -> int:
    """A seed per case, the same in every process (unlike hash()), new for every case."""
    return zlib.crc32(_ids(params).encode())


def _poison(shape, dtype) -> None:
    """Fill free device memory of the output's size with NaN: the allocator hands the freed
    block to the next buffer of that size, so unwritten output elements read as NaN."""
    a = jnp.full(shape, jnp.nan, dtype)
    a.block_until_ready()
    a.delete()


def _check(fn, shape, dtype, g, fmt, seed, *, exact_identity=True):
    """fn(x, qw) for each M in MS: every element finite, within one ulp-scale of x @ W.T (W
    the dequantized weight rounded to x's dtype, product in float32), within the reference's
    tolerance; identity rows return W (exactly, or within one ulp where `exact_identity` is
    False: a post-scale multiply-add that Triton may fuse)."""
    n, k = SHAPES[shape]
    dtype = jnp.dtype(dtype)
    key = jax.random.key(seed)
    qw = random_qweight(jax.random.fold_in(key, 0), n, k, fmt=fmt, group_size=g, dtype=dtype)
    w = qw.dequantize(dtype).astype(jnp.float32)
    eps = float(jnp.finfo(dtype).eps)
    f = jax.jit(fn)
    errors = []
    for m in MS:
        x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(dtype)
        want = jnp.matmul(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
        ref = lut_matmul_reference(x, qw).astype(jnp.float32)
        _poison((m, n), dtype)
        y = f(x, qw).astype(jnp.float32)
        assert y.shape == (m, n)
        bad = int(jnp.sum(~jnp.isfinite(y)))
        assert bad == 0, f"M={m}: {bad} of {m * n} outputs not finite (unwritten?)"
        err = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
        err_ref = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        errors.append((m, err, err_ref))
        assert err < 2 * eps and err_ref < TOLERANCE[dtype.name], (seed, errors)
    eye = jnp.eye(64, k, dtype=dtype)
    _poison((64, n), dtype)
    yi = np.asarray(f(eye, qw).astype(jnp.float32))
    wt = np.asarray(w[:, :64].T)
    if exact_identity:
        np.testing.assert_array_equal(yi, wt)
    else:
        np.testing.assert_allclose(yi, wt, rtol=eps, atol=0)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype, g, fmt", CASES, ids=[_ids(c) for c in CASES])
def test_cuda(kernel, shape, dtype, g, fmt):
    from any4_jax.kernels.cuda_ffi import TARGET, lut_matmul_cuda

    n, k = SHAPES[shape]
    fn = lambda x, q: lut_matmul_cuda(x, q, kernel=kernel)  # the layout converted in the call
    qw = random_qweight(jax.random.key(0), n, k, fmt=fmt, group_size=g, dtype=jnp.dtype(dtype))
    assert TARGET in jax.jit(fn).lower(jnp.ones((1, k), dtype), qw).as_text()  # no fallback
    _check(fn, shape, dtype, g, fmt, _seed(kernel, shape, dtype, g, fmt))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype, g, fmt", CASES, ids=[_ids(c) for c in CASES])
def test_pallas_configured(shape, dtype, g, fmt):
    from any4_jax.kernels.pallas_gpu import NAME

    n, k = SHAPES[shape]
    qw = random_qweight(jax.random.key(0), n, k, fmt=fmt, group_size=g, dtype=jnp.dtype(dtype))
    fn = lambda x, q: lut_matmul(x, q, implementation="pallas")
    assert NAME in jax.jit(fn).lower(jnp.ones((1, k), dtype), qw).as_text()
    _check(fn, shape, dtype, g, fmt, _seed("pallas", shape, dtype, g, fmt),
           exact_identity=False)


@pytest.mark.parametrize("variant", PALLAS_VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype, g, fmt", SUBSET, ids=[_ids(c) for c in SUBSET])
def test_pallas_variant(variant, shape, dtype, g, fmt):
    from any4_jax.kernels.pallas_gpu import VARIANTS, lut_matmul_pallas, pair_table

    v = VARIANTS[variant]
    pairs = v["lookup"] == "pair"
    fn = lambda x, q: lut_matmul_pallas(x, q, pairs=pair_table(q.lut) if pairs else None, **v)
    _check(fn, shape, dtype, g, fmt, _seed(variant, shape, dtype, g, fmt),
           exact_identity=not v["post_scale"])
