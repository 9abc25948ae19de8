"""The CUDA LUT GEMM: its weight layout and data flow on CPU (emulated from the prepared
arrays), the compile check, and the GPU runs (marker `gpu`)."""

import ctypes
import os
import re
import shutil
import subprocess

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
from tests.kernels.test_lut_matmul import TOLERANCE, LutMatmulBase, _qweight


@pytest.mark.parametrize("n, k, g", [(16, 32, 32), (48, 128, 64), (64, 512, 256)])
def test_layout_round_trip_and_fragment_positions(rng, n, k, g):
    qw = _qweight(rng, n, k, g=g)
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
    qw = _qweight(rng, 64, 256, fmt=fmt, g=64, dtype=dtype)
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
    qw = _qweight(rng, 64, k, fmt=fmt, g=g, dtype=dtype)
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
    qw = _qweight(rng, 32, 128, g=32)
    with pytest.raises(ValueError, match="kernel='unit'; choose one of scaled, unit_pair"):
        cuda_ffi.lut_matmul_cuda(jnp.ones((1, 128), jnp.bfloat16), qw, kernel="unit")


@pytest.mark.parametrize("wdt, tdt", [(jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16),
                                      (jnp.float32, jnp.float32)])
def test_prepared_tables_keep_16bit_dtypes_and_emulate_with_bf16_activations(rng, wdt, tdt):
    qw = _qweight(rng, 32, 128, g=32, dtype=wdt)
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
    qw = _qweight(rng, 32, 128, g=32)
    reasons = can_use("cuda", jnp.ones((2, 128), jnp.float32), qw)
    assert any("bfloat16 or float16" in r for r in reasons)
    if jax.default_backend() != "gpu":
        assert any("needs a CUDA GPU" in r for r in reasons)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90a():
    from any4_jax.kernels.build_cuda import main

    assert main(["--check"]) == 0


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.slow
def test_standalone_kernel_bench_compiles(tmp_path):
    """ffi_kernels/bench/lut_gemm_bench.cu (variants, host-reference check, sanitizer target)
    is a GPU-machine tool: compiling it here keeps it in step with the kernel header. Device
    code unoptimised and to PTX only (-Xcicc -O0, code=compute_90a): the C++ and CUDA front
    end checks everything, in about half the time of a build through ptxas (the library's
    own build runs ptxas on the kernels it ships)."""
    r = subprocess.run(["nvcc", "-std=c++17", "-O1", "-Xcicc", "-O0",
                        "-gencode", "arch=compute_90a,code=compute_90a",
                        "-I", os.path.join(ROOT, "ffi_kernels"),
                        os.path.join(ROOT, "ffi_kernels", "bench", "lut_gemm_bench.cu"),
                        "-o", str(tmp_path / "lut_gemm_bench")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _fake_library(tmp_path, info: str) -> str:
    """A shared library that records `info` as its build identity (and holds no kernel)."""
    src = tmp_path / "fake.cc"
    body = 'extern "C" const char* Any4CudaBuildInfo() { return "INFO"; }\n'
    src.write_text(body.replace("INFO", info))
    out = str(tmp_path / "libfake.so")
    subprocess.run(["g++", "-shared", "-fPIC", str(src), "-o", out], check=True)
    return out


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_loader_refuses_a_stale_library_and_warns_on_another_jaxlib(tmp_path, monkeypatch):
    import jaxlib

    from any4_jax.kernels import cuda_ffi
    from any4_jax.kernels.build_cuda import source_hash

    monkeypatch.setenv("ANY4_JAX_CUDA_LIB", _fake_library(tmp_path, "sources=0123;jaxlib=0.1.0"))
    lib, why = cuda_ffi._load()
    assert lib is None and "stale" in why and "build_cuda" in why
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("ANY4_JAX_CUDA_LIB",
                       _fake_library(tmp_path / "b", f"sources={source_hash()};jaxlib=0.1.0"))
    with pytest.warns(UserWarning, match=f"jaxlib 0.1.0, this is jaxlib {jaxlib.__version__}"):
        lib, why = cuda_ffi._load()
    assert lib is not None and why is None
    monkeypatch.setenv("ANY4_JAX_CUDA_LIB", str(tmp_path / "missing.so"))
    lib, why = cuda_ffi._load()
    assert lib is None and "not built" in why and "pip install" in why


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_loader_judges_the_ffi_api_version_the_library_was_built_against(tmp_path, monkeypatch):
    """XLA refuses a handler built against a newer FFI API than its own (jax 0.12's headers under
    jax 0.10: "the handler's API version (0.5) is incompatible with the framework's API version
    (0.3)"); the loader says so before XLA does, and an older API loads without a warning."""
    import warnings

    from any4_jax.kernels import cuda_ffi
    from any4_jax.kernels.build_cuda import source_hash

    major, minor = cuda_ffi.running_ffi_api()
    for i, (api, ok) in enumerate([(f"{major}.{minor + 1}", False), (f"{major + 1}.0", False),
                                   (f"{major}.{minor}", True), (f"{major}.{minor - 1}", True)]):
        (tmp_path / str(i)).mkdir()
        monkeypatch.setenv("ANY4_JAX_CUDA_LIB", _fake_library(
            tmp_path / str(i), f"sources={source_hash()};jaxlib=9.9.9;ffi_api={api}"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a compatible API: no jaxlib-version warning
            lib, why = cuda_ffi._load()
        if ok:
            assert lib is not None and why is None, (api, why)
        else:
            assert lib is None and f"XLA FFI API {api}" in why and "refuses" in why, (api, why)
            assert f"FFI API {major}.{minor})" in why and "rebuild" in why


def test_running_ffi_api_is_the_installed_jaxlibs():
    from any4_jax.kernels import cuda_ffi

    major, minor = cuda_ffi.running_ffi_api()
    assert major == 0 and minor >= 1  # jaxlib 0.10.2: (0, 3); 0.11.2: (0, 4); 0.12: (0, 5)
    assert cuda_ffi.ffi_api_compatible(f"{major}.{minor}", (major, minor))
    assert not cuda_ffi.ffi_api_compatible(f"{major}.{minor + 1}", (major, minor))


def test_a_handler_xla_refuses_is_a_reason_not_a_crash(monkeypatch):
    """Whatever XLA says when it refuses the handler becomes the reason `can_use` reports (so
    `implementation=None` moves on to the next implementation), with the rebuild command."""
    from any4_jax.kernels import cuda_ffi

    class Lib:
        Any4LutGemm = Any4LutGemmNoCommandBuffer = ctypes.cast(1, ctypes.c_void_p)

    def refuse(*args, **kwargs):
        raise RuntimeError("INVALID_ARGUMENT: the handler's API version (0.5) is incompatible")

    monkeypatch.setattr(cuda_ffi, "_load", lambda: (Lib(), None))
    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    monkeypatch.setattr(jax.ffi, "pycapsule", lambda fn: fn)
    cuda_ffi._register.cache_clear()
    try:
        why = cuda_ffi._register()
    finally:
        cuda_ffi._register.cache_clear()
    assert why.startswith("XLA refused the CUDA library's handler (INVALID_ARGUMENT: the "
                          "handler's API version (0.5)") and "build_cuda" in why


def test_build_identity_covers_every_kernel_header():
    """The library's staleness check hashes HEADERS (build_cuda.py) and CMake hashes
    ANY4_CUDA_HEADERS: both must list every header the library can include, or an edit to one
    leaves a stale build unnoticed."""
    import re

    from any4_jax.kernels.build_cuda import HEADERS

    on_disk = sorted(f"ffi_kernels/{f}" for f in os.listdir(os.path.join(ROOT, "ffi_kernels"))
                     if f.endswith((".cuh", ".h")))
    assert sorted(HEADERS) == on_disk
    with open(os.path.join(ROOT, "CMakeLists.txt")) as fh:
        cmake = re.search(r"set\(ANY4_CUDA_HEADERS([^)]*)\)", fh.read())[1].split()
    assert sorted(cmake) == on_disk


def test_built_library_matches_the_sources():
    """A library that `pip install` (CMake) or build_cuda left behind is the one of these
    sources; in CI (nvcc present) the install has built it."""
    from any4_jax.kernels import cuda_ffi

    if not any(os.path.isfile(p) for p in cuda_ffi.library_candidates()):
        if shutil.which("nvcc") and os.environ.get("CI_EXPECT_CUDA_LIB") == "1":
            pytest.fail("nvcc is present but `pip install` built no CUDA library")
        pytest.skip("the CUDA library is not built here")
    lib, why = cuda_ffi._load()
    assert why is None, why
    info = cuda_ffi.build_info(lib)
    assert set(info) == {"sources", "jaxlib", "ffi_api"}
    assert cuda_ffi.ffi_api_compatible(info["ffi_api"], cuda_ffi.running_ffi_api()), info
    # both handlers: command-buffer compatible (the default) and launched from the host
    assert lib.Any4LutGemm and lib.Any4LutGemmNoCommandBuffer


def test_command_buffer_switch(monkeypatch):
    from any4_jax.kernels import cuda_ffi

    monkeypatch.delenv("ANY4_JAX_CUDA_COMMAND_BUFFER", raising=False)
    assert cuda_ffi.command_buffer_enabled()
    monkeypatch.setenv("ANY4_JAX_CUDA_COMMAND_BUFFER", "0")
    assert not cuda_ffi.command_buffer_enabled()
    monkeypatch.setenv("ANY4_JAX_CUDA_COMMAND_BUFFER", "no")
    with pytest.raises(ValueError, match="ANY4_JAX_CUDA_COMMAND_BUFFER='no': set it to 1"):
        cuda_ffi.command_buffer_enabled()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.parametrize("mode", ["OFF", "AUTO", "ON"])
def test_cmake_without_nvcc(tmp_path, mode):
    """CPU-only installs: AUTO and OFF configure without CUDA; ON asks for nvcc."""
    path = [d for d in os.environ["PATH"].split(os.pathsep)
            if not os.path.exists(os.path.join(d, "nvcc"))]
    env = dict(os.environ, PATH=os.pathsep.join(path))
    env.pop("CUDACXX", None)
    r = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "b"),
                        f"-DANY4_JAX_CUDA={mode}"],
                       env=env, capture_output=True, text=True)
    if mode == "ON":
        assert r.returncode != 0 and "ANY4_JAX_CUDA=ON but no CUDA compiler" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert "CUDA kernels not built" in r.stdout


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

    qw = _qweight(rng, 64, 512, g=64, dtype=jnp.float32)
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
    qw = _qweight(rng, 48, 256, fmt=fmt, g=64, dtype=wdt)
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


def test_build_cuda_outside_a_source_checkout_says_so(monkeypatch, capsys):
    from any4_jax.kernels import build_cuda

    if shutil.which("nvcc") is None:
        pytest.skip("without nvcc build_cuda stops earlier, with its own message")
    monkeypatch.setattr(build_cuda, "ROOT", "/nonexistent")
    assert build_cuda.main(["--check"]) == 2
    assert "not a source checkout" in capsys.readouterr().err
