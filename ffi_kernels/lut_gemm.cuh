// The LUT-dequantizing GEMM for small batches: y[M, N] = x[M, K] @ w[N, K]^T, with
//   w[n, k] = lut[n, code[n, k]] * scale[n, k / g] + zero[n, k / g]
// computed as y^T = w x^T on the tensor cores (mma m16n8k16): the weights are the 16-row A
// operand, the activations the 8-wide B operand, so a batch of 1 fills 1/8 of an MMA instead
// of 1/16.
//
// Weight layout ("prepared" once, see any4_jax/kernels/cuda_layout.py):
// - codes [N/16, K/32, 32, 2] uint32, in A-fragment order. For each 16-row tile of N and each
//   32-wide chunk of K, lane L of a warp reads one uint2 (8 bytes): .x holds its 8 codes for k
//   in [0, 16) of the chunk, .y for [16, 32), nibble i (bits 4i..4i+3) = fragment element a_i,
//   whose position is
//     row = g + 8 * ((i >> 1) & 1),  col = 2t + (i & 1) + 8 * (i >> 2)   (g = L / 4, t = L % 4).
//   A warp's 32 lanes read 256 contiguous bytes per chunk: coalesced, no staging.
// - scales, zeros [N/16, K/g, 16]: a tile's 16 rows side by side per group, so the two rows a
//   lane needs (g and g + 8) sit in the same 32-byte sector as the other lanes': one sector per
//   load instruction instead of eight (the canonical [N, K/g] puts rows K/g elements apart).
// - lut [N, 16] (canonical).
// Tables, scales and zeros keep the canonical weight's dtype (bf16, f16, or f32); the kernel is
// instantiated per table type and widens them exactly to float.
//
// Table lookups, two kinds (template parameter):
// - kLaneTable: the tile's tables in shared memory as float, one copy per lane, laid out
//   [row half][code][lane] so lane L's reads always hit bank L: no bank conflicts, one 4-byte
//   read per code (4 KB per block). Works for every table type.
// - kPairTable: per row and byte value b, the two table values of codes b & 15 and b >> 4,
//   packed as two 16-bit values of the activation type (16 KB per block): one read per two
//   codes, but random bytes from 8 rows collide in banks (about 3.5-way). Needs table values
//   exact in the activation type (tables of its dtype, or the integer grid).
// Either way a weight is `fmaf(v, scale, zero)` in float (the reference's arithmetic) rounded
// once to the activation type. The integer grid (int4) is the table code - offset.
// - kPairPostScale (the timing bench and its check carry it): the pair table's raw values go
//   straight into the MMA and each chunk's scale and zero are applied to its partial sums
//   (see compute_post).
// - kUnitPostScale, kUnitLanePostScale: the same arithmetic in a kernel
//   of its own that works by units of consecutive chunks of one group (lut_gemm_unit.cuh),
//   with the pair table or the lane table: the library's kernels "unit_pair" and "unit_lane"
//   (launch_lut_gemm's `kernel`, below).
// kLean (a Config flag) forms table addresses with one LOP3 on a
// runtime-aligned table and x addresses once per chunk: the same arithmetic, fewer instructions.
//
// Work split: a block of kWarps warps owns one 16-row tile and splits K across its warps (chunk
// c goes to warp c % kWarps), then reduces the partial sums in shared memory. Each warp
// alternates two register stages of kStage chunks (codes, scales, zeros): the loads of one are
// in flight while the other is computed, and the first stage's loads are issued before the
// tables are built. The group of chunk c is c / (g / 32), by a multiply-high with a host-side
// reciprocal (no integer division in the loop).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mma_bf16.cuh"

