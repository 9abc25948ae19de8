"""The one loader of our native libraries: the CUDA library's identity checks (stale
sources, another jaxlib, a newer FFI API), XLA refusing a handler, and the settings it reads."""

import ctypes
import os
import shutil
import subprocess

import jax
import pytest

from any4_jax import settings
from any4_jax.kernels import cuda_ffi
from any4_jax.native import loader, sources


def _load_cuda():
    loaded = loader.load_cuda()
    return loaded.lib, loaded.reason


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

    monkeypatch.setenv("ANY4_JAX_CUDA_LIB", _fake_library(tmp_path, "sources=0123;jaxlib=0.1.0"))
    lib, why = _load_cuda()
    assert lib is None and "stale" in why and "build_cuda" in why
    (tmp_path / "b").mkdir()
    info = f"sources={sources.source_hash()};jaxlib=0.1.0"
    monkeypatch.setenv("ANY4_JAX_CUDA_LIB", _fake_library(tmp_path / "b", info))
    with pytest.warns(UserWarning, match=f"jaxlib 0.1.0, this is jaxlib {jaxlib.__version__}"):
        lib, why = _load_cuda()
    assert lib is not None and why is None
    monkeypatch.setenv("ANY4_JAX_CUDA_LIB", str(tmp_path / "missing.so"))
    lib, why = _load_cuda()
    assert lib is None and "not built" in why and "pip install" in why


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_loader_judges_the_ffi_api_version_the_library_was_built_against(tmp_path, monkeypatch):
    """XLA refuses a handler built against a newer FFI API than its own (jax 0.12's headers under
    jax 0.10: "the handler's API version (0.5) is incompatible with the framework's API version
    (0.3)"); the loader says so before XLA does, and an older API loads without a warning."""
    import warnings

    major, minor = loader.running_ffi_api()
    for i, (api, ok) in enumerate([(f"{major}.{minor + 1}", False), (f"{major + 1}.0", False),
                                   (f"{major}.{minor}", True), (f"{major}.{minor - 1}", True)]):
        (tmp_path / str(i)).mkdir()
        monkeypatch.setenv("ANY4_JAX_CUDA_LIB", _fake_library(
            tmp_path / str(i), f"sources={sources.source_hash()};jaxlib=9.9.9;ffi_api={api}"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a compatible API: no jaxlib-version warning
            lib, why = _load_cuda()
        if ok:
            assert lib is not None and why is None, (api, why)
        else:
            assert lib is None and f"XLA FFI API {api}" in why and "refuses" in why, (api, why)
            assert f"FFI API {major}.{minor})" in why and "rebuild" in why


def test_running_ffi_api_is_the_installed_jaxlibs():
    major, minor = loader.running_ffi_api()
    assert major == 0 and minor >= 1  # jaxlib 0.10.2: (0, 3); 0.11.2: (0, 4); 0.12: (0, 5)
    assert loader.ffi_api_compatible(f"{major}.{minor}", (major, minor))
    assert not loader.ffi_api_compatible(f"{major}.{minor + 1}", (major, minor))


def test_a_handler_xla_refuses_is_a_reason_not_a_crash(monkeypatch):
    """Whatever XLA says when it refuses the handler becomes the reason `can_use` reports (so
    `implementation=None` moves on to the next implementation), with the rebuild command."""
    class Lib:
        Any4LutGemm = Any4LutGemmNoCommandBuffer = ctypes.cast(1, ctypes.c_void_p)

    def refuse(*args, **kwargs):
        raise RuntimeError("INVALID_ARGUMENT: the handler's API version (0.5) is incompatible")

    monkeypatch.setattr(loader, "load_cuda", lambda: loader.Loaded(Lib()))
    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    monkeypatch.setattr(jax.ffi, "pycapsule", lambda fn: fn)
    cuda_ffi._register.cache_clear()
    try:
        why = cuda_ffi._register()
    finally:
        cuda_ffi._register.cache_clear()
    assert why.startswith("XLA refused the CUDA library's handler (INVALID_ARGUMENT: the "
                          "handler's API version (0.5)") and "build_cuda" in why


def test_built_library_matches_the_sources():
    """A library that `pip install` (CMake) or build_cuda left behind is the one of these
    sources; in CI (nvcc present) the install has built it."""
    if not any(os.path.isfile(p) for p in sources.cuda_library_candidates()):
        if shutil.which("nvcc") and os.environ.get("CI_EXPECT_CUDA_LIB") == "1":
            pytest.fail("nvcc is present but `pip install` built no CUDA library")
        pytest.skip("the CUDA library is not built here")
    lib, why = _load_cuda()
    assert why is None, why
    info = loader.build_info(lib)
    assert set(info) == {"sources", "jaxlib", "ffi_api"}
    assert loader.ffi_api_compatible(info["ffi_api"], loader.running_ffi_api()), info
    # both handlers: command-buffer compatible (the default) and launched from the host
    assert lib.Any4LutGemm and lib.Any4LutGemmNoCommandBuffer


def test_command_buffer_switch(monkeypatch):
    monkeypatch.delenv("ANY4_JAX_CUDA_COMMAND_BUFFER", raising=False)
    assert settings.cuda_command_buffer()
    monkeypatch.setenv("ANY4_JAX_CUDA_COMMAND_BUFFER", "0")
    assert not settings.cuda_command_buffer()
    monkeypatch.setenv("ANY4_JAX_CUDA_COMMAND_BUFFER", "no")
    with pytest.raises(ValueError, match="ANY4_JAX_CUDA_COMMAND_BUFFER='no': set it to 1"):
        settings.cuda_command_buffer()


def test_cpu_spin_setting(monkeypatch):
    monkeypatch.delenv("ANY4_JAX_CPU_SPIN_US", raising=False)
    assert settings.cpu_spin_us() == settings.CPU_SPIN_US_DEFAULT
    monkeypatch.setenv("ANY4_JAX_CPU_SPIN_US", "0")
    assert settings.cpu_spin_us() == 0
    for bad in ("-5", "1e3", "fast", "2000000"):
        monkeypatch.setenv("ANY4_JAX_CPU_SPIN_US", bad)
        with pytest.raises(ValueError, match=f"ANY4_JAX_CPU_SPIN_US='{bad}': set it to a whole"):
            settings.cpu_spin_us()
