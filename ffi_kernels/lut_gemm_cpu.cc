// The LUT GEMM for small batches on the CPU, as an XLA FFI handler: `implementation="cpu"`
// of lut_matmul (any4_jax/kernels/cpu.py compiles it on first use with -march=native).
//
//   y[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = fma(lut[n, c[n, k]], s[n, k / g], z[n, k / g])
//
// x float32 (the wrapper widens bf16 / f16 x); tables, scales and zeros float32, bf16 or f16;
// codes the canonical packed [N, K/2] uint8 (element 2j in the low nibble of byte j). Decode is
// memory-bound: this reads 4-bit codes once per 4 rows of x instead of a dequantized float32
// matrix. With AVX-512 and groups of a multiple of 64, 64 codes a step: the 32 bytes read as 16
// words widened to 32-bit indices, each word's four codes looked up by one permute (vpermps)
// after shifts by 0/4/8/12 (x put in that order once per call); otherwise 16 codes a step (8
// bytes split into nibbles, widened, one permute). The lookups read the row's table scaled by
// the group's scale and zero (one FMA per group), then one FMA per weight and row of x. AVX2
// does 8 at a time (two 8-entry permutes and a blend); other CPUs take the scalar loop. The
// weight is the reference's, bit for bit: one rounding (as fmaf), then, for bf16 / f16
// activations, rounding to that dtype (round to nearest even), as `dequantize(x.dtype)` does;
// x is exact in float32 and the sums are float32. One exception is post-scaled (per group
// sum(lut[c] x), then the scale, the zero times the group's sum of x): every bf16 call with
// bf16 tables on a CPU with AVX512_BF16, which runs through vdpbf16ps (`rows_dot_bf16_any`).
// Rows of w are split over the calling thread and the helper threads of spin_pool_cpu.h. One
// call may take several weights that share x (a layer's q/k/v): their rows are split together.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "spin_pool_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMB = 4;  // rows of x per pass over a weight row

// What the weight is rounded to before the products (x's dtype).
enum Round : int { kNone = 0, kBF16 = 1, kF16 = 2 };

inline float round_scalar(float w, int round) {
  if (round == kBF16) {
    uint32_t u;
    __builtin_memcpy(&u, &w, 4);
    if ((u & 0x7F800000u) != 0x7F800000u) u += 0x7FFFu + ((u >> 16) & 1u);  // finite: RNE
    u &= 0xFFFF0000u;
    __builtin_memcpy(&w, &u, 4);
    return w;
  }
  if (round == kF16) return static_cast<float>(static_cast<_Float16>(w));
  return w;
}

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

// Tables, scales and zeros arrive in the weight's own dtype (float32, bf16 or f16): widening
// them to float32 before the call cost a bf16 model ~60% more time per GEMV at M = 1
// (docs/cpu_kernel_notes.md, v5); the vector paths widen a row's table in registers
// (`row_table`) and its scales and zeros once per row, the scalar loop where it reads them.
enum Param : int { kParamF32 = 0, kParamBF16 = 1, kParamF16 = 2 };
inline float widen(const void* p, int64_t i, int dt) {
  if (dt == kParamBF16) {
    const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  if (dt == kParamF16) return static_cast<float>(static_cast<const _Float16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

struct Problem {
  const float* x;
  const uint8_t* codes;
  const void* lut;
  const void* scales;
  const void* zeros;
  float* y;
  int64_t M, N, K, g;
  int round;
  int param;  // Param: the dtype of lut, scales and zeros
  const float* xsum;  // [M, K / g]: each group's sum of x (the vdpbf16ps path only)
  const uint16_t* xbf;  // [M, K]: x as bf16 in the order dot_bf16 reads it (that path only)
  const float* xw;  // [M, K]: x in the order Isa::lookup_wide gives the weights (wide() only)
  int64_t groups;  // K / g, once per call (the vector rows read it: a division per row cost
                   // as much as a 64-code group)
};

// The 64-codes-a-step AVX-512 lookup (Isa::lookup_wide) serves groups of a multiple of 64.
inline bool wide(const Problem& p) {
#if defined(__AVX512F__)
  return p.g % 64 == 0;
#else
  (void)p;
  return false;
#endif
}

// Weight rows [n0, n1), every row of x; the scalar loop (any K and group size).
void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t groups = p.K / p.g;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = p.codes + n * (p.K / 2);
    float lut[16];
    for (int i = 0; i < 16; ++i) lut[i] = widen(p.lut, n * 16 + i, p.param);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xm = p.x + m * p.K;
      float acc = 0.f;
      for (int64_t grp = 0; grp < groups; ++grp) {
        const float s = widen(p.scales, n * groups + grp, p.param);
        const float z = widen(p.zeros, n * groups + grp, p.param);
        for (int64_t k = grp * p.g; k < (grp + 1) * p.g; k += 2) {
          const uint8_t b = c[k / 2];
          acc += xm[k] * round_scalar(std::fmaf(lut[b & 0xF], s, z), p.round);
          acc += xm[k + 1] * round_scalar(std::fmaf(lut[b >> 4], s, z), p.round);
        }
      }
      p.y[m * p.N + n] = acc;
    }
  }
}

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

