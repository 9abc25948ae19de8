// XLA FFI binding of the LUT GEMM: the handler symbol `Any4LutGemm`, registered from Python
// (any4_jax/kernels/cuda_ffi.py) as the custom-call target "any4_lut_gemm" on CUDA.
#include <cuda_runtime.h>

#include <string>

#include "lut_gemm.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The build's identity (set by CMakeLists.txt / any4_jax/native/build_cuda.py as bare tokens):
// the sha256 of the kernel sources and the jaxlib whose FFI headers it was built against, and
// those headers' FFI API version (XLA refuses a handler whose version is newer than its own).
#ifndef ANY4_SOURCES_SHA256
#define ANY4_SOURCES_SHA256 unknown
#endif
#ifndef ANY4_JAXLIB_VERSION
#define ANY4_JAXLIB_VERSION unknown
#endif
#define ANY4_STR2(x) #x
#define ANY4_STR(x) ANY4_STR2(x)

extern "C" __attribute__((visibility("default"))) const char* Any4CudaBuildInfo() {
  return "sources=" ANY4_STR(ANY4_SOURCES_SHA256) ";jaxlib=" ANY4_STR(ANY4_JAXLIB_VERSION)
         ";ffi_api=" ANY4_STR(XLA_FFI_API_MAJOR) "." ANY4_STR(XLA_FFI_API_MINOR);
}

namespace {

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error LutGemm(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                   ffi::AnyBuffer lut, ffi::AnyBuffer scales, ffi::AnyBuffer zeros,
                   ffi::Result<ffi::AnyBuffer> y, int64_t group_size, int64_t int_offset,
                   int64_t kernel) {
  // Shapes were checked in Python; these checks guard against a mismatched caller.
  auto xd = x.dimensions();
  auto cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || cd[2] != 32 || cd[3] != 2) {
    return ffi::Error::InvalidArgument("any4_lut_gemm: x must be [M, K] and codes [N/16, K/32, "
                                       "32, 2]; got x " + dims_str(xd) + ", codes " +
                                       dims_str(cd));
  }
  const int64_t M = xd[0], K = xd[1], N = cd[0] * 16;
  if (cd[1] * 32 != K || group_size <= 0 || group_size % 32 || K % group_size) {
    return ffi::Error::InvalidArgument(
        "any4_lut_gemm: K=" + std::to_string(K) + " does not match codes " + dims_str(cd) +
        " or group_size=" + std::to_string(group_size) + " is not a multiple of 32 dividing K");
  }
  if (kernel < 0 || kernel >= any4::kKernelCount) {
    return ffi::Error::InvalidArgument("any4_lut_gemm: kernel=" + std::to_string(kernel) +
                                       " is not one of 0.." +
                                       std::to_string(any4::kKernelCount - 1));
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("any4_lut_gemm: y must have x's dtype");
  }
  const auto ld = lut.dimensions(), sd = scales.dimensions(), zd = zeros.dimensions();
  const int64_t groups = K / group_size;
  const bool sz_ok = sd.size() == 3 && sd[0] == N / 16 && sd[1] == groups && sd[2] == 16 &&
                     zd.size() == 3 && zd[0] == N / 16 && zd[1] == groups && zd[2] == 16;
  if (ld.size() != 2 || ld[0] != N || ld[1] != 16 || !sz_ok) {
    return ffi::Error::InvalidArgument(
        "any4_lut_gemm: expected lut [" + std::to_string(N) + ", 16] and tile-major "
        "scales/zeros [" + std::to_string(N / 16) + ", " + std::to_string(groups) +
        ", 16]; got lut " + dims_str(ld) + ", scales " + dims_str(sd) + ", zeros " +
        dims_str(zd));
  }
  const auto tdt = lut.element_type();
  if (scales.element_type() != tdt || zeros.element_type() != tdt) {
    return ffi::Error::InvalidArgument("any4_lut_gemm: lut, scales and zeros must share a dtype");
  }
  int table_kind;
  switch (tdt) {
    case ffi::DataType::F32: table_kind = any4::kTableF32; break;
    case ffi::DataType::BF16: table_kind = any4::kTableBF16; break;
    case ffi::DataType::F16: table_kind = any4::kTableF16; break;
    default:
      return ffi::Error::InvalidArgument("any4_lut_gemm: tables must be float32, bfloat16 or "
                                         "float16");
  }
  if (M == 0) return ffi::Error::Success();
  const auto* c = reinterpret_cast<const uint2*>(codes.typed_data());
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::BF16:
      err = any4::launch_lut_gemm<__nv_bfloat16>(
          stream, reinterpret_cast<const __nv_bfloat16*>(x.untyped_data()), c,
          lut.untyped_data(), scales.untyped_data(), zeros.untyped_data(), table_kind,
          reinterpret_cast<__nv_bfloat16*>(y->untyped_data()), static_cast<int>(M),
          static_cast<int>(N), static_cast<int>(K), static_cast<int>(group_size),
          static_cast<int>(int_offset), static_cast<int>(kernel));
      break;
    case ffi::DataType::F16:
      err = any4::launch_lut_gemm<__half>(
          stream, reinterpret_cast<const __half*>(x.untyped_data()), c, lut.untyped_data(),
          scales.untyped_data(), zeros.untyped_data(), table_kind,
          reinterpret_cast<__half*>(y->untyped_data()), static_cast<int>(M), static_cast<int>(N),
          static_cast<int>(K), static_cast<int>(group_size), static_cast<int>(int_offset),
          static_cast<int>(kernel));
      break;
    default:
      return ffi::Error::InvalidArgument("any4_lut_gemm: x must be bfloat16 or float16");
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("any4_lut_gemm launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

// The binding, shared by the two handler symbols below.
#define ANY4_LUT_GEMM_BINDING                                                   \
  ffi::Ffi::Bind()                                                              \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                 \
      .Arg<ffi::AnyBuffer>()        /* x [M, K] */                              \
      .Arg<ffi::Buffer<ffi::U32>>() /* codes [N/16, K/32, 32, 2] */             \
      .Arg<ffi::AnyBuffer>()        /* lut [N, 16] */                           \
      .Arg<ffi::AnyBuffer>()        /* scales [N/16, K/g, 16] */                \
      .Arg<ffi::AnyBuffer>()        /* zeros [N/16, K/g, 16] */                 \
      .Ret<ffi::AnyBuffer>()        /* y [M, N] */                              \
      .Attr<int64_t>("group_size")                                              \
      .Attr<int64_t>("int_offset")                                              \
      .Attr<int64_t>("kernel") /* any4::Kernel: scaled, unit pair, unit lane */

// It only launches kernels on XLA's stream, allocates nothing and never waits on the stream:
// XLA may capture it in a CUDA graph (command buffer) with its neighbours instead of
// launching it from the host.
XLA_FFI_DEFINE_HANDLER_SYMBOL(Any4LutGemm, LutGemm, ANY4_LUT_GEMM_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});

// The same handler without that trait: XLA launches it from the host every time (what
// ANY4_JAX_CUDA_COMMAND_BUFFER=0 registers; cuda_ffi.py), to compare the two on a GPU.
XLA_FFI_DEFINE_HANDLER_SYMBOL(Any4LutGemmNoCommandBuffer, LutGemm, ANY4_LUT_GEMM_BINDING);
