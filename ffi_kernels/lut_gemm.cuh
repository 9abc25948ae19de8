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
// Byte j of a uint32 (nibbles 2j, 2j+1) is exactly the pair of one A register a[j] (row g for
// even j, g + 8 for odd j; two adjacent k).
//
// Tables: the 16 rows' 16-entry tables of a block's tile (or, for the integer grid, the values
// code - offset) are expanded in shared memory into a pair table: for each row and each byte
// value b, the two table values of codes b & 15 (low half) and b >> 4 (high half), packed as two
// 16-bit values of the activation type. One 4-byte shared load then gives the two weights of
// an A register (half the loads and address arithmetic of one lookup per code); they are
// widened, scaled in float (`fmaf(v, scale, zero)`, the reference's arithmetic) and rounded
// once to the activation type. This needs the table values to be exact in that type: tables
// of the activation dtype and integer grids. Other tables (float32 tables of a float32 model,
// or f16 tables with bf16 activations) take the same kernel with a float lookup per code.
// Tables, scales and zeros [N, K/g] keep the canonical weight's dtype (16-bit scales move half
// the bytes of float ones); the kernel is instantiated per table type.
//
// Work split: a block of kWarps warps owns one 16-row tile and splits K across its warps (chunk
// c goes to warp c % kWarps), then reduces the partial sums in shared memory. Each warp keeps two
// stages of kStage chunks in registers: the loads of the next stage (codes, scales, zeros) are
// issued before the current one is computed, and the first stage's loads before the tables are
// built, so memory latency overlaps both the table set-up and the arithmetic.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mma_bf16.cuh"

namespace any4 {

enum TableKind : int { kTableF32 = 0, kTableBF16 = 1, kTableF16 = 2 };

constexpr int kTileN = 16;
constexpr int kChunkK = 32;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

// The two 16-bit values of a packed pair as floats (exact).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t e);

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t e) {
  return make_float2(__uint_as_float(e << 16), __uint_as_float(e & 0xffff0000u));
}

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t e) {
  __half2 h;
  memcpy(&h, &e, sizeof(h));
  return __half22float2(h);
}

// One stage of a warp's loads: kStage chunks of codes and their rows' scales and zeros.
template <int kStage>
struct Stage {
  uint2 q[kStage];
  float s_lo[kStage], z_lo[kStage], s_hi[kStage], z_hi[kStage];
};

// kPair: the pair table (see above); otherwise a float table read per code.
// MT: n8 tiles of the batch per block (1: M <= 8 rows per block-row, 2: 16).
// kMinBlocks: blocks per SM the register allocation must allow (__launch_bounds__).
template <typename T, typename TT, bool kPair, int MT, int kWarps, int kStage, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
lut_gemm_kernel(const T* __restrict__ x, const uint2* __restrict__ codes,
                const TT* __restrict__ lut, const TT* __restrict__ scales,
                const TT* __restrict__ zeros, T* __restrict__ y, int M, int N, int K,
                int group_size, int int_offset) {
  __shared__ float raw_s[kTileN][16];
  __shared__ uint32_t pair_s[kPair ? kTileN : 1][256];
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
  const TT* s_row_lo = scales + static_cast<int64_t>(n0) * groups;
  const TT* z_row_lo = zeros + static_cast<int64_t>(n0) * groups;
  const int64_t hi = 8 * static_cast<int64_t>(groups);
  const uint2* tile_codes = codes + static_cast<int64_t>(tile) * chunks * 32 + lane;

  auto load = [&](Stage<kStage>& st, int cb) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int c = cb + u * kWarps;
      st.q[u] = make_uint2(0u, 0u);
      st.s_lo[u] = st.z_lo[u] = st.s_hi[u] = st.z_hi[u] = 0.f;
      if (c < chunks) {
        st.q[u] = __ldg(tile_codes + c * 32);
        const int grp = (c * kChunkK) / group_size;
        st.s_lo[u] = widen(__ldg(s_row_lo + grp));
        st.z_lo[u] = widen(__ldg(z_row_lo + grp));
        st.s_hi[u] = widen(__ldg(s_row_lo + hi + grp));
        st.z_hi[u] = widen(__ldg(z_row_lo + hi + grp));
      }
    }
  };

  // The first stage is in flight while the tables are built.
  Stage<kStage> cur;
  load(cur, warp);

  for (int i = threadIdx.x; i < kTileN * 16; i += kWarps * 32) {
    const int r = i / 16, c = i % 16;
    raw_s[r][c] = int_offset >= 0
                      ? static_cast<float>(c - int_offset)
                      : widen(__ldg(lut + static_cast<int64_t>(tile * kTileN + r) * 16 + c));
  }
  __syncthreads();
  if (kPair) {
    for (int i = threadIdx.x; i < kTileN * 256; i += kWarps * 32) {
      const int r = i / 256, b = i % 256;
      pair_s[kPair ? r : 0][b] = pack2<T>(raw_s[r][b & 15], raw_s[r][b >> 4]);
    }
    __syncthreads();
  }

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[mt][j] = 0.f;
  }

  for (int cb = warp; cb < chunks; cb += kWarps * kStage) {
    Stage<kStage> nxt;
    load(nxt, cb + kWarps * kStage);  // guarded per chunk: nothing past the end is read
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int c = cb + u * kWarps;
      if (c >= chunks) break;
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        const uint32_t q = step == 0 ? cur.q[u].x : cur.q[u].y;
        uint32_t a[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool hi_row = j & 1;
          const float s = hi_row ? cur.s_hi[u] : cur.s_lo[u];
          const float z = hi_row ? cur.z_hi[u] : cur.z_lo[u];
          const int row = g + (hi_row ? 8 : 0);
          float v0, v1;
          if (kPair) {
            const float2 v = unpack2<T>(pair_s[kPair ? row : 0][(q >> (8 * j)) & 0xFF]);
            v0 = v.x;
            v1 = v.y;
          } else {
            v0 = raw_s[row][(q >> (8 * j)) & 0xF];
            v1 = raw_s[row][(q >> (8 * j + 4)) & 0xF];
          }
          a[j] = pack2<T>(fmaf(v0, s, z), fmaf(v1, s, z));
        }
        const int k0 = c * kChunkK + step * 16 + 2 * t;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = m_base + mt * 8 + g;
          uint32_t b[2] = {0u, 0u};
          if (m < M) {
            const uint32_t* xr =
                reinterpret_cast<const uint32_t*>(x + static_cast<int64_t>(m) * K);
            b[0] = __ldg(xr + k0 / 2);
            b[1] = __ldg(xr + (k0 + 8) / 2);
          }
          mma_16816<T>(acc[mt], a, b);
        }
      }
    }
    cur = nxt;
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