namespace any4 {

enum TableKind : int { kTableF32 = 0, kTableBF16 = 1, kTableF16 = 2 };
enum Lookup : int {
  kLaneTable = 0,
  kPairTable = 1,
  kPairPostScale = 2,
  kUnitPostScale = 3,      // lut_gemm_unit.cuh, pair table
  kUnitLanePostScale = 4,  // lut_gemm_unit.cuh, lane table
};

constexpr int kTileN = 16;
constexpr int kChunkK = 32;

// (host too: the standalone check's reference uses them)
__host__ __device__ __forceinline__ float widen(float v) { return v; }
__host__ __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float widen(__half v) { return __half2float(v); }

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

// c / d for the chunk counts here (c < 2^20, d <= 2^10), with magic = ceil(2^32 / d) and
// d = 1 passed as magic 0.
__device__ __forceinline__ int div_chunks(int c, uint32_t magic) {
  return magic ? static_cast<int>(__umulhi(static_cast<uint32_t>(c), magic)) : c;
}

inline uint32_t chunk_div_magic(int d) {
  return d == 1 ? 0u : static_cast<uint32_t>(((uint64_t(1) << 32) + d - 1) / d);
}

// Shared-memory loads at a 32-bit shared address (volatile: never hoisted above the barrier
// that publishes the tables).
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// (code i of q) << 7: the byte offset of its row in the lane table ([code][lane] floats);
// i is a constant after unrolling, so this is one shift and one AND (fused with the OR of the
// base by the caller into a LOP3)
__device__ __forceinline__ uint32_t code_x128(uint32_t q, int i) {
  const int sh = 4 * i - 7;
  return (sh < 0 ? (q << -sh) : (q >> sh)) & 0x780u;
}
// (byte j of q) << 2: the byte offset of its entry in a pair-table row
__device__ __forceinline__ uint32_t byte_x4(uint32_t q, int j) {
  const int sh = 8 * j - 2;
  return (sh < 0 ? (q << -sh) : (q >> sh)) & 0x3FCu;
}

// One k-step's A fragment straight from the pair table (raw values in T): byte j of the
// lane's code word q holds fragment elements 2j and 2j + 1, of row g + 8 (j & 1); pair_base
// is row g's table (row g + 8 sits 8 KB further).
__device__ __forceinline__ void pair_fragment(uint32_t q, uint32_t pair_base,
                                              uint32_t (&a)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j] = lds_u32((byte_x4(q, j) | pair_base) + (j & 1 ? 8192 : 0));
}

// Post-scale: a run's partial sums pv = sum(v x) and p1 = sum(x) join the accumulator as
// acc + s * pv + z * p1 (D rows: j < 2 row g, else g + 8). For identity activations the one
// nonzero term is fmaf(s, v, z), the reference's rounding.
template <int MT>
__device__ __forceinline__ void post_scale_add(float (&acc)[MT][4], const float (&pv)[MT][4],
                                               const float (&p1)[MT][4], float s_lo, float s_hi,
                                               float z_lo, float z_hi) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float sc = j < 2 ? s_lo : s_hi;
      const float zr = j < 2 ? z_lo : z_hi;
      acc[mt][j] = fmaf(sc, pv[mt][j], fmaf(zr, p1[mt][j], acc[mt][j]));
    }
  }
}

// The block's epilogue: each warp's accumulators into shared memory, then warp 0 sums them
// over the warps and stores its D elements (D column -> batch row, D row -> output feature).
template <typename T, int MT, int kWarps>
__device__ __forceinline__ void reduce_store(float (&red_s)[kWarps][32][MT * 4],
                                             const float (&acc)[MT][4], T* __restrict__ y,
                                             int M, int N, int tile, int m_base) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) red_s[warp][lane][mt * 4 + j] = acc[mt][j];
  }
  __syncthreads();
  if (warp == 0) {
    const int n0 = tile * kTileN + g;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += red_s[w][lane][mt * 4 + j];
        const int m = m_base + mt * 8 + 2 * t + (j & 1);
        const int n = n0 + (j >= 2 ? 8 : 0);
        if (m < M) y[static_cast<int64_t>(m) * N + n] = static_cast<T>(sum);
      }
    }
  }
}

// What a lane of either kernel (lut_gemm_kernel, lut_gemm_unit_kernel) knows before its
// loop, set up once here so that the two cannot drift apart: its place (tile = blockIdx.x,
// batch rows from blockIdx.y, fragment coordinates g = lane / 4, t = lane % 4), the tile's
// codes, scales and zeros, and the tables' place in shared memory. Scalars only, filled in
// place, codes before groups: so the scaled kernel's SASS is the same as with the locals this
// replaced (an array member such as the x rows, a returned struct, or groups first each change
// it; the unit kernel, which had groups first, gains up to 6 instructions in its U = 1 loop).
template <typename TT>
struct Prologue {
  int tile, m_base, warp, lane, g, t;
  int chunks;                  // K / 32
  const uint2* codes;          // this lane's word of the tile's chunk 0 (chunk c at + 32 c)
  const TT *s, *z;             // the tile's [K/g, 16] scales and zeros, row g (g + 8 at + 8)
  float* lane_s;               // the lane table [2][16][32]
  uint32_t* pair_s;            // the pair table [16][256]
  uint32_t lane_base;          // lane_s's shared address + 4 lane (+ code * 128 + half * 2 KB)
  uint32_t pair_base;          // pair_s's shared address of row g (row g + 8 at + 8 KB)
};

