// The first CUDA LUT GEMM (per-code float table, 8 warps x 8 chunks ahead), kept for the
// comparison in lut_gemm_bench.cu only: the library builds ../lut_gemm.cuh.
// The LUT-dequantizing GEMM for small batches: y[M, N] = x[M, K] @ w[N, K]^T, with
//   w[n, k] = lut[n, code[n, k]] * scale[n, k / g] + zero[n, k / g]
// computed as y^T = w x^T on the tensor cores (mma m16n8k16): the weights are the 16-row A
// operand, the activations the 8-wide B operand, so a batch of 1 fills 1/8 of an MMA instead
// of 1/16.
//
// Weight layout ("prepared" once, see any4_jax/kernels/cuda_layout.py): the 4-bit codes are
// stored in A-fragment order. For each 16-row tile of N and each 32-wide chunk of K, lane L of
// a warp reads one uint2 (8 bytes): .x holds its 8 codes for k in [0, 16) of the chunk, .y for
// [16, 32), nibble i (bits 4i..4i+3) = fragment element a_i, whose position is
//   row = g + 8 * ((i >> 1) & 1),  col = 2t + (i & 1) + 8 * (i >> 2)   (g = L / 4, t = L % 4).
// A warp's 32 lanes read 256 contiguous bytes per chunk: coalesced, no shared memory staging.
//
// Tables: the 16 rows' tables of a tile go to shared memory as float (1 KB per block), read
// by code; integer grids skip them (value = code - offset). Tables, scales and zeros [N, K/g]
// keep the canonical weight's dtype (bf16, f16 or f32: `table_kind`, uniform across a launch,
// so the branch costs nothing) and are widened to float exactly on load: 16-bit scales and
// zeros move half the bytes of float ones (5% of the weight bytes at g128, 16% at g32). A block of 8 warps owns one 16-row tile and splits K across its warps (chunk c goes to
// warp c % 8), each warp loading 8 chunks ahead, then reduces the partial sums in shared
// memory: for small M this gives N/16 blocks x 8 warps with about 2 KB in flight per warp,
// which is what it takes to cover the memory latency at full bandwidth.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "../mma_bf16.cuh"

namespace any4_v1 {
using any4::pack2;
using any4::mma_16816;

enum TableKind : int { kTableF32 = 0, kTableBF16 = 1, kTableF16 = 2 };

__device__ __forceinline__ float load_table(const void* p, int64_t i, int kind) {
  if (kind == kTableBF16) return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
  if (kind == kTableF16) return __half2float(__ldg(static_cast<const __half*>(p) + i));
  return __ldg(static_cast<const float*>(p) + i);
}

constexpr int kWarps = 8;   // split K of one 16-row tile
constexpr int kTileN = 16;
constexpr int kChunkK = 32;
constexpr int kUnroll = 8;  // chunks a warp loads ahead

// MT: n8 tiles of the batch per block (1: M <= 8 rows per block-row, 2: 16).
template <typename T, bool kIntGrid, int MT>
__global__ void __launch_bounds__(kWarps * 32)
lut_gemm_kernel(const T* __restrict__ x, const uint2* __restrict__ codes,
                const void* __restrict__ lut, const void* __restrict__ scales,
                const void* __restrict__ zeros, int table_kind, T* __restrict__ y, int M,
                int N, int K, int group_size, float int_offset) {
  __shared__ float lut_s[kTileN][16];
  __shared__ float red_s[kWarps][32][MT * 4];

  const int tile = blockIdx.x;
  const int m_base = blockIdx.y * (8 * MT);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int n0 = tile * kTileN + g;  // this lane's two weight rows: n0 and n0 + 8
  const int groups = K / group_size;
  const int chunks = K / kChunkK;

  if (!kIntGrid) {
    for (int i = threadIdx.x; i < kTileN * 16; i += kWarps * 32) {
      lut_s[i / 16][i % 16] =
          load_table(lut, static_cast<int64_t>(tile * kTileN + i / 16) * 16 + i % 16, table_kind);
    }
    __syncthreads();
  }

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[mt][j] = 0.f;
  }

