// The CPU LUT GEMM's problem (one weight's call: pointers, shapes, dtypes), the reference's
// rounding and widening, the scalar loop, and the order the 64-code lookups give the weights
// in. Included by lut_gemm_cpu.cc (one translation unit: internal linkage).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

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
}  // namespace