// U: chunks per unit (the scaled kernel: 1), magic: chunk_div_magic(units per group).
// kAlign: the tables at a runtime 2 KB (lane) / 1 KB (pair) alignment inside arrays that much
// larger, so that base | offset == base + offset (the static alignment of a __shared__ array
// is relative to the CTA's window, which sits after the 1 KB the driver reserves on sm_90, so
// it cannot be relied on).
template <int U, bool kAlign, int MT, typename TT>
__device__ __forceinline__ void prologue(Prologue<TT>& p, const uint2* codes,
                                         const TT* scales, const TT* zeros, int K,
                                         uint32_t magic, float* lane_store,
                                         uint32_t* pair_store) {
  p.tile = blockIdx.x;
  p.m_base = blockIdx.y * (8 * MT);
  p.warp = threadIdx.x / 32;
  p.lane = threadIdx.x % 32;
  p.g = p.lane / 4;
  p.t = p.lane % 4;
  p.chunks = K / kChunkK;
  p.codes = codes + static_cast<int64_t>(p.tile) * p.chunks * 32 + p.lane;
  const int groups = div_chunks(p.chunks / U, magic);
  p.s = scales + static_cast<int64_t>(p.tile) * groups * kTileN + p.g;
  p.z = zeros + static_cast<int64_t>(p.tile) * groups * kTileN + p.g;
  const uint32_t lane_raw = smem_addr(lane_store), pair_raw = smem_addr(pair_store);
  const uint32_t lane_al = kAlign ? (lane_raw + 2047u) & ~2047u : lane_raw;
  const uint32_t pair_al = kAlign ? (pair_raw + 1023u) & ~1023u : pair_raw;
  p.lane_s = lane_store + (lane_al - lane_raw) / 4;
  p.pair_s = pair_store + (pair_al - pair_raw) / 4;
  p.lane_base = lane_al + 4 * p.lane;
  p.pair_base = pair_al + 1024 * p.g;
}

// Word t of x's batch row m_base + 8 mt + g (row 0's where that row is past M: has_row false).
template <int MT, typename T>
__device__ __forceinline__ void x_rows(const T* x, int M, int K, int m_base, int g, int t,
                                       const uint32_t* (&rows)[MT], bool (&has_row)[MT]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m_base + mt * 8 + g;
    has_row[mt] = m < M;
    rows[mt] =
        reinterpret_cast<const uint32_t*>(x + static_cast<int64_t>(has_row[mt] ? m : 0) * K) + t;
  }
}

template <int MT>
__device__ __forceinline__ void zero(float (&a)[MT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) a[mt][j] = 0.f;
  }
}

// Post-scale's two MMAs per k-step: pv += A b (raw table values) and p1 += 1 b (the sum of x
// that the zero multiplies).
template <typename T>
__device__ __forceinline__ void mma_post(float (&pv)[4], float (&p1)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  constexpr uint32_t kOne = std::is_same<T, __half>::value ? 0x3C003C00u : 0x3F803F80u;
  const uint32_t ones[4] = {kOne, kOne, kOne, kOne};
  mma_16816<T>(pv, a, b);
  mma_16816<T>(p1, ones, b);
}

// A warp's loop over its items (chunks, or units of chunks) first, first + span, ... < end:
// two register stages alternate, the loads of one in flight while the other is computed. The
// first stage's loads are issued before build() (the tables), so they fly meanwhile.
template <typename S, typename Load, typename Build, typename Compute>
__device__ __forceinline__ void run_stages(int first, int end, int span, Load& load,
                                           Build&& build, Compute& compute) {
  S st0, st1;
  load(st0, first);
  build();
  for (int i = first; i < end; i += 2 * span) {
    load(st1, i + span);  // guarded per item: nothing past the end is read
    compute(st0, i);
    load(st0, i + 2 * span);
    compute(st1, i + span);
  }
}

