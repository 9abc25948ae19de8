// The LUT GEMM by group units ("unit post-scale", Lookup kUnitPostScale): the post-scale
// arithmetic of lut_gemm.cuh's kPairPostScale (raw pair-table values straight into the MMA,
// scale and zero applied to partial sums, the zero's sum of x by an MMA with an all-ones A),
// with the work cut so that the per-weight loop carries as little else as possible:
// - a warp takes units of U consecutive chunks (32 K each) inside one group (U = 4, 2 or 1,
//   the largest dividing g / 32), unit u to warp u % kWarps; a unit's codes are U loads of a
//   running pointer with constant offsets, its x words likewise;
// - one scale and zero pair per unit (kLaneTable/kPairTable reload them every chunk), applied
//   once per unit to the unit's partial sums;
// - no predicates on x loads: rows past M read row 0, whose products only reach D columns
//   that are never stored.
// Same layout and numerics as kPairPostScale (tables exact in T: the pair table's condition;
// launch_config falls back to the lane table otherwise). The standalone bench times it and its
// `check` compares it with the host reference.
//
// Two lookups (kLane): the pair table (one shared load per two codes, 17 KB per block, but
// random bytes collide in banks, ~3.5-way for 32 lanes: ~28 shared wavefronts per warp and
// chunk) or the per-lane float table of lut_gemm.cuh ([half][code][lane], conflict-free: one
// load per code, 16 wavefronts per chunk, 6 KB per block, plus one F2FP per two codes).
// By count (2.9 vs ~4.4 instructions per code) the pair table issues less; by the shared pipe
// (one wavefront per cycle per SM) the lane table waits less: the bench decides.
#pragma once

#include "lut_gemm.cuh"

namespace any4 {

template <int U>
struct UnitStage {
  uint2 q[U];
  float s_lo, s_hi, z_lo, z_hi;  // rows g and g + 8
};

template <typename T, typename TT, int MT, int kWarps, int U, bool kLane, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
lut_gemm_unit_kernel(const T* __restrict__ x, const uint2* __restrict__ codes,
                     const TT* __restrict__ lut, const TT* __restrict__ scales,
                     const TT* __restrict__ zeros, T* __restrict__ y, int M, int N, int K,
                     uint32_t units_per_group_magic, int int_offset) {
  // the pair table [16 rows][256 byte values] or the lane table [2 halves][16 codes][32 lanes],
  // at a runtime alignment (prologue's kAlign), hence the larger arrays
  __shared__ uint32_t pair_store[kLane ? 1 : kTileN * 256 + 256];
  __shared__ float lane_store[kLane ? 2 * 16 * 32 + 512 : 1];
  __shared__ float raw_s[kLane ? 1 : kTileN][16];
  __shared__ float red_s[kWarps][32][MT * 4];

  Prologue<TT> p;
  prologue<U, true, MT>(p, codes, scales, zeros, K, units_per_group_magic, lane_store,
                        pair_store);
  const uint32_t* xr[MT];
  bool has_row[MT];  // unused: no predicates, rows past M read row 0 (see the top)
  x_rows<MT>(x, M, K, p.m_base, p.g, p.t, xr, has_row);
  const int units = p.chunks / U;

  auto load = [&](UnitStage<U>& st, int u) {
    if (u < units) {
      const uint2* cp = p.codes + u * (U * 32);
#pragma unroll
      for (int i = 0; i < U; ++i) st.q[i] = __ldg(cp + i * 32);
      const int o = div_chunks(u, units_per_group_magic) * kTileN;
      st.s_lo = widen(__ldg(p.s + o));
      st.s_hi = widen(__ldg(p.s + o + 8));
      st.z_lo = widen(__ldg(p.z + o));
      st.z_hi = widen(__ldg(p.z + o + 8));
    }
  };

  float acc[MT][4];
  zero<MT>(acc);

  auto compute = [&](const UnitStage<U>& st, int u) {
    if (u >= units) return;
    float pv[MT][4], p1[MT][4];
    zero<MT>(pv);
    zero<MT>(p1);
    const uint32_t* xu[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xu[mt] = xr[mt] + u * (U * 16);
#pragma unroll
    for (int i = 0; i < U; ++i) {
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        const uint32_t q = step == 0 ? st.q[i].x : st.q[i].y;
        uint32_t a[4];
        if constexpr (kLane) {  // byte j: fragment elements 2j, 2j + 1, row g + 8 (j & 1)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t h = j & 1 ? 2048 : 0;
            a[j] = pack2<T>(lds_f32((code_x128(q, 2 * j) | p.lane_base) + h),
                            lds_f32((code_x128(q, 2 * j + 1) | p.lane_base) + h));
          }
        } else {
          pair_fragment(q, p.pair_base, a);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t b[2] = {__ldg(xu[mt] + i * 16 + step * 8),
                                 __ldg(xu[mt] + i * 16 + step * 8 + 4)};
          mma_post<T>(pv[mt], p1[mt], a, b);
        }
      }
    }
    post_scale_add<MT>(acc, pv, p1, st.s_lo, st.s_hi, st.z_lo, st.z_hi);
  };

  run_stages<UnitStage<U>>(
      p.warp, units, kWarps, load,
      [&] {
        build_tables<T, TT, !kLane, kWarps * 32>(lut, p.tile, int_offset, p.lane_s, p.pair_s,
                                                &raw_s[0][0]);
      },
      compute);

  reduce_store<T, MT, kWarps>(red_s, acc, y, M, N, p.tile, p.m_base);
}

// Launch for any M and any group size (a multiple of 32): U = the largest of 4, 2, 1 that
// divides g / 32.
template <typename T, typename TT, int kWarps, bool kLane, int kMinBlocks>
cudaError_t launch_unit(cudaStream_t stream, const T* x, const uint2* codes, const TT* lut,
                        const TT* scales, const TT* zeros, T* y, int M, int N, int K,
                        int group_size, int int_offset) {
  const dim3 block(kWarps * 32);
  const dim3 grid(N / kTileN, M <= 8 ? 1 : (M + 15) / 16);
  const int per_group = group_size / kChunkK;
  const int U = per_group % 4 == 0 ? 4 : per_group % 2 == 0 ? 2 : 1;
  const uint32_t magic = chunk_div_magic(per_group / U);
  // two batch tiles (M > 8) hold twice the accumulators: at most 2 blocks per SM there (the
  // lane table's U = 4 kernel spills under the 80-register cap of 3 blocks of 8 warps)
  constexpr int kMinBlocks2 = kMinBlocks < 2 ? kMinBlocks : 2;
#define ANY4_UNIT(MT_, U_)                                                                  \
  lut_gemm_unit_kernel<T, TT, MT_, kWarps, U_, kLane, MT_ == 1 ? kMinBlocks : kMinBlocks2>   \
      <<<grid, block, 0, stream>>>(x, codes, lut, scales, zeros, y, M, N, K, magic, int_offset)
  if (M <= 8) {
    if (U == 4) ANY4_UNIT(1, 4);
    else if (U == 2) ANY4_UNIT(1, 2);
    else ANY4_UNIT(1, 1);
  } else {
    if (U == 4) ANY4_UNIT(2, 4);
    else if (U == 2) ANY4_UNIT(2, 2);
    else ANY4_UNIT(2, 1);
  }
#undef ANY4_UNIT
  return cudaGetLastError();
}

}  // namespace any4
