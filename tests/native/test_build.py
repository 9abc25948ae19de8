"""Building the native libraries: the CUDA sources compile (where nvcc is), the build's
identity covers every header, CMake configures without nvcc, and the build tool's errors."""

import os
import re
import shutil
import subprocess

import pytest

from any4_jax.native import build_cpu, build_cuda, sources

ROOT = sources.ROOT


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90a():
    assert build_cuda.main(["--check"]) == 0


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


def test_build_identity_covers_every_kernel_header():
    """The library's staleness check hashes CUDA_HEADERS (native/sources.py) and CMake hashes
    ANY4_CUDA_HEADERS: both must list every header the library can include, or an edit to one
    leaves a stale build unnoticed."""

    on_disk = sorted(f"ffi_kernels/{f}" for f in os.listdir(os.path.join(ROOT, "ffi_kernels"))
                     if f.endswith(".cuh"))
    assert sorted(sources.CUDA_HEADERS) == on_disk
    with open(os.path.join(ROOT, "CMakeLists.txt")) as fh:
        cmake = re.search(r"set\(ANY4_CUDA_HEADERS([^)]*)\)", fh.read())[1].split()
    assert sorted(cmake) == on_disk


def test_cpu_build_identity_covers_the_headers_a_source_includes(tmp_path):
    """A CPU library is rebuilt when a header it includes from its folder changes, or one that
    header includes (the LUT GEMM includes spin_pool_cpu.h), and CMake installs those headers
    beside the sources."""
    (tmp_path / "k_cpu.cc").write_text('#include <vector>\n#include "h_cpu.h"\nint f();\n')
    (tmp_path / "h_cpu.h").write_text('#pragma once\n#include "g_cpu.h"\n#include "h_cpu.h"\n')
    (tmp_path / "g_cpu.h").write_text("#pragma once\n")
    src = str(tmp_path / "k_cpu.cc")
    before = build_cpu._source_and_headers(src)
    (tmp_path / "g_cpu.h").write_text("#pragma once\n// changed\n")  # included by the header
    after = build_cpu._source_and_headers(src)
    assert after != before
    (tmp_path / "h_cpu.h").write_text('#pragma once\n#include "g_cpu.h"\n// changed\n')
    assert build_cpu._source_and_headers(src) != after
    with open(os.path.join(ROOT, "ffi_kernels", "lut_gemm_cpu.cc")) as fh:
        included = re.findall(r'^#include "([^"/]+)"', fh.read(), flags=re.M)
    assert included and all(name.endswith("_cpu.h") for name in included)
    with open(os.path.join(ROOT, "CMakeLists.txt")) as fh:
        assert "ffi_kernels/*_cpu.h" in fh.read()


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


def test_build_cuda_outside_a_source_checkout_says_so(monkeypatch, capsys):
    if shutil.which("nvcc") is None:
        pytest.skip("without nvcc build_cuda stops earlier, with its own message")
    monkeypatch.setattr(sources, "ROOT", "/nonexistent")
    assert build_cuda.main(["--check"]) == 2
    assert "not a source checkout" in capsys.readouterr().err
