// The CPU LUT GEMM's vector paths (AVX-512: 16 or 64 codes a step; AVX2: 8), with the row's
// table scaled per group, for every dtype but the vdpbf16ps one (lut_gemm_dot_bf16_cpu.h).
// Included by lut_gemm_cpu.cc.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "lut_gemm_problem_cpu.h"

namespace {

#if defined(__AVX512F__) || defined(__AVX2__)
// The bytes of a 128-bit register's low half -> their nibbles as bytes, in code order (code
// 2j is the low nibble of byte j).
inline __m128i nibbles(__m128i b) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
}
constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// What differs between the instruction sets, as one struct Isa; rows_vector and the rounding
// below are written once over it.
#if defined(__AVX512F__)
struct Isa {  // 16 codes a step: the row's table is one register, one permute looks it up
  using Vec = __m512;
  using Table = __m512;
  static Vec lookup(const Table& t, const uint8_t* p) {  // the values of p's 16 codes
    const __m128i c = nibbles(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c), t);
  }
  // The values of p's 64 codes (32 bytes) as four vectors, in the order the lookups give
  // them: lane i of vector j is code 4i + j. The bytes are read as 16 words, each widened to
  // a 32-bit index; vpermps reads an index's low 4 bits only, so shifts by 0, 4, 8 and 12
  // select each word's four codes with no masking or unpacking: 8 instructions per 64 codes
  // instead of 15 (docs/cpu_kernel_notes.md, v7). x is put in this order once per call
  // (`dot_order` with steps of 64).
  static constexpr int kWide = 4;
  static void lookup_wide(const Table& t, const uint8_t* p, Vec out[kWide]) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i w = _mm512_cvtepu16_epi32(words);
    out[0] = _mm512_permutexvar_ps(w, t);
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), t);
    out[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 8), t);
    out[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 12), t);
  }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Vec a) { return _mm512_reduce_add_ps(a); }
  static Vec f16_round(Vec w) { return _mm512_cvtph_ps(_mm512_cvtps_ph(w, kRne)); }
};
#else
struct Isa {  // 8 codes a step: a permute reads 8 entries, so both table halves and a blend
  using Vec = __m256;
  struct Table {
    __m256 lo, hi;
  };
  static constexpr int kWide = 1;
  static void lookup_wide(const Table& t, const uint8_t* p, Vec out[kWide]) {
    out[0] = lookup(t, p);
  }
  static Vec lookup(const Table& t, const uint8_t* p) {  // the values of p's 8 codes
    int32_t word;
    __builtin_memcpy(&word, p, 4);
    const __m256i idx = _mm256_cvtepu8_epi32(nibbles(_mm_cvtsi32_si128(word)));
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);  // uses the low 3 bits
    const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
    const __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(lo, hi, high);
  }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static Vec f16_round(Vec w) { return _mm256_cvtph_ps(_mm256_cvtps_ph(w, kRne)); }
};
#endif

using Vec = Isa::Vec;
constexpr int kVec = sizeof(Vec) / sizeof(float);

