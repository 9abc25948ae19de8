// The CPU LUT GEMM's vdpbf16ps path (bf16 activations and bf16 tables on a CPU with
// AVX512_BF16). Included by lut_gemm_cpu.cc.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "lut_gemm_problem_cpu.h"
#include "lut_gemm_vector_cpu.h"  // prefetch_codes

namespace {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 activations and bf16 tables, any number of rows of x: vdpbf16ps, 32 products
// and sums per instruction (docs/cpu_kernel_notes.md, v6). The codes are looked up without
// unpacking them: read as 16-bit words, each word holds four codes, and vpermw looks a table
// up with the low bits of every word; a table of the 16 entries repeated (32 words for 512-bit
// vectors, whose vpermw reads 5 bits) ignores the next code's bit. Shifting the words by 4, 8
// and 12 bits gives the other three codes of each word. Per 128 codes: one load, three shifts,
// four permutes and four dot products (against 8 lookups, 8 widenings and 8 FMAs before).
// The weights come out in a fixed order (word i of the j-th lookup is code 4i + j); x is put
// in that order once per call (`dot_order`), so nothing is reordered per weight. Post-scaled:
// per group sum(lut[c] x), then the scale; the zero times the
// group's sum of x at the end. Each product of two bf16 values is exact in float32;
// vdpbf16ps adds them in float32 with denormals flushed to zero.
constexpr bool kHaveDotBf16 = true;

// 512-bit vectors take 128 codes a step (groups of a multiple of 128), 256-bit ones 64.
struct Dot512 {
  using I = __m512i;
  using F = __m512;
  using B = __m512bh;
  static constexpr int kStep = 128;
  static I table(__m256i t) { return _mm512_broadcast_i64x4(t); }  // 16 entries, twice
  static I load(const uint8_t* c) { return _mm512_loadu_si512(c); }
  static I shift(I v, int s) { return _mm512_srli_epi16(v, s); }
  static B lookup(I idx, I t) { return reinterpret_cast<B>(_mm512_permutexvar_epi16(idx, t)); }
  static F zero() { return _mm512_setzero_ps(); }
  static B loadx(const uint16_t* x) { return reinterpret_cast<B>(_mm512_loadu_si512(x)); }
  static F dot(F acc, B w, B x) { return _mm512_dpbf16_ps(acc, w, x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fma(F a, float s, F c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(s), c); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
};
struct Dot256 {
  using I = __m256i;
  using F = __m256;
  using B = __m256bh;
  static constexpr int kStep = 64;
  static I table(__m256i t) { return t; }  // vpermw on 256 bits reads 4 bits: 16 entries
  static I load(const uint8_t* c) { return _mm256_loadu_si256(reinterpret_cast<const I*>(c)); }
  static I shift(I v, int s) { return _mm256_srli_epi16(v, s); }
  static B lookup(I idx, I t) { return reinterpret_cast<B>(_mm256_permutexvar_epi16(idx, t)); }
  static F zero() { return _mm256_setzero_ps(); }
  static B loadx(const uint16_t* x) {
    return reinterpret_cast<B>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static F dot(F acc, B w, B x) { return _mm256_dpbf16_ps(acc, w, x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, float s, F c) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), c); }
  static float sum(F a) { return _mm512_reduce_add_ps(_mm512_zextps256_ps512(a)); }
};

// NB rows of w (n, n + 1, ..) against MB (1 or 2) rows of x. x is read once per NB rows of
// w (at M = 1 it is four times the bytes of the codes it meets: reading it for every row of
// w made a 14336-wide row 35% slower per weight than a 4096-wide one, whose x stays in L1).
// Two accumulators per (row of w, row of x), the lookups of a step in turn: independent
// chains hide the dot product's latency. Every row of w and of x is summed in the same order
// whatever NB and MB are, so a row's result does not depend on its neighbours in the call.
constexpr int64_t kL1Half = 16 << 10;  // bytes: half of a core's L1 data cache here

template <class D, int MB, int NB, int C>
inline void rows_dot_block(const Problem& p, int64_t n, int64_t m0) {
  constexpr int S = D::kStep, Q = S / 4;
  const int64_t groups = p.K / p.g;
  typename D::I t[NB];
  const uint8_t* c[NB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) {
    t[r] = D::table(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.lut) + (n + r) * 16)));
    c[r] = p.codes + (n + r) * (p.K / 2);
  }
  typename D::F tot[NB][MB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) tot[r][i] = D::zero();
  for (int64_t grp = 0; grp < groups; ++grp) {
    typename D::F acc[NB][MB][C];
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r)
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 2
        for (int u = 0; u < C; ++u) acc[r][i][u] = D::zero();
    for (int64_t k = grp * p.g, k1 = k + p.g; k < k1; k += S) {
      typename D::B w[NB][4];
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        prefetch_codes(c[r] + k / 2);
        const typename D::I v = D::load(c[r] + k / 2);
        w[r][0] = D::lookup(v, t[r]);
        w[r][1] = D::lookup(D::shift(v, 4), t[r]);
        w[r][2] = D::lookup(D::shift(v, 8), t[r]);
        w[r][3] = D::lookup(D::shift(v, 12), t[r]);
      }
      // each vector of x read once for the NB rows of w
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const uint16_t* x = p.xbf + (m0 + i) * p.K + k;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const typename D::B xv = D::loadx(x + j * Q);
#pragma GCC unroll 4
          for (int r = 0; r < NB; ++r)
            acc[r][i][j % C] = D::dot(acc[r][i][j % C], w[r][j], xv);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const float s = widen(p.scales, (n + r) * groups + grp, p.param);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        typename D::F a = acc[r][i][0];
        if constexpr (C > 1) a = D::add(a, acc[r][i][1]);
        tot[r][i] = D::fma(a, s, tot[r][i]);
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) {
      float y = D::sum(tot[r][i]);
      const float* xs = p.xsum + (m0 + i) * groups;
      for (int64_t grp = 0; grp < groups; ++grp)
        y = std::fmaf(widen(p.zeros, (n + r) * groups + grp, p.param), xs[grp], y);
      p.y[(m0 + i) * p.N + n + r] = y;
    }
}