// The vdpbf16ps path's step: 128 codes when the groups allow (512-bit vectors), else 64.
inline int dot_step(const Problem& p) { return p.g % 128 == 0 ? 128 : 64; }

// Index in x (within a step of S codes) of the weight at position `pos` of that step: the
// j-th lookup (positions S/4 * j ..) holds code 4i + j in its word i.
inline int dot_order(int pos, int step) {
  const int per = step / 4;
  return 4 * (pos % per) + pos / per;
}

// x [M, K] with each step of `step` codes in the order the lookups give the weights
// (`dot_order`), each value passed through `conv`.
template <class T, class Conv>
std::vector<T> x_in_dot_order(const Problem& p, int step, Conv conv) {
  std::vector<T> out(p.M * p.K);
  int order[128];
  for (int pos = 0; pos < step; ++pos) order[pos] = dot_order(pos, step);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t k0 = 0; k0 < p.K; k0 += step)
      for (int pos = 0; pos < step; ++pos)
        out[m * p.K + k0 + pos] = conv(p.x[m * p.K + k0 + order[pos]]);
  return out;
}

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

// The vdpbf16ps path: bf16 x and bf16 tables, scales and zeros, any M the kernel takes,
// groups of a multiple of 64 codes, on a CPU with AVX512_BF16 (the library is built for this
// CPU). Post-scaled at every M (so a call's rows agree bit for bit whatever M is).
bool dot_bf16(const Problem& p) {
  return kHaveDotBf16 && p.round == kBF16 && p.param == kParamBF16 && p.g % 64 == 0;
}

void rows(const Problem& p, int64_t n0, int64_t n1) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (dot_bf16(p)) {
    return dot_step(p) == 128 ? rows_dot_bf16_any<Dot512>(p, n0, n1)
                              : rows_dot_bf16_any<Dot256>(p, n0, n1);
  }
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
  if (p.g % kVec == 0) {
    if (p.round == kBF16) return rows_vector<kBF16>(p, n0, n1);
    if (p.round == kF16) return rows_vector<kF16>(p, n0, n1);
    return rows_vector<kNone>(p, n0, n1);
  }
#endif
  rows_scalar(p, n0, n1);
}

// Decodes weight `i` of a call (codes, lut, scales, zeros at args 4i.., y at ret i) into `p`,
// whose x, M, K, g, round are set; an error names what is wrong.
ffi::Error weight_problem(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                          size_t i, Problem& p) {
  auto codes = args.get<ffi::AnyBuffer>(4 * i), lut = args.get<ffi::AnyBuffer>(4 * i + 1),
       scales = args.get<ffi::AnyBuffer>(4 * i + 2), zeros = args.get<ffi::AnyBuffer>(4 * i + 3);
  auto y = rets.get<ffi::AnyBuffer>(i);
  if (!codes.has_value() || !lut.has_value() || !scales.has_value() || !zeros.has_value() ||
      !y.has_value()) {
    return ffi::Error::InvalidArgument("any4_lut_gemm_cpu: every weight's arrays are buffers");
  }
  const auto cd = codes->dimensions(), yd = (*y)->dimensions();
  if (cd.size() != 2 || lut->dimensions().size() != 2 || scales->dimensions().size() != 2 ||
      zeros->dimensions().size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "any4_lut_gemm_cpu: codes [N, K/2], lut [N, 16], scales and zeros [N, K/g], y [M, N]");
  }
  const ffi::DataType dt = lut->element_type();
  if (scales->element_type() != dt || zeros->element_type() != dt ||
      (dt != ffi::DataType::F32 && dt != ffi::DataType::BF16 && dt != ffi::DataType::F16)) {
    return ffi::Error::InvalidArgument(
        "any4_lut_gemm_cpu: lut, scales and zeros must share one dtype: float32, bf16 or f16");
  }
  if (codes->element_type() != ffi::DataType::U8 || (*y)->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("any4_lut_gemm_cpu: codes are uint8, y float32");
  }
  p.param = dt == ffi::DataType::BF16 ? kParamBF16 : dt == ffi::DataType::F16 ? kParamF16
                                                                             : kParamF32;
  p.codes = static_cast<const uint8_t*>(codes->untyped_data());
  p.lut = lut->untyped_data();
  p.scales = scales->untyped_data();
  p.zeros = zeros->untyped_data();
  p.y = static_cast<float*>((*y)->untyped_data());
  p.N = cd[0];
  if (p.K != 2 * cd[1] || lut->dimensions()[0] != p.N || lut->dimensions()[1] != 16 ||
      scales->dimensions()[0] != p.N || scales->dimensions()[1] != p.groups ||
      zeros->dimensions()[0] != p.N || zeros->dimensions()[1] != p.groups || yd[0] != p.M ||
      yd[1] != p.N) {
    return ffi::Error::InvalidArgument("any4_lut_gemm_cpu: inconsistent shapes");
  }
  return ffi::Error::Success();
}

