"""The CUDA LUT GEMM: its weight layout and data flow on CPU (emulated from the prepared
arrays), the compile check, and the GPU runs (marker `gpu`)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.kernels import can_use, lut_matmul
from any4_jax.kernels.cuda_layout import (
    emulate,
    layout_reasons,
    prepare_cuda,
    unprepare_codes,
)
from any4_jax.kernels.reference import lut_matmul_reference
from any4_jax.quant.qweight import random_qweight, unpack_codes
from any4_jax.shapes import LLAMA_SHAPES
from tests.kernels.base import TOLERANCE, LutMatmulBase, make_qweight


@pytest.mark.parametrize("n, k, g", [(16, 32, 32), (48, 128, 64), (64, 512, 256)])
def test_layout_round_trip_and_fragment_positions(rng, n, k, g):
    qw = make_qweight(rng, n, k, g=g)
    cw = prepare_cuda(qw)
    assert cw.codes.shape == (n // 16, k // 32, 32, 2) and cw.codes.dtype == jnp.uint32
    codes = np.asarray(unpack_codes(qw.codes))
    np.testing.assert_array_equal(unprepare_codes(cw.codes, n, k), codes)
    # spot-check the documented formula: tile 0, chunk 0, lane 5 (g=1, t=1), step 1, nibble 6
    word = int(np.asarray(cw.codes)[0, 0, 5, 1])
    assert (word >> 24) & 0xF == codes[1 + 8, 16 + 2 + 0 + 8]


@pytest.mark.parametrize("fmt", ["any4", "int4", "nf4", "int3"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_emulated_kernel_matches_reference(rng, fmt, dtype):
    qw = make_qweight(rng, 64, 256, fmt=fmt, g=64, dtype=dtype)
    cw = prepare_cuda(qw)
    assert (cw.int_offset >= 0) == fmt.startswith("int")
    x = jnp.asarray(rng.standard_normal((5, 256)), dtype)
    ref = np.asarray(lut_matmul_reference(x, qw).astype(jnp.float32))
    got = emulate(x, cw)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < TOLERANCE[dtype]
    # identity activations: the dequantized weight exactly (after rounding to x's dtype)
    eye = jnp.eye(256, dtype=dtype)
    w = np.asarray(qw.dequantize(dtype).astype(jnp.float32))
    np.testing.assert_array_equal(emulate(eye, cw), w.T)


@pytest.mark.parametrize("fmt", ["any4", "int4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("g", [32, 128])
def test_post_scale_arithmetic_is_within_one_ulp_of_the_rounded_weight_product(rng, fmt, dtype,
                                                                               g):
    """The unit kernels' arithmetic (raw table values into the MMA, s * sum(v x) + z * sum(x)
    per group, the weight never rounded) against what the GPU tests compare with: x @ W.T with
    W rounded to x's dtype. The difference is that rounding: under the tests' one-ulp bound.
    Identity activations give the dequantized weight exactly."""
    k = 1024
    qw = make_qweight(rng, 64, k, fmt=fmt, g=g, dtype=dtype)
    cw = prepare_cuda(qw)
    x = jnp.asarray(rng.standard_normal((16, k)), dtype)
    got = emulate(x, cw, post_scale=True)
    want = emulate(x, cw)  # the rounded weight's product, float64 sums
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < err < 0.5 * float(jnp.finfo(dtype).eps), err
    ref = np.asarray(lut_matmul_reference(x, qw).astype(jnp.float32))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < TOLERANCE[dtype]
    eye = jnp.eye(64, k, dtype=dtype)
    w = np.asarray(qw.dequantize(dtype).astype(jnp.float32))
    out = jnp.asarray(emulate(eye, cw, post_scale=True)).astype(dtype).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), w[:, :64].T)


def test_cuda_kernel_choice(monkeypatch, rng):
    from any4_jax.kernels import cuda_ffi, tuning

    monkeypatch.delenv("ANY4_JAX_CUDA_KERNEL", raising=False)
    assert tuning.DEFAULT_CUDA_KERNEL in cuda_ffi.KERNELS
    assert cuda_ffi.default_kernel() == tuning.DEFAULT_CUDA_KERNEL
    monkeypatch.setenv("ANY4_JAX_CUDA_KERNEL", "scaled")
    assert cuda_ffi.default_kernel() == "scaled"
    monkeypatch.setenv("ANY4_JAX_CUDA_KERNEL", "fast")
    with pytest.raises(ValueError, match="ANY4_JAX_CUDA_KERNEL='fast': set it to one of "
                                         "scaled, unit_pair, unit_lane"):
        cuda_ffi.default_kernel()
    monkeypatch.delenv("ANY4_JAX_CUDA_KERNEL")
    # the names' order is the FFI attribute's value: ffi_kernels' enum Kernel
    with open(os.path.join(ROOT, "ffi_kernels", "lut_gemm.cuh")) as fh:
        src = fh.read()
    enum = re.search(r"enum Kernel : int \{([^}]*)\}", src).group(1)
    values = {re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(): int(v)
              for name, v in re.findall(r"kKernel(\w+) = (\d+)", enum)}
    assert values == {name: i for i, name in enumerate(cuda_ffi.KERNELS)}
    qw = make_qweight(rng, 32, 128, g=32)
    with pytest.raises(ValueError, match="kernel='unit'; choose one of scaled, unit_pair"):
        cuda_ffi.lut_matmul_cuda(jnp.ones((1, 128), jnp.bfloat16), qw, kernel="unit")


@pytest.mark.parametrize("wdt, tdt", [(jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16),
                                      (jnp.float32, jnp.float32)])
def test_prepared_tables_keep_16bit_dtypes_and_emulate_with_bf16_activations(rng, wdt, tdt):
    qw = make_qweight(rng, 32, 128, g=32, dtype=wdt)
    cw = prepare_cuda(qw)
    assert cw.lut.dtype == cw.scales.dtype == cw.zeros.dtype == tdt
    assert cw.nbytes() == qw.nbytes() if wdt != jnp.float32 else cw.nbytes() > 0
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    ref = np.asarray(lut_matmul_reference(x, qw).astype(jnp.float32))
    got = emulate(x, cw)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < TOLERANCE[jnp.bfloat16]


def test_layout_errors_and_declines(rng):
    assert layout_reasons(40, 64, 32) == ["N=40 is not a multiple of 16"]
    assert "group_size=16" in " ".join(layout_reasons(32, 64, 16))
    qw = make_qweight(rng, 32, 128, g=32)
    reasons = can_use("cuda", jnp.ones((2, 128), jnp.float32), qw)
    assert any("bfloat16 or float16" in r for r in reasons)
    if jax.default_backend() != "gpu":
        assert any("needs a CUDA GPU" in r for r in reasons)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
class TestCudaGpu(LutMatmulBase):
    implementation = "cuda"

    def run(self, x, qw):
        if x.dtype == jnp.float32:  # the kernel takes 16-bit activations
            pytest.skip("float32 activations are not a CUDA kernel input")
        return lut_matmul(x, qw, implementation="cuda")


@pytest.mark.gpu
def test_gpu_float32_tables_with_16bit_activations(rng):
    """A float32 model's tables stay float32 in the layout (the kernel's table_kind path)."""
    from any4_jax.kernels.cuda_ffi import lut_matmul_cuda

    qw = make_qweight(rng, 64, 512, g=64, dtype=jnp.float32)
    cw = prepare_cuda(qw)
    assert cw.scales.dtype == jnp.float32
    for dtype in (jnp.bfloat16, jnp.float16):
        x = jnp.asarray(rng.standard_normal((5, 512)), dtype)
        y = np.asarray(lut_matmul_cuda(x, cw).astype(jnp.float32))
        np.testing.assert_allclose(y, emulate(x, cw), rtol=0, atol=TOLERANCE[dtype] *
                                   float(np.abs(emulate(x, cw)).max()))


GPU_CASES = ([(name, "any4", g, dt) for name in LLAMA_SHAPES for g in (32, 64, 128, 256)
              for dt in (jnp.bfloat16, jnp.float16)]
             + [(name, "int4", 128, jnp.bfloat16) for name in LLAMA_SHAPES])


def _check_llama_shape(rng, name, fmt, g, dtype, ms, kernel=None):
    """`kernel`'s output on one Llama shape for each M in `ms` against x @ W.T in float32 with
    W the dequantized weight rounded to x's dtype, and identity rows (M = 64: four batch
    blocks) against the dequantized weight exactly."""
    from any4_jax.kernels.cuda_ffi import TARGET, lut_matmul_cuda

    n, k = LLAMA_SHAPES[name]
    # random contents made on the device: k-means on a 70B matrix would cost more than the check
    qw = random_qweight(jax.random.key(int(rng.integers(2**31))), n, k, fmt=fmt, group_size=g,
                        dtype=dtype)
    cw = prepare_cuda(qw)
    assert (cw.int_offset >= 0) == (fmt == "int4")
    w = qw.dequantize(dtype).astype(jnp.float32)
    f = jax.jit(lambda x, cw: lut_matmul_cuda(x, cw, kernel=kernel))
    eps = float(jnp.finfo(dtype).eps)
    for m in ms:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
        if m == ms[0]:
            assert TARGET in f.lower(x, cw).as_text()  # the FFI kernel runs, not a fallback
        y = f(x, cw).astype(jnp.float32)
        want = jnp.matmul(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
        err = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
        assert err < eps, (kernel, m, err)
        ref = lut_matmul_reference(x, qw).astype(jnp.float32)
        assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < TOLERANCE[dtype]
    eye = jnp.eye(64, k, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(f(eye, cw).astype(jnp.float32)),
                                  np.asarray(w[:, :64].T))


@pytest.mark.gpu
@pytest.mark.parametrize("name, fmt, g, dtype", GPU_CASES)
def test_gpu_llama_shapes(rng, name, fmt, g, dtype):
    """Every Llama shape with the default kernel, M in {1, 2, 3, 4, 8, 16, 33}: the only error
    left against the rounded-weight product is the final rounding to x's dtype (and, for the
    post-scale kernels, the weight rounding they skip), so the bound is one ulp, far tighter
    than the reference tolerance. One weight per case, so the suite fits a GPU session."""
    _check_llama_shape(rng, name, fmt, g, dtype, (1, 2, 3, 4, 8, 16, 33))


# Each of the library's kernels on both tile regimes (N = 14336: many 16-row tiles per SM;
# N = 4096: few), every unit length (g / 32 = 1, 2, 4 chunks), f16 and the integer grid.
KERNEL_CASES = [("llama3-8b/gate_up", "any4", g, jnp.bfloat16) for g in (32, 64, 128)] + [
    ("llama3-8b/o", "any4", 128, jnp.float16), ("llama3-8b/down", "int4", 128, jnp.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["scaled", "unit_pair", "unit_lane"])
@pytest.mark.parametrize("name, fmt, g, dtype", KERNEL_CASES)
def test_gpu_each_kernel(rng, kernel, name, fmt, g, dtype):
    _check_llama_shape(rng, name, fmt, g, dtype, (1, 3, 16, 33), kernel=kernel)


@pytest.mark.parametrize("fmt, wdt", [("any4", jnp.bfloat16), ("int4", jnp.float16),
                                      ("any4", jnp.float32)])
def test_ffi_call_exports_for_cuda_from_this_machine(rng, fmt, wdt):
    """The Python side of the FFI call (operands, dtypes, attributes, batch reshapes) lowered
    for the CUDA platform without a GPU: the custom call, its operand types and attributes."""
    from jax import export

    from any4_jax.kernels.cuda_ffi import (
        KERNELS,
        TARGET,
        _register,
        default_kernel,
        lut_matmul_cuda,
    )

    why = _register()
    if why:
        pytest.skip(why)
    qw = make_qweight(rng, 48, 256, fmt=fmt, g=64, dtype=wdt)
    cw = prepare_cuda(qw)
    x = jnp.ones((2, 3, 256), jnp.bfloat16)
    exp = export.export(jax.jit(lut_matmul_cuda), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TARGET)])(x, cw)
    text = exp.mlir_module()
    assert f"@{TARGET}" in text or f'"{TARGET}"' in text
    assert "group_size = 64" in text and f"int_offset = {cw.int_offset}" in text
    assert f"kernel = {KERNELS.index(default_kernel())}" in text
    for i, kernel in enumerate(KERNELS):  # each kernel by its index in ffi_kernels' enum
        exp_k = export.export(jax.jit(lambda x, cw, kernel=kernel: lut_matmul_cuda(
            x, cw, kernel=kernel)), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TARGET)])(x, cw)
        assert f"kernel = {i} " in exp_k.mlir_module()
    tdt = {jnp.bfloat16: "bf16", jnp.float16: "f16", jnp.float32: "f32"}[wdt]
    assert f"tensor<48x16x{tdt}>" in text and "tensor<3x8x32x2xui32>" in text
    assert exp.out_avals[0].shape == (2, 3, 48) and exp.out_avals[0].dtype == jnp.bfloat16