// The weight rounded to x's dtype. bf16: round to nearest even on the top 16 bits (finite
// weights), in integer lanes (GCC vector arithmetic: the same instructions for either width).
template <int R>
inline Vec vround(Vec w) {
  if constexpr (R == kBF16) {
    using U32 = uint32_t __attribute__((vector_size(sizeof(Vec))));
    const U32 u = reinterpret_cast<U32>(w);
    return reinterpret_cast<Vec>((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
  } else if constexpr (R == kF16) {
    return Isa::f16_round(w);
  } else {
    return w;
  }
}

// The row's table scaled for one group and rounded to x's dtype: lane c is the dequantized
// weight of code c, fmaf(lut[c], s, z) rounded, bit for bit what the reference computes per
// weight (a lookup moves lanes; it does not change them). One FMA per group instead of one
// per 16 weights (docs/cpu_kernel_notes.md, v8).
template <int R>
inline Isa::Table scaled_table(const Isa::Table& t, Vec s, Vec z) {
#if defined(__AVX512F__)
  return vround<R>(Isa::fma(t, s, z));
#else
  return {vround<R>(Isa::fma(t.lo, s, z)), vround<R>(Isa::fma(t.hi, s, z))};
#endif
}

#else
constexpr int kVec = 0;
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// The codes kPrefetch bytes ahead of `c` (2 rows of 4096 codes; past a row's end they are the
// next rows', which the same thread reads next), asked for a step ahead of their use: the
// hardware prefetchers alone left one core reading 7-8 GB/s from memory; with this 9-11
// (docs/cpu_kernel_notes.md, v8). A prefetch past the array's end does not fault.
constexpr int kPrefetch = 4096;
inline void prefetch_codes(const uint8_t* c) {  // the address as an integer: it may be past
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) + kPrefetch),
               _MM_HINT_T0);
}