// y_i = x @ w_i^T for one or more weights that share x (a layer's q/k/v or gate/up
// projections: one call instead of three or two, nn.QuantDense.apply_shared): args are x then
// (codes, lut, scales, zeros) per weight, results one y [M, N_i] per weight. The weights share
// K, the group size and the tables' dtype; their rows are split over the threads together.
ffi::Error LutGemmCpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, int64_t group_size, int64_t round) {
  const auto xd = x.dimensions();
  const size_t sets = rets.size();
  if (xd.size() != 2 || sets == 0 || args.size() != 4 * sets) {
    return ffi::Error::InvalidArgument(
        "any4_lut_gemm_cpu: x [M, K], then codes, lut, scales and zeros per weight, one y each");
  }
  if (group_size <= 0 || xd[1] % group_size) {
    return ffi::Error::InvalidArgument("any4_lut_gemm_cpu: K must be a multiple of group_size");
  }
  if (group_size % 2) {  // a byte's two codes would straddle two groups (the scalar loop)
    return ffi::Error::InvalidArgument("any4_lut_gemm_cpu: the group size must be even");
  }
  Problem p{};  // what the weights share
  p.x = x.typed_data();
  p.M = xd[0];
  p.K = xd[1];
  p.g = group_size;
  p.groups = p.K / p.g;
  p.round = static_cast<int>(round);
  std::vector<Problem> probs(sets, p);
  for (size_t i = 0; i < sets; ++i) {
    if (ffi::Error e = weight_problem(args, rets, i, probs[i]); e.failure()) return e;
    if (probs[i].param != probs[0].param) {
      return ffi::Error::InvalidArgument(
          "any4_lut_gemm_cpu: the weights of one call share their tables' dtype");
    }
  }
  p.param = probs[0].param;
  const int64_t groups = p.groups;
  if (p.M == 0) return ffi::Error::Success();
  // each group's sum of x, once per call, for the post-scaled vdpbf16ps path
  std::vector<float> xsum;
  if (dot_bf16(p)) {
    xsum.resize(p.M * groups);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t grp = 0; grp < groups; ++grp) {
        float t = 0.f;
        for (int64_t k = grp * p.g; k < (grp + 1) * p.g; ++k) t += p.x[m * p.K + k];
        xsum[m * groups + grp] = t;
      }
    p.xsum = xsum.data();
  }
  // x in the vdpbf16ps path's order, as bf16 (exact: x was bf16, widened by the wrapper)
  std::vector<uint16_t> xbf;
  if (dot_bf16(p)) {
    xbf = x_in_dot_order<uint16_t>(p, dot_step(p), [](float v) {
      uint32_t u;
      __builtin_memcpy(&u, &v, 4);
      return static_cast<uint16_t>(u >> 16);
    });
    p.xbf = xbf.data();
  }
  // x in the order Isa::lookup_wide gives the weights (64 codes a step), for the vector paths
  std::vector<float> xw;
  if (wide(p) && !dot_bf16(p)) {
    xw = x_in_dot_order<float>(p, 64, [](float v) { return v; });
    p.xw = xw.data();
  }
  for (Problem& q : probs) {
    q.xsum = p.xsum;
    q.xbf = p.xbf;
    q.xw = p.xw;
  }
  // Rows of w in chunks claimed from a shared counter by this thread and by the helper
  // threads of `SpinPool` (spin_pool_cpu.h: awake helpers; tasks on XLA's pool started too
  // late to take a share of a small call). The caller works too and then waits only for
  // chunks other threads have claimed (they are running), never for one not yet claimed, so a
  // call never depends on a helper. The state is shared with the helpers, so one that comes
  // after the call has returned finds no chunk left and touches nothing else.
  struct Chunk {
    const Problem* p;
    int64_t n0, n1;
  };
  struct State : any4::SpinJob {
    std::vector<Problem> probs;
    std::vector<Chunk> list;
    int64_t chunks = 0;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
#if defined(__x86_64__)
    unsigned int csr = _mm_getcsr();  // the caller's floating-point mode (XLA flushes denormals)
#endif
    void run() override {
#if defined(__x86_64__)
      // a helper computes in the caller's mode, so a row's bits do not depend on the thread
      const unsigned int own = _mm_getcsr();
      _mm_setcsr(csr);
      struct Restore {
        unsigned int v;
        ~Restore() { _mm_setcsr(v); }
      } restore{own};
#endif
      for (;;) {
        const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= chunks) return;
        rows(*list[c].p, list[c].n0, list[c].n1);
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
          std::lock_guard<std::mutex> lock(mu);
          cv.notify_all();
        }
      }
    }
  };
  // This thread and pool.num_threads() - 1 helpers: one runner per core (XLA's pool is sized
  // to the cores), so the runners do not crowd each other off the cores.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // at least 64K weight-rows per chunk, so that claiming one costs little; SmolLM2's 576 x 576
  // GEMV takes five (its decode step's GEMVs: 1.1x faster than with 256K, v7). Chunks of the
  // same number of rows across the weights (a weight's last one may be shorter).
  int64_t rows_total = 0;
  for (const Problem& q : probs) rows_total += q.N;
  if (rows_total == 0) return ffi::Error::Success();
  const int64_t work = rows_total * p.K * p.M;
  const int64_t target = std::max<int64_t>(1, std::min<int64_t>(4 * threads, work >> 16));
  const int64_t per = (rows_total + target - 1) / target;
  auto st = std::make_shared<State>();
  st->probs = std::move(probs);
  // chunks point into st->probs, built after the move and never resized: the pointers hold
  for (const Problem& q : st->probs)
    for (int64_t n0 = 0; n0 < q.N; n0 += per) {
      st->list.push_back({&q, n0, std::min(q.N, n0 + per)});
    }
  st->chunks = static_cast<int64_t>(st->list.size());
  if (st->chunks > 1) {
    if (any4::SpinPool* helpers = any4::SpinPool::get(static_cast<int>(threads - 1))) {
      helpers->post(st, static_cast<int>(std::min<int64_t>(threads, st->chunks) - 1));
    }
  }
  st->run();
  // the chunks still out are being run by other threads: a chunk is short, so wait awake for
  // a while (2000 pauses: 10-100 us, by the CPU), then sleep until the last one is done
  for (int i = 0; i < 2000 && st->done.load(std::memory_order_acquire) < st->chunks; ++i) {
    ANY4_SPIN_PAUSE();
  }
  if (st->done.load(std::memory_order_acquire) < st->chunks) {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load(std::memory_order_acquire) == st->chunks; });
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" int Any4LutGemmCpuVectorWidth() { return kVec; }
// How long (us) the helper threads wait awake for the next call (ANY4_JAX_CPU_SPIN_US).
extern "C" void Any4LutGemmCpuSetSpinUs(long us) {
  any4::SpinPool::spin_us().store(us > 0 ? us : 0, std::memory_order_relaxed);
}
// 1 when the library has the vdpbf16ps path (AVX512_BF16), else 0.
extern "C" int Any4LutGemmCpuDotBf16() { return kHaveDotBf16 ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(Any4LutGemmCpu, LutGemmCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  // per weight: codes [N, K/2] uint8, lut [N, 16] (f32,
                                  // bf16, f16), scales and zeros [N, K/g] in lut's dtype
                                  .RemainingArgs()
                                  .RemainingRets()  // per weight: y [M, N] float32
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("round"));