// The tile's tables in shared memory, read once per block: the lane table lane_s
// ([half][code][lane] floats, entry (h, c, l) = row l / 4 + 8h's value of code c) or the pair
// table pair_s ([row][byte] = T-packed values of codes byte & 15 and byte >> 4, through the
// float staging area raw_s [16][16]). The integer grid's value is code - int_offset. Ends with
// a barrier: the tables are published when it returns.
template <typename T, typename TT, bool kPair, int kThreads>
__device__ __forceinline__ void build_tables(const TT* __restrict__ lut, int tile,
                                             int int_offset, float* lane_s, uint32_t* pair_s,
                                             float* raw_s) {
  auto table_value = [&](int row, int code) {
    return int_offset >= 0
               ? static_cast<float>(code - int_offset)
               : widen(__ldg(lut + static_cast<int64_t>(tile * kTileN + row) * 16 + code));
  };
  if constexpr (kPair) {
    for (int i = threadIdx.x; i < kTileN * 16; i += kThreads) {
      raw_s[i] = table_value(i / 16, i % 16);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTileN * 256; i += kThreads) {
      const int r = i / 256, b = i % 256;
      pair_s[i] = pack2<T>(raw_s[r * 16 + (b & 15)], raw_s[r * 16 + (b >> 4)]);
    }
  } else {
    for (int i = threadIdx.x; i < 2 * 16 * 32; i += kThreads) {
      const int h = i / 512, code = (i / 32) % 16, l = i % 32;
      lane_s[i] = table_value(l / 4 + 8 * h, code);
    }
  }
  __syncthreads();
}

// One stage of a warp's loads: kStage chunks of codes and their rows' scales and zeros.
template <int kStage>
struct Stage {
  uint2 q[kStage];
  float s_lo[kStage], z_lo[kStage], s_hi[kStage], z_hi[kStage];
};

// MT: n8 tiles of the batch per block (1: M <= 8 rows per block-row, 2: 16).
// kMinBlocks: blocks per SM the register allocation must allow (__launch_bounds__).
// kLean: table addresses by one LOP3 on an aligned base (inline ld.shared), x and scale
// pointers formed once per chunk -- the same arithmetic with fewer integer instructions.
template <typename T, typename TT, int kLookup, int MT, int kWarps, int kStage, int kMinBlocks,
          bool kLean>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
