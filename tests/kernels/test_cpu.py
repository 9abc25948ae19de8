"""The CPU LUT GEMM (`implementation="cpu"`): the shared battery against the reference, each
instruction set it has a path for (built here with the wider ones turned off), dispatch."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.kernels import can_use, lut_matmul, pick
from any4_jax.kernels import cpu as cpu_kernel
from any4_jax.kernels.reference import lut_matmul_reference
from any4_jax.native import loader
from tests.kernels.base import TOLERANCE, LutMatmulBase, make_qweight

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU kernel runs on the CPU"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="no C++ compiler to build the CPU kernel"),
]


class TestCpu(LutMatmulBase):
    implementation = "cpu"

    def run(self, x, qw):
        return cpu_kernel.lut_matmul_cpu(x, qw)  # any M (lut_matmul declines above MAX_ROWS)


# The same source built with the wider instruction sets switched off: the AVX2 and scalar
# paths run here too, whatever this CPU has.
VARIANTS = {"avx2": ("-mno-avx512f",), "scalar": ("-mno-avx512f", "-mno-avx2")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    loaded = loader.load_cpu("lut_gemm_cpu", VARIANTS[request.param])
    assert loaded.lib is not None, loaded.reason
    lib = loaded.lib
    target = f"{cpu_kernel.TARGET}_{request.param}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.Any4LutGemmCpu), platform="cpu")
    assert lib.Any4LutGemmCpuVectorWidth() == {"avx2": 8, "scalar": 0}[request.param]
    return target


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("g, k", [(32, 256), (64, 192), (24, 96)])  # 24: not a vector multiple
def test_instruction_set_variants(rng, variant, dtype, g, k):
    qw = make_qweight(rng, 40, k, fmt="any4", g=g, dtype=dtype)
    for m in (1, 5):
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        y = cpu_kernel._call(x, qw.codes, qw.lut, qw.scales, qw.zeros, group_size=g,
                             target=variant).astype(dtype)
        ref = lut_matmul_reference(x, qw)
        err = float(jnp.linalg.norm((y - ref).astype(jnp.float32))
                    / jnp.linalg.norm(ref.astype(jnp.float32)))
        assert err < TOLERANCE[dtype], (m, err)
    w = np.asarray(qw.dequantize(dtype).astype(jnp.float32))
    for rows in (slice(0, 7), slice(0, 1), slice(1, 3)):  # 1-2 rows: the decode blocks
        eye = jnp.eye(k, dtype=dtype)[rows]
        y = cpu_kernel._call(eye, qw.codes, qw.lut, qw.scales, qw.zeros, group_size=g,
                             target=variant)
        np.testing.assert_array_equal(np.asarray(y.astype(dtype).astype(jnp.float32)),
                                      w[:, rows].T)


@pytest.mark.parametrize("x_dtype, w_dtype", [(jnp.float32, jnp.float32),
                                              (jnp.bfloat16, jnp.float32),
                                              (jnp.float16, jnp.float32),
                                              (jnp.float32, jnp.bfloat16),
                                              (jnp.float16, jnp.float16)])
@pytest.mark.parametrize("g, k", [(64, 256), (128, 256), (32, 96)])
def test_every_vector_path_gives_the_dequantized_weight_bit_for_bit(rng, x_dtype, w_dtype, g, k):
    """Rows of the identity as x pick single weights out: the native build's paths (64-code
    steps when g % 64 == 0, 16-code steps otherwise; one, two and 3+ rows of x) look the
    weight up from the table scaled per group, which must be the reference's dequantized
    weight rounded to x's dtype, bit for bit (bf16 x with bf16 tables is the post-scaled
    vdpbf16ps path, tested against its exact sum instead)."""
    qw = make_qweight(rng, 40, k, fmt="any4", g=g, dtype=w_dtype)
    w = np.asarray(qw.dequantize(x_dtype).astype(jnp.float32))
    for rows in (slice(0, 1), slice(5, 7), slice(9, 14)):
        eye = jnp.eye(k, dtype=x_dtype)[rows]
        y = cpu_kernel.lut_matmul_cpu(eye, qw).astype(x_dtype).astype(jnp.float32)
        np.testing.assert_array_equal(np.asarray(y), w[:, rows].T)


def test_dispatch_small_m_to_the_kernel_and_large_m_to_the_reference(rng):
    qw = make_qweight(rng, 64, 256, g=64, dtype=jnp.float32)
    small = jnp.ones((2, 3, 256), jnp.float32)  # M = 6
    assert pick(small, qw) == "cpu"
    big = jnp.ones((cpu_kernel.MAX_ROWS + 1, 256), jnp.float32)
    reasons = can_use("cpu", big, qw)
    assert any("dequantize-then-dense" in r for r in reasons)
    assert pick(big, qw) == "xla"
    # the automatic choice agrees with the reference within the dtype's tolerance
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    np.testing.assert_allclose(lut_matmul(x, qw), lut_matmul_reference(x, qw), rtol=1e-5,
                               atol=1e-5)


def test_turned_off_by_environment(rng, monkeypatch):
    monkeypatch.setenv("ANY4_JAX_CPU_KERNEL", "0")
    qw = make_qweight(rng, 32, 128, g=32, dtype=jnp.float32)
    x = jnp.ones((1, 128), jnp.float32)
    assert any("ANY4_JAX_CPU_KERNEL=0" in r for r in can_use("cpu", x, qw))
    assert pick(x, qw) == "xla"


@pytest.mark.parametrize("spin_us", [None, "0"])
def test_many_independent_calls_in_one_jit_finish(spin_us):
    """XLA:CPU runs independent custom calls at once on its intra-op threads; each call offers
    its rows to the same helper threads (spin_pool_cpu.h; they take only the newest call's).
    A call waits only for rows another thread has claimed, never for a helper, so this
    finishes in about a second (waiting on queued tasks livelocked this very case), with the
    helpers spinning between calls (default) or asleep (ANY4_JAX_CPU_SPIN_US=0). In a
    subprocess with a timeout, so a regression fails instead of hanging CI."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from tests.kernels.base import make_qweight
        from any4_jax.kernels.cpu import lut_matmul_cpu
        rng = np.random.default_rng(0)
        qw = make_qweight(rng, 2048, 2048, g=128, dtype=jnp.float32)
        qws = [jax.tree.map(lambda a: a + 0 if a.dtype != jnp.uint8 else a ^ 0, qw)
               for _ in range(64)]  # 64 copies: one call each, all independent
        x = jnp.asarray(rng.standard_normal((1, 2048)), jnp.float32)
        f = jax.jit(lambda x, ws: sum(lut_matmul_cpu(x, w).sum() for w in ws))
        for _ in range(3):
            total = float(f(x, qws))
        want = 64 * float(lut_matmul_cpu(x, qw).sum())
        assert abs(total - want) <= 1e-4 * (1 + abs(want)), (total, want)
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one host device, as users run it (conftest asks for 8)
    env.pop("ANY4_JAX_CPU_SPIN_US", None)
    if spin_us is not None:
        env["ANY4_JAX_CPU_SPIN_US"] = spin_us
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=root, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("target", [None, "avx2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_a_rows_result_does_not_depend_on_its_place_in_the_call(rng, target, dtype, g):
    """Rows of x go four at a time and the rest in a smaller block, all summed in the same
    order, so y[:m] of a call with m rows is bit for bit y[:m] of a call with 9 (m >= 3);
    calls of one or two rows (decoding: more chains per row; post-scaled in bf16 through
    vdpbf16ps) agree with each other bit for bit and with the wider calls within the dtype's
    tolerance."""
    if target is None:
        # registered when the library is first used; under xdist this test may be the
        # first user in its worker
        assert cpu_kernel._register() is None
    else:
        lib = loader.load_cpu("lut_gemm_cpu", VARIANTS[target]).lib
        target = f"{cpu_kernel.TARGET}_{target}_inv"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.Any4LutGemmCpu),
                                    platform="cpu")
    qw = make_qweight(rng, 24, 256, fmt="any4", g=g, dtype=dtype)
    x = jnp.asarray(rng.standard_normal((9, 256)), dtype)
    call = lambda xs: np.asarray(cpu_kernel._call(
        xs, qw.codes, qw.lut, qw.scales, qw.zeros, group_size=g,
        **({} if target is None else {"target": target})))
    full = call(x)
    for m in range(3, 9):
        np.testing.assert_array_equal(call(x[:m]), full[:m])
    one = np.stack([call(x[i:i + 1])[0] for i in range(2)])
    np.testing.assert_array_equal(call(x[:2]), one)
    rel = np.linalg.norm(one - full[:2]) / np.linalg.norm(full[:2])
    assert rel < (1e-6 if dtype == jnp.float32 else 4e-3), rel


def _dot_bf16_target(flags: tuple[str, ...], name: str):
    """(FFI target, whether the library has the vdpbf16ps path) of the source built with
    `flags`, registered under `name`."""
    lib = loader.load_cpu("lut_gemm_cpu", flags).lib
    assert lib is not None
    target = f"{cpu_kernel.TARGET}_{name}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.Any4LutGemmCpu), platform="cpu")
    return target, bool(lib.Any4LutGemmCpuDotBf16())


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("g, k", [(64, 192), (128, 512), (256, 256), (128, 8448)])
def test_the_vdpbf16ps_path_against_its_exact_sum_and_the_reference(rng, m, g, k):
    """bf16 x, bf16 tables/scales/zeros, 1, 2 and 5 rows (a block of 4 and one): the
    AVX512_BF16 path (where this CPU has it; the AVX-512 path without it is built beside it
    and checked the same way). Every product lut[c] * x is exact, so the result is the
    post-scaled sum
    sum_g s_g sum_k lut[c] x + z_g sum_k x computed in float64, up to float32 summation
    (which catches any weight paired with the wrong x); and the reference (the weight
    rounded to bf16 first) within bf16's tolerance. 8448-wide rows take the two-rows-of-w
    blocks (x over 16 KB), 41 rows leave one row to the one-row block."""
    native, has = _dot_bf16_target((), "dotbf16_native")
    flags = ("-mno-avx512bf16",)
    plain, has_plain = _dot_bf16_target(flags, "dotbf16_off")
    assert not has_plain
    if not has:
        pytest.skip("this CPU has no AVX512_BF16: the vdpbf16ps path is not built")
    qw = make_qweight(rng, 41, k, g=g, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    codes = np.asarray(qw.codes)
    c = np.stack([codes & 0xF, codes >> 4], -1).reshape(41, k)
    t = np.asarray(qw.lut.astype(jnp.float32), np.float64)
    s = np.asarray(qw.scales.astype(jnp.float32), np.float64)
    z = np.asarray(qw.zeros.astype(jnp.float32), np.float64)
    v = np.take_along_axis(t, c, 1).reshape(41, k // g, g)  # lut[c] per group
    xg = x64.reshape(m, k // g, g)
    exact = (np.einsum("ngk,mgk->mng", v, xg) * s + z * xg.sum(-1)[:, None, :]).sum(-1)
    for target in (native, plain):
        y = np.asarray(cpu_kernel._call(x, qw.codes, qw.lut, qw.scales, qw.zeros,
                                        group_size=g, target=target), np.float64)
        if target == native:  # without it, the reference's weights (rounded to bf16)
            assert np.abs(y - exact).max() <= 1e-5 * np.abs(exact).max(), target
        ref = np.asarray(lut_matmul_reference(x, qw).astype(jnp.float32), np.float64)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < TOLERANCE[jnp.bfloat16]
        # without the first row of w, every other row pairs with another neighbour: same bits
        rest = cpu_kernel._call(x, qw.codes[1:], qw.lut[1:], qw.scales[1:], qw.zeros[1:],
                                group_size=g, target=target)
        np.testing.assert_array_equal(np.asarray(rest, np.float64), y[:, 1:])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_one_call_for_several_weights_is_each_weights_own_call(rng, dtype, m):
    """`lut_matmul_cpu_many`: weights of one K (q/k/v-like: 96, 32, 32 rows; gate/up-like:
    200 rows; 1024 wide: five or more chunks, some crossing into the next weight's rows, split
    over the threads) in one kernel call give each weight's own call bit for bit; a weight of
    no rows gives an empty result; weights that differ in K, group size or table dtype, and
    no weights at all, are refused."""
    qws = [make_qweight(rng, n, 1024, fmt="any4", g=64, dtype=dtype) for n in (96, 32, 32, 200)]
    x = jnp.asarray(rng.standard_normal((m, 1024)), dtype)
    many = jax.jit(cpu_kernel.lut_matmul_cpu_many)(x, qws)
    assert len(many) == 4
    for y, qw in zip(many, qws, strict=True):
        assert y.shape == (m, qw.shape[0]) and y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32),
                                      np.asarray(cpu_kernel.lut_matmul_cpu(x, qw), np.float32))
    q = qws[1]
    empty = dataclasses.replace(q, codes=q.codes[:0], lut=q.lut[:0], scales=q.scales[:0],
                                zeros=q.zeros[:0], shape=(0, 1024))
    ys = cpu_kernel.lut_matmul_cpu_many(x, [qws[0], empty, qws[2]])
    assert ys[1].shape == (m, 0)
    np.testing.assert_array_equal(np.asarray(ys[2], np.float32), np.asarray(many[2], np.float32))
    other = [qws[0], make_qweight(rng, 16, 1024, fmt="any4", g=32, dtype=dtype)]
    with pytest.raises(ValueError, match="share K, the group size"):
        cpu_kernel.lut_matmul_cpu_many(x, other)
    with pytest.raises(ValueError, match="at least one weight"):
        cpu_kernel.lut_matmul_cpu_many(x, [])


def test_odd_group_sizes_are_declined_and_refused(rng):
    """A byte holds two codes, so with an odd group size they would straddle two groups: the
    kernel declines (the reference runs it, exactly) and the raw call is an error."""
    qw = make_qweight(rng, 8, 6, fmt="any4", g=3, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 6)), jnp.float32)
    reasons = can_use("cpu", x, qw)
    assert any("group size 3 is odd" in r for r in reasons), reasons
    assert pick(x, qw) != "cpu"
    with pytest.raises(Exception, match="group size must be even"):
        cpu_kernel._call(x, qw.codes, qw.lut, qw.scales, qw.zeros, group_size=3).block_until_ready()