  // Warp w takes chunks w, w + kWarps, ...; it issues the loads of kUnroll of them (codes,
  // scales, zeros) before it uses the first, so enough bytes are in flight to cover the
  // memory latency (about 2 KB per warp) instead of one dependent 256-byte load at a time.
  for (int c0 = warp; c0 < chunks; c0 += kWarps * kUnroll) {
    uint2 packed[kUnroll];
    float s_lo[kUnroll], z_lo[kUnroll], s_hi[kUnroll], z_hi[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
      packed[u] = make_uint2(0u, 0u);
      s_lo[u] = z_lo[u] = s_hi[u] = z_hi[u] = 0.f;
      if (c < chunks) {
        packed[u] = codes[(static_cast<int64_t>(tile) * chunks + c) * 32 + lane];
        const int grp = (c * kChunkK) / group_size;
        const int64_t lo = static_cast<int64_t>(n0) * groups + grp;
        const int64_t hi = lo + 8 * static_cast<int64_t>(groups);
        s_lo[u] = load_table(scales, lo, table_kind);
        z_lo[u] = load_table(zeros, lo, table_kind);
        s_hi[u] = load_table(scales, hi, table_kind);
        z_hi[u] = load_table(zeros, hi, table_kind);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
      if (c >= chunks) break;
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        const uint32_t q = step == 0 ? packed[u].x : packed[u].y;
        float w[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int code = (q >> (4 * i)) & 0xF;
          const bool hi_row = (i >> 1) & 1;
          const float v = kIntGrid ? static_cast<float>(code) - int_offset
                                   : lut_s[g + (hi_row ? 8 : 0)][code];
          w[i] = fmaf(v, hi_row ? s_hi[u] : s_lo[u], hi_row ? z_hi[u] : z_lo[u]);
        }
        const uint32_t a[4] = {pack2<T>(w[0], w[1]), pack2<T>(w[2], w[3]),
                               pack2<T>(w[4], w[5]), pack2<T>(w[6], w[7])};
        const int k0 = c * kChunkK + step * 16 + 2 * t;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = m_base + mt * 8 + g;
          uint32_t b[2] = {0u, 0u};
          if (m < M) {
            const uint32_t* row =
                reinterpret_cast<const uint32_t*>(x + static_cast<int64_t>(m) * K);
            b[0] = __ldg(row + k0 / 2);
            b[1] = __ldg(row + (k0 + 8) / 2);
          }
          mma_16816<T>(acc[mt], a, b);
        }
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) red_s[warp][lane][mt * 4 + j] = acc[mt][j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += red_s[w][lane][mt * 4 + j];
        const int m = m_base + mt * 8 + 2 * t + (j & 1);  // D column -> batch row
        const int n = n0 + (j >= 2 ? 8 : 0);             // D row -> output feature
        if (m < M) y[static_cast<int64_t>(m) * N + n] = static_cast<T>(sum);
      }
    }
  }
}

// Launch for any M: block rows of 8 (M <= 8) or 16 batch rows.
template <typename T>
cudaError_t launch_lut_gemm(cudaStream_t stream, const T* x, const uint2* codes,
                            const void* lut, const void* scales, const void* zeros,
                            int table_kind, T* y, int M, int N, int K, int group_size,
                            int int_offset) {
  const dim3 block(kWarps * 32);
  const bool int_grid = int_offset >= 0;
  const float off = static_cast<float>(int_offset);
  const dim3 grid(N / kTileN, M <= 8 ? 1 : (M + 15) / 16);
#define ANY4_LAUNCH(INT_GRID, MT)                                                          \
  lut_gemm_kernel<T, INT_GRID, MT><<<grid, block, 0, stream>>>(                            \
      x, codes, lut, scales, zeros, table_kind, y, M, N, K, group_size, off)
  if (M <= 8) {
    if (int_grid) ANY4_LAUNCH(true, 1); else ANY4_LAUNCH(false, 1);
  } else {
    if (int_grid) ANY4_LAUNCH(true, 2); else ANY4_LAUNCH(false, 2);
  }
#undef ANY4_LAUNCH
  return cudaGetLastError();
}

}  // namespace any4