lut_gemm_kernel(const T* __restrict__ x, const uint2* __restrict__ codes,
                const TT* __restrict__ lut, const TT* __restrict__ scales,
                const TT* __restrict__ zeros, T* __restrict__ y, int M, int N, int K,
                uint32_t group_magic, int int_offset) {
  constexpr bool kPost = kLookup == kPairPostScale;
  constexpr bool kPair = kLookup != kLaneTable;  // the pair table (raw values, in T)
  // kLean: the tables at a runtime alignment (prologue's kAlign), hence the larger arrays
  __shared__ float lane_store[kPair ? 1 : 2 * 16 * 32 + (kLean ? 512 : 0)];
  __shared__ uint32_t pair_store[kPair ? kTileN * 256 + (kLean ? 256 : 0) : 1];
  __shared__ float raw_s[kPair ? kTileN : 1][16];
  __shared__ float red_s[kWarps][32][MT * 4];

  Prologue<TT> p;
  prologue<1, kLean, MT>(p, codes, scales, zeros, K, group_magic, lane_store, pair_store);
  const uint32_t* xr[MT];
  bool has_row[MT];
  x_rows<MT>(x, M, K, p.m_base, p.g, p.t, xr, has_row);

  auto load = [&](Stage<kStage>& st, int cb) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int c = cb + u * kWarps;
      st.q[u] = make_uint2(0u, 0u);
      st.s_lo[u] = st.z_lo[u] = st.s_hi[u] = st.z_hi[u] = 0.f;
      if (c < p.chunks) {
        st.q[u] = __ldg(p.codes + c * 32);
        const int o = div_chunks(c, group_magic) * kTileN;
        const TT* sp = p.s + o;
        const TT* zp = p.z + o;
        st.s_lo[u] = widen(__ldg(sp));
        st.z_lo[u] = widen(__ldg(zp));
        st.s_hi[u] = widen(__ldg(sp + 8));
        st.z_hi[u] = widen(__ldg(zp + 8));
      }
    }
  };

  // kLean: the B fragment of batch tile mt for k-step `step` of chunk c (zeros past M)
  auto load_b = [&](int mt, int c, int step, uint32_t (&b)[2]) {
    b[0] = b[1] = 0u;
    if (has_row[mt]) {  // words c * 16 + step * 8 + t (+ 4) of the row
      const uint32_t* xc = xr[mt] + c * 16 + step * 8;
      b[0] = __ldg(xc);
      b[1] = __ldg(xc + 4);
    }
  };

  float acc[MT][4];
  zero<MT>(acc);

  // kPairPostScale: the MMA takes the raw table values straight from the pair table (one
  // shared load is one A register), and the chunk's scale and zero are applied to its partial
  // sums: y += s * sum_k(v_k x_k) + z * sum_k(x_k), the second sum by an MMA with an all-ones A.
  // No per-weight arithmetic; more accurate than the reference (no rounding of w to T), and
  // still exact for identity activations (the one nonzero term is fmaf(s, v, z)).
  auto compute_post = [&](const Stage<kStage>& st, int cb) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int c = cb + u * kWarps;
      if (c >= p.chunks) break;
      float pv[MT][4], p1[MT][4];
      zero<MT>(pv);
      zero<MT>(p1);
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        uint32_t a[4];
        pair_fragment(step == 0 ? st.q[u].x : st.q[u].y, p.pair_base, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t b[2];
          load_b(mt, c, step, b);
          mma_post<T>(pv[mt], p1[mt], a, b);
        }
      }
      post_scale_add<MT>(acc, pv, p1, st.s_lo[u], st.s_hi[u], st.z_lo[u], st.z_hi[u]);
    }
  };

  auto compute_scaled = [&](const Stage<kStage>& st, int cb) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int c = cb + u * kWarps;
      if (c >= p.chunks) break;
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        const uint32_t q = step == 0 ? st.q[u].x : st.q[u].y;
        uint32_t a[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int h = j & 1;  // row g (h = 0) or g + 8
          const float s = h ? st.s_hi[u] : st.s_lo[u];
          const float z = h ? st.z_hi[u] : st.z_lo[u];
          float v0, v1;
          if (kLean && kPair) {
            const float2 v =
                unpack2<T>(lds_u32((byte_x4(q, j) | p.pair_base) + (h ? 8 * 1024 : 0)));
            v0 = v.x;
            v1 = v.y;
          } else if (kLean) {
            v0 = lds_f32((code_x128(q, 2 * j) | p.lane_base) + (h ? 2048 : 0));
            v1 = lds_f32((code_x128(q, 2 * j + 1) | p.lane_base) + (h ? 2048 : 0));
          } else if (kPair) {
            const float2 v = unpack2<T>(
                p.pair_s[kPair ? (p.g + 8 * h) * 256 + ((q >> (8 * j)) & 0xFF) : 0]);
            v0 = v.x;
            v1 = v.y;
          } else {
            v0 = p.lane_s[(h * 16 + ((q >> (8 * j)) & 0xF)) * 32 + p.lane];
            v1 = p.lane_s[(h * 16 + ((q >> (8 * j + 4)) & 0xF)) * 32 + p.lane];
          }
          a[j] = pack2<T>(fmaf(v0, s, z), fmaf(v1, s, z));
        }
        const int k0 = c * kChunkK + step * 16 + 2 * p.t;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = p.m_base + mt * 8 + p.g;
          uint32_t b[2] = {0u, 0u};
          if (kLean) {
            load_b(mt, c, step, b);
          } else if (m < M) {
            const uint32_t* xr =
                reinterpret_cast<const uint32_t*>(x + static_cast<int64_t>(m) * K);
            b[0] = __ldg(xr + k0 / 2);
            b[1] = __ldg(xr + (k0 + 8) / 2);
          }
          mma_16816<T>(acc[mt], a, b);
        }
      }
    }
  };

  auto compute = [&](const Stage<kStage>& st, int cb) {
    if constexpr (kPost) {
      compute_post(st, cb);
    } else {
      compute_scaled(st, cb);
    }
  };

  run_stages<Stage<kStage>>(
      p.warp, p.chunks, kWarps * kStage, load,
      [&] {
        build_tables<T, TT, kPair, kWarps * 32>(lut, p.tile, int_offset, p.lane_s, p.pair_s,
                                               &raw_s[0][0]);
      },
      compute);

  reduce_store<T, MT, kWarps>(red_s, acc, y, M, N, p.tile, p.m_base);
}