// Row n's 16 table entries as float32, widened in registers. (Widening them one by one into
// a stack array and loading that as a vector stalled each row on store forwarding: 576-wide
// rows 1.6x slower per weight than with this, docs/cpu_kernel_notes.md, v8.)
inline Isa::Table row_table(const Problem& p, int64_t n) {
#if defined(__AVX512F__)
  if (p.param == kParamF32) return _mm512_loadu_ps(static_cast<const float*>(p.lut) + n * 16);
  const __m256i h = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.lut) + n * 16));
  if (p.param == kParamF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  if (p.param == kParamF32) {
    const float* t = static_cast<const float*>(p.lut) + n * 16;
    return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)};
  }
  const uint16_t* t = static_cast<const uint16_t*>(p.lut) + n * 16;
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 8));
  if (p.param == kParamF16) return {_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi)};
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16))};
#endif
}
// Rows [m0, m0 + MB) of x against weight row n, with U accumulators per row of x: U
// independent FMA chains, so that a single row of x (decoding) is not bound by the FMA
// latency (one chain: one FMA per 4 cycles). Needs g a multiple of a step's codes (U vectors;
// W vectors with the 64-code lookup).
// The reference's arithmetic: the weight is fmaf(lut, s, z) rounded to x's dtype (bit for bit
// the dequantized weight), computed once per group on the table (`scaled_table`) and looked
// up from it, so a weight costs its lookup and one FMA with x. `s` and `z` are the row's
// scales and zeros as float32. GS: steps per group when known at compile time (g = 64 with
// 64-code steps: one, no inner loop), 0 otherwise.
// Not inlined: each form gets its own register allocation (inlined into rows_vector beside
// the other forms, GCC kept the accumulators on the stack: 0.73x at M = 1).
template <int R, int MB, int U, int W, int GS>
__attribute__((noinline)) void row_block(const Problem& p, int64_t n, int64_t m0,
                                         const Isa::Table& lut, const float* s, const float* z) {
  constexpr int kStep = kVec * (W > 1 ? W : U);  // codes per step
  const int64_t groups = p.groups;
  const int64_t steps = GS ? GS : p.g / kStep;
  const uint8_t* c = p.codes + n * (p.K / 2);
  const float* xm = (W > 1 ? p.xw : p.x) + m0 * p.K;
  Vec acc[MB][U];
  for (int i = 0; i < MB; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = Vec{};
  for (int64_t grp = 0; grp < groups; ++grp) {
    // this group's weights: the table scaled and rounded
    const Isa::Table gl = scaled_table<R>(lut, Isa::set1(s[grp]), Isa::set1(z[grp]));
    for (int64_t st = 0; st < steps; ++st, c += kStep / 2, xm += kStep) {
      if constexpr (W > 1) {  // kWide vectors of codes per step, the accumulators in turn
        prefetch_codes(c);
        Vec v[Isa::kWide];
        Isa::lookup_wide(gl, c, v);
        for (int j = 0; j < W; ++j)
          for (int i = 0; i < MB; ++i)
            acc[i][j % U] = Isa::fma(v[j], Isa::load(xm + i * p.K + j * kVec), acc[i][j % U]);
      } else {  // U vectors of codes per step, one per accumulator
        for (int u = 0; u < U; ++u) {
          const Vec w = Isa::lookup(gl, c + u * kVec / 2);
          for (int i = 0; i < MB; ++i)
            acc[i][u] = Isa::fma(w, Isa::load(xm + i * p.K + u * kVec), acc[i][u]);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    Vec t = acc[i][0];
    for (int u = 1; u < U; ++u) t = t + acc[i][u];
    p.y[(m0 + i) * p.N + n] = Isa::sum(t);
  }
}

// MB rows of x. With AVX-512 and groups of a multiple of 64 codes, 64 codes per lookup step
// (`Isa::lookup_wide`, x read in its order) at every M: four chains per row for one or two
// rows of x (one chain waits on the FMA latency: 1.2x at M = 1, docs/cpu_kernel_notes.md,
// v3 and v7a), one per row for more (the rows already give independent chains). Otherwise 16
// (8) codes per step, two chains for one or two rows. Every block of one call sums in the same
// order, so a row's result does not depend on where in the call it sits.
template <int R, int MB>
inline void row_block_any(const Problem& p, int64_t n, int64_t m0, const Isa::Table& lut,
                          const float* s, const float* z) {
  if constexpr (Isa::kWide > 1) {
    if (wide(p)) {
      constexpr int S = kVec * Isa::kWide;
      if (p.M <= 2) {
        if (p.g == S) return row_block<R, MB, 4, Isa::kWide, 1>(p, n, m0, lut, s, z);
        return row_block<R, MB, 4, Isa::kWide, 0>(p, n, m0, lut, s, z);
      }
      if (p.g == S) return row_block<R, MB, 1, Isa::kWide, 1>(p, n, m0, lut, s, z);
      return row_block<R, MB, 1, Isa::kWide, 0>(p, n, m0, lut, s, z);
    }
  }
  if (p.M <= 2 && p.g % (2 * kVec) == 0) {
    return row_block<R, MB, 2, 1, 0>(p, n, m0, lut, s, z);
  }
  row_block<R, MB, 1, 1, 0>(p, n, m0, lut, s, z);
}

// Weight rows [n0, n1) with vectors (K and g multiples of kVec). Each row's table, scales and
// zeros are widened to float32 once (float32 ones are read in place), so the group loop
// broadcasts a float from memory instead of widening by dtype.
template <int R>
void rows_vector(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t groups = p.K / p.g;
  std::vector<float> widened(p.param == kParamF32 ? 0 : 2 * groups);
  for (int64_t n = n0; n < n1; ++n) {
    const Isa::Table lut = row_table(p, n);
    const float *s, *z;
    if (p.param == kParamF32) {
      s = static_cast<const float*>(p.scales) + n * groups;
      z = static_cast<const float*>(p.zeros) + n * groups;
    } else {
      for (int64_t grp = 0; grp < groups; ++grp) {
        widened[grp] = widen(p.scales, n * groups + grp, p.param);
        widened[groups + grp] = widen(p.zeros, n * groups + grp, p.param);
      }
      s = widened.data();
      z = widened.data() + groups;
    }
    for (int64_t m0 = 0; m0 < p.M; m0 += kMB) {
      switch (std::min<int64_t>(kMB, p.M - m0)) {
        case 1: row_block_any<R, 1>(p, n, m0, lut, s, z); break;
        case 2: row_block_any<R, 2>(p, n, m0, lut, s, z); break;
        case 3: row_block_any<R, 3>(p, n, m0, lut, s, z); break;
        default: row_block_any<R, kMB>(p, n, m0, lut, s, z); break;
      }
    }
  }
}
#endif

}  // namespace