// Rows [n0, n1) of w against every row of x. One or two rows of x: two rows of w at a time
// when x is larger than half of L1 (a 14336-wide x: 1.1x at M = 1, 1.3x at M = 2), else one
// (two at a time measured 1.3-1.8x slower on 4096-wide rows, unexplained;
// docs/cpu_kernel_notes.md, v6). More rows of x: one row of w against blocks of up to four
// rows of x (the lookups shared by the block).
template <class D>
void rows_dot_bf16_any(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (p.M <= 2) {  // two chains per row of x (one or two rows leave the latency exposed)
    if (p.M * p.K * 2 > kL1Half) {
      for (; n + 2 <= n1; n += 2) {
        if (p.M == 1) rows_dot_block<D, 1, 2, 2>(p, n, 0);
        else rows_dot_block<D, 2, 2, 2>(p, n, 0);
      }
    }
    for (; n < n1; ++n) {
      if (p.M == 1) rows_dot_block<D, 1, 1, 2>(p, n, 0);
      else rows_dot_block<D, 2, 1, 2>(p, n, 0);
    }
    return;
  }
  // three or more rows: blocks of up to four rows of x against two rows of w, one chain each
  auto blocks = [&](auto nb, int64_t row) {
    constexpr int NB = decltype(nb)::value;
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (std::min<int64_t>(4, p.M - m0)) {
        case 1: rows_dot_block<D, 1, NB, 1>(p, row, m0); break;
        case 2: rows_dot_block<D, 2, NB, 1>(p, row, m0); break;
        case 3: rows_dot_block<D, 3, NB, 1>(p, row, m0); break;
        default: rows_dot_block<D, 4, NB, 1>(p, row, m0); break;
      }
    }
  };
  for (; n + 2 <= n1; n += 2) blocks(std::integral_constant<int, 2>{}, n);
  for (; n < n1; ++n) blocks(std::integral_constant<int, 1>{}, n);
}

#else
constexpr bool kHaveDotBf16 = false;
#endif

}  // namespace