// The launch configuration: table lookup, warps per block splitting K, chunks per stage.
template <int kLookup_, int kWarps_, int kStage_, int kMinBlocks_ = 1, bool kLean_ = false>
struct Config {
  static constexpr int kLookup = kLookup_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kStage = kStage_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr bool kLean = kLean_;
};
// Measured on an H100 (ffi_kernels/bench/lut_gemm_bench.cu; benchmarks/results/
// cuda_kernel_variants_nvidia_h100_80gb_hbm3.json): one chunk per stage beats deeper stages
// (fewer registers, more resident warps). With at least two tiles per SM the lane table with 8
// warps per tile is fastest (qkv, gate_up: M = 1..16); with fewer tiles (N = 4096: o, down)
// the pair table with 16 warps per tile, which splits K finer, is (by 1.1-1.5x).
using ManyTilesConfig = Config<kLaneTable, 8, 1>;
using FewTilesConfig = Config<kPairTable, 16, 1>;

// lut_gemm_unit.cuh (included at the end of this file)
template <typename T, typename TT, int kWarps, bool kLane, int kMinBlocks>
cudaError_t launch_unit(cudaStream_t stream, const T* x, const uint2* codes, const TT* lut,
                        const TT* scales, const TT* zeros, T* y, int M, int N, int K,
                        int group_size, int int_offset);

// Launch for any M (block rows of 8 batch rows when M <= 8, else 16), tables of type TT.
template <typename T, typename TT, typename C>
cudaError_t launch_typed(cudaStream_t stream, const T* x, const uint2* codes, const TT* lut,
                         const TT* scales, const TT* zeros, T* y, int M, int N, int K,
                         int group_size, int int_offset) {
  if constexpr (C::kLookup == kUnitPostScale || C::kLookup == kUnitLanePostScale) {
    return launch_unit<T, TT, C::kWarps, C::kLookup == kUnitLanePostScale, C::kMinBlocks>(
        stream, x, codes, lut, scales, zeros, y, M, N, K, group_size, int_offset);
  } else {
    const dim3 block(C::kWarps * 32);
    const dim3 grid(N / kTileN, M <= 8 ? 1 : (M + 15) / 16);
    const uint32_t magic = chunk_div_magic(group_size / kChunkK);
    constexpr int L = C::kLookup, W = C::kWarps, S = C::kStage, B = C::kMinBlocks;
    constexpr bool E = C::kLean;
    if (M <= 8) {
      lut_gemm_kernel<T, TT, L, 1, W, S, B, E><<<grid, block, 0, stream>>>(
          x, codes, lut, scales, zeros, y, M, N, K, magic, int_offset);
    } else {
      lut_gemm_kernel<T, TT, L, 2, W, S, B, E><<<grid, block, 0, stream>>>(
          x, codes, lut, scales, zeros, y, M, N, K, magic, int_offset);
    }
    return cudaGetLastError();
  }
}

// The table type from the dtype tag. A pair-table configuration falls back to the lane table
// where the table values are not exact in T (float32 tables, or 16-bit tables of the other
// type, unless the integer grid); a unit kernel wherever the tables are not of type T.
template <typename T, typename C>
cudaError_t launch_config(cudaStream_t stream, const T* x, const uint2* codes, const void* lut,
                          const void* scales, const void* zeros, int table_kind, T* y, int M,
                          int N, int K, int group_size, int int_offset) {
  using Lane = Config<kLaneTable, C::kWarps, C::kStage, C::kMinBlocks, C::kLean>;
  const bool int_grid = int_offset >= 0;
#define ANY4_LAUNCH(TT, CFG)                                                               \
  launch_typed<T, TT, CFG>(stream, x, codes, static_cast<const TT*>(lut),                 \
                           static_cast<const TT*>(scales), static_cast<const TT*>(zeros), y, \
                           M, N, K, group_size, int_offset)
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  // The unit kernels only for tables of T: the integer grid with other tables (a float32
  // model's int4 weight, say) takes the lane table too, which halves the library's kernels
  constexpr bool kUnit = C::kLookup == kUnitPostScale || C::kLookup == kUnitLanePostScale;
  switch (table_kind) {
    case kTableBF16:
      if constexpr (kBf16) {
        return ANY4_LAUNCH(__nv_bfloat16, C);
      } else if constexpr (!kUnit) {
        return int_grid ? ANY4_LAUNCH(__nv_bfloat16, C) : ANY4_LAUNCH(__nv_bfloat16, Lane);
      } else {
        return ANY4_LAUNCH(__nv_bfloat16, Lane);
      }
    case kTableF16:
      if constexpr (!kBf16) {
        return ANY4_LAUNCH(__half, C);
      } else if constexpr (!kUnit) {
        return int_grid ? ANY4_LAUNCH(__half, C) : ANY4_LAUNCH(__half, Lane);
      } else {
        return ANY4_LAUNCH(__half, Lane);
      }
    default:
      if constexpr (!kUnit) {
        return int_grid ? ANY4_LAUNCH(float, C) : ANY4_LAUNCH(float, Lane);
      } else {
        return ANY4_LAUNCH(float, Lane);
      }
  }
#undef ANY4_LAUNCH
}

