// Warp-level tensor-core MMA (mma.sync m16n8k16, float32 accumulation) and the packing of
// two floats into one 32-bit register of 16-bit values. One header per concept.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace any4 {

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half), .y = hi
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// D = A (16x16, row) * B (16x8, col) + D. Fragments per lane (g = lane / 4, t = lane % 4):
//   A: a[0] = (r g, k 2t..2t+1), a[1] = (r g+8, k 2t..), a[2] = (r g, k 2t+8..),
//      a[3] = (r g+8, k 2t+8..);  B: b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g);
//   D: d[0], d[1] = (r g, n 2t, 2t+1), d[2], d[3] = (r g+8, n 2t, 2t+1).
// The PTX type is part of the instruction's text, hence one asm statement per type, spelled
// once here.
#define ANY4_MMA_16816(PTX_TYPE)                                                         \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "    \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"       \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value,
                "the MMA takes bf16 or f16");
  if constexpr (std::is_same<T, __half>::value) {
    ANY4_MMA_16816("f16");
  } else {
    ANY4_MMA_16816("bf16");
  }
}
#undef ANY4_MMA_16816

}  // namespace any4