// The launch configuration: warps per block splitting K, and chunks per pipeline stage.
template <int kWarps_, int kStage_, int kMinBlocks_ = 1>
struct Config {
  static constexpr int kWarps = kWarps_;
  static constexpr int kStage = kStage_;
  static constexpr int kMinBlocks = kMinBlocks_;
};
using DefaultConfig = Config<8, 4>;

// Launch for any M (block rows of 8 batch rows when M <= 8, else 16), tables of type TT.
template <typename T, typename TT, bool kPair, typename C = DefaultConfig>
cudaError_t launch_typed(cudaStream_t stream, const T* x, const uint2* codes, const TT* lut,
                         const TT* scales, const TT* zeros, T* y, int M, int N, int K,
                         int group_size, int int_offset) {
  const dim3 block(C::kWarps * 32);
  const dim3 grid(N / kTileN, M <= 8 ? 1 : (M + 15) / 16);
  if (M <= 8) {
    lut_gemm_kernel<T, TT, kPair, 1, C::kWarps, C::kStage, C::kMinBlocks><<<grid, block, 0, stream>>>(
        x, codes, lut, scales, zeros, y, M, N, K, group_size, int_offset);
  } else {
    lut_gemm_kernel<T, TT, kPair, 2, C::kWarps, C::kStage, C::kMinBlocks><<<grid, block, 0, stream>>>(
        x, codes, lut, scales, zeros, y, M, N, K, group_size, int_offset);
  }
  return cudaGetLastError();
}

// Table type and lookup kind from the table dtype: the pair table when the table values are
// exact in T (tables of T's dtype, or the integer grid), a float lookup per code otherwise.
template <typename T, typename C = DefaultConfig>
cudaError_t launch_lut_gemm(cudaStream_t stream, const T* x, const uint2* codes,
                            const void* lut, const void* scales, const void* zeros,
                            int table_kind, T* y, int M, int N, int K, int group_size,
                            int int_offset) {
  const bool int_grid = int_offset >= 0;
#define ANY4_LAUNCH(TT, PAIR)                                                              \
  launch_typed<T, TT, PAIR, C>(stream, x, codes, static_cast<const TT*>(lut),              \
                               static_cast<const TT*>(scales), static_cast<const TT*>(zeros), \
                               y, M, N, K, group_size, int_offset)
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  switch (table_kind) {
    case kTableBF16:
      return (kBf16 || int_grid) ? ANY4_LAUNCH(__nv_bfloat16, true)
                                 : ANY4_LAUNCH(__nv_bfloat16, false);
    case kTableF16:
      return (!kBf16 || int_grid) ? ANY4_LAUNCH(__half, true) : ANY4_LAUNCH(__half, false);
    default:
      return int_grid ? ANY4_LAUNCH(float, true) : ANY4_LAUNCH(float, false);
  }
#undef ANY4_LAUNCH
}

}  // namespace any4