inline int sm_count() {
  static int count[64] = {0};  // per device; 0: not read yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (count[dev] == 0) {
    int c = 0;
    count[dev] = cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess
                     ? c
                     : 132;
  }
  return count[dev];
}

// The library's kernels, chosen per call (the FFI attribute "kernel"; the names are
// any4_jax/kernels/cuda_ffi.py's KERNELS, in this order):
// - kKernelScaled: lut_gemm_kernel, each weight scaled in float and rounded to T before the
//   MMA (the reference's arithmetic; timed on an H100: ManyTilesConfig / FewTilesConfig);
// - kKernelUnitPair: the unit post-scale kernel with the pair table (lut_gemm_unit.cuh);
// - kKernelUnitLane: the unit post-scale kernel with the per-lane float table.
// Each takes one configuration with many 16-row tiles per SM and one with few.
enum Kernel : int { kKernelScaled = 0, kKernelUnitPair = 1, kKernelUnitLane = 2 };
constexpr int kKernelCount = 3;

// Unit kernels: 8 warps per tile where there are tiles enough (the lane table's 95 registers
// capped at 80 for 3 blocks per SM, no spills), 16 with few tiles (K split finer), as for the
// scaled kernel. Register counts from SASS; what is measured where: docs/kernels.md.
using UnitPairManyConfig = Config<kUnitPostScale, 8, 1>;
using UnitPairFewConfig = Config<kUnitPostScale, 16, 1>;
using UnitLaneManyConfig = Config<kUnitLanePostScale, 8, 1, 3>;
using UnitLaneFewConfig = Config<kUnitLanePostScale, 16, 1>;

// Many when there are at least two 16-row tiles per SM.
template <typename T, typename Many, typename Few>
cudaError_t launch_by_tiles(cudaStream_t stream, const T* x, const uint2* codes,
                            const void* lut, const void* scales, const void* zeros,
                            int table_kind, T* y, int M, int N, int K, int group_size,
                            int int_offset) {
  return N / kTileN >= 2 * sm_count()
             ? launch_config<T, Many>(stream, x, codes, lut, scales, zeros, table_kind, y, M, N,
                                      K, group_size, int_offset)
             : launch_config<T, Few>(stream, x, codes, lut, scales, zeros, table_kind, y, M, N,
                                     K, group_size, int_offset);
}

// The library's entry point: `kernel` (a Kernel; others are refused) and its configuration by
// the number of 16-row tiles per SM. Unit kernels need tables exact in T: otherwise
// (float32 tables, or 16-bit tables of the other type, unless the integer grid) launch_config
// runs the scaled kernel's lane table instead.
template <typename T>
cudaError_t launch_lut_gemm(cudaStream_t stream, const T* x, const uint2* codes,
                            const void* lut, const void* scales, const void* zeros,
                            int table_kind, T* y, int M, int N, int K, int group_size,
                            int int_offset, int kernel) {
#define ANY4_BY_TILES(MANY, FEW)                                                             \
  launch_by_tiles<T, MANY, FEW>(stream, x, codes, lut, scales, zeros, table_kind, y, M, N, K, \
                                group_size, int_offset)
  switch (kernel) {
    case kKernelScaled: return ANY4_BY_TILES(ManyTilesConfig, FewTilesConfig);
    case kKernelUnitPair: return ANY4_BY_TILES(UnitPairManyConfig, UnitPairFewConfig);
    case kKernelUnitLane: return ANY4_BY_TILES(UnitLaneManyConfig, UnitLaneFewConfig);
    default: return cudaErrorInvalidValue;
  }
#undef ANY4_BY_TILES
}

}  // namespace any4

#include "lut_gemm_unit.cuh"  // NOLINT: the kUnitPostScale kernel (needs the above)
