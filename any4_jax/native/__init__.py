"""Our compiled libraries: where their sources are, how they are built, one loader.

The C++ and CUDA sources live in the top-level `ffi_kernels/` (copied into the package as
`any4_jax/_ffi_kernels/` by the build, for installs without the source tree). The CPU
libraries (k-means, LUT GEMM) are compiled at first use into the cache (`build_cpu`); the CUDA
library is built by `pip install` through CMake or by `python -m any4_jax.native.build_cuda`.
`loader` finds, checks, loads and registers all of them the same way.
"""
