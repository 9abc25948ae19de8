// Globally optimal weighted 1-D k-means on every row of a matrix, on the CPU, as an XLA FFI
// handler (docs/design.md s.4 "Weighted k-means", method "optimal"). Compiled on first use by
// any4_jax/quant/kmeans_cpu.py (`optimal_rows_cpu`).
//
// Per row: radix-sort the values carrying their weights; merge equal values and drop the ones
// of zero weight (an optimal partition never splits equal values, and a zero weight adds no
// cost), leaving n distinct points; prefix sums (double) of w, w d, w d^2 with d = x - mid, the
// row's mid-range. In one dimension an optimal clustering is a partition of the sorted points
// into contiguous runs, so with cost(j, i) = the weighted SSE of points [j, i) about their mean
// (= S(w d^2) - S(w d)^2 / S(w), O(1) from the prefix sums), the dynamic program
//   D[1][i] = cost(0, i),   D[m][i] = min_{m-1 <= j < i} D[m-1][j] + cost(j, i)
// gives the optimum D[k][n] (Wang & Song's Ckmeans.1d.dp). The cost satisfies the quadrangle
// inequality, so the (leftmost) optimal split T[m][i] is non-decreasing in i: each layer is
// computed by divide and conquer over i (the split of the middle i bounds both halves), in
// O(n log n), O(k n log n) a row (Gronlund et al. 2017). A middle layer m skips the positions
// i below a lower bound of the smallest one the answer can use (splits are monotone in the
// layer too; see one_row), about a third of the work at k = 16. With AVX-512 every window is
// scanned eight (or four) candidates at a time, branch-free, giving the same values and
// splits bit for bit. Backtracking the splits gives the clusters; the centroids are their
// weighted means, ascending.
//
// Ties: the smallest split index achieving the minimum. Degenerate rows: with no positive
// weight the values weigh equally; with at most k distinct points each is its own centroid
// and the extra centroids repeat the largest (cost 0). Rows are independent and split over
// threads. Outputs: centroids [R, k] float32 ascending and the weighted SSE [R] (float32,
// in the units of the given weights, or of unit weights for a row of zero weights).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint32_t order_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Scratch {
  std::vector<uint32_t> keys, idx, tmp_k, tmp_i;
  std::vector<double> x, w, p0, p1, p2, prev, cur;
  std::vector<int32_t> split;  // [k, n + 1] optimal split points per layer
  explicit Scratch(int n)
      : keys(n), idx(n), tmp_k(n), tmp_i(n), x(n), w(n), p0(n + 1), p1(n + 1), p2(n + 1),
        prev(n + 1), cur(n + 1) {}
};

// Stable LSD radix sort of the row's indices by value: 4 passes of 8 bits; the sorted
// permutation ends in s.idx.
void sort_indices(const float* x, int n, Scratch& s) {
  for (int i = 0; i < n; ++i) {
    s.keys[i] = order_key(x[i]);
    s.idx[i] = i;
  }
  for (int shift = 0; shift < 32; shift += 8) {
    int count[257] = {0};
    for (int i = 0; i < n; ++i) ++count[((s.keys[i] >> shift) & 0xFF) + 1];
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (int i = 0; i < n; ++i) {
      const int pos = count[(s.keys[i] >> shift) & 0xFF]++;
      s.tmp_k[pos] = s.keys[i];
      s.tmp_i[pos] = s.idx[i];
    }
    s.keys.swap(s.tmp_k);
    s.idx.swap(s.tmp_i);
  }
}

// One layer of the DP by divide and conquer: cur[i] = min_{j in [jlo, i)} prev[j] + cost(j, i)
// for i in [lo, hi], split[i] = the smallest such j. The splits are monotone in i, so once the
// splits of i - s and i + s are known, the split of i lies between them: i is visited by
// halving strides (every 2^L-th i, then the ones halfway between, ...), an iterative divide
// and conquer. The split of the previous layer is a lower bound too (split[m][i] >=
// split[m-1][i]). Long search ranges are scanned kLanes candidates at a time. The term is
// prev[j] + (p2[i] - p2[j]) - (p1[i] - p1[j])^2 / (p0[i] - p0[j]).
constexpr int kLanes = 8;
typedef double V __attribute__((vector_size(8 * kLanes)));
typedef int64_t VI __attribute__((vector_size(8 * kLanes)));
inline V load(const double* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

struct Layer {
  const double *p0, *p1, *p2, *prev;
  const int32_t* below;  // the previous layer's splits, or null for layer 2
  double* cur;
  int32_t* split;

  void at(int i, int first, int top) const {
    if (below) first = std::max(first, static_cast<int>(below[i]));
    top = std::min(top, i - 1);
#ifdef __AVX512F__
    if (top >= first) {  // branch-free for short windows: faster than the scan below
      at512(i, first, top);
      return;
    }
#endif
    const double a0 = p0[i], a1 = p1[i], a2 = p2[i];
    double best = INFINITY;
    int arg = first;
    int j = first;
    if (top - first >= 2 * kLanes) {  // long windows: kLanes candidates at a time
      V vbest, vidx, vj;
      for (int l = 0; l < kLanes; ++l) {
        vbest[l] = INFINITY;
        vidx[l] = 0;
        vj[l] = l;
      }
      const V a0v = a0 + V{}, a1v = a1 + V{}, a2v = a2 + V{};
      for (; j + kLanes - 1 <= top; j += kLanes) {
        const V s1 = a1v - load(p1 + j);
        const V v = load(prev + j) + (a2v - load(p2 + j)) - s1 * s1 / (a0v - load(p0 + j));
        const VI take = v < vbest;  // strict: each lane keeps its smallest j
        vbest = take ? v : vbest;
        vidx = take ? vj + static_cast<double>(j) : vidx;
      }
      for (int l = 0; l < kLanes; ++l) {  // the smallest value, then the smallest j
        if (vbest[l] < best || (vbest[l] == best && static_cast<int>(vidx[l]) < arg)) {
          best = vbest[l];
          arg = static_cast<int>(vidx[l]);
        }
      }
    }
    for (; j <= top; ++j) {  // (the tail: larger j than any lane's, so strict < again)
      const double s1 = a1 - p1[j];
      const double v = prev[j] + (a2 - p2[j]) - s1 * s1 / (a0 - p0[j]);
      if (v < best) {  // strict: the smallest j wins a tie
        best = v;
        arg = j;
      }
    }
    cur[i] = best;
    split[i] = arg;
  }

#ifdef __AVX512F__
  // The window [first, top] eight candidates at a time, the last step masked (its idle lanes
  // hold +inf); each lane keeps its smallest j among equal values (strict <), then the
  // smallest value over the lanes, the smallest j among those: the leftmost minimum, the
  // same value and split as the scalar scan, bit for bit.
  void at512(int i, int first, int top) const {
    if (top - first < 4) {  // one masked 4-lane step: lane l holds j = first + l
      const __mmask8 m = static_cast<__mmask8>((1u << (top - first + 1)) - 1u);
      const __m256d s1 = _mm256_sub_pd(_mm256_set1_pd(p1[i]), _mm256_maskz_loadu_pd(m, p1 + first));
      const __m256d d = _mm256_mask_sub_pd(_mm256_set1_pd(1.0), m, _mm256_set1_pd(p0[i]),
                                           _mm256_maskz_loadu_pd(m, p0 + first));
      __m256d v = _mm256_sub_pd(
          _mm256_add_pd(_mm256_maskz_loadu_pd(m, prev + first),
                        _mm256_sub_pd(_mm256_set1_pd(p2[i]), _mm256_maskz_loadu_pd(m, p2 + first))),
          _mm256_div_pd(_mm256_mul_pd(s1, s1), d));
      v = _mm256_mask_blend_pd(m, _mm256_set1_pd(INFINITY), v);
      __m256d r = _mm256_min_pd(v, _mm256_permute2f128_pd(v, v, 1));
      r = _mm256_min_pd(r, _mm256_permute_pd(r, 5));  // every lane: the minimum
      const unsigned eq = _mm256_mask_cmp_pd_mask(m, v, r, _CMP_EQ_OQ);
      cur[i] = _mm256_cvtsd_f64(r);
      split[i] = first + __builtin_ctz(eq);
      return;
    }
    if (top - first < 8) {  // one masked step: lane l holds j = first + l
      const __mmask8 m = static_cast<__mmask8>((1u << (top - first + 1)) - 1u);
      const __m512d s1 = _mm512_sub_pd(_mm512_set1_pd(p1[i]), _mm512_maskz_loadu_pd(m, p1 + first));
      const __m512d d = _mm512_mask_sub_pd(_mm512_set1_pd(1.0), m, _mm512_set1_pd(p0[i]),
                                           _mm512_maskz_loadu_pd(m, p0 + first));
      __m512d v = _mm512_sub_pd(
          _mm512_add_pd(_mm512_maskz_loadu_pd(m, prev + first),
                        _mm512_sub_pd(_mm512_set1_pd(p2[i]), _mm512_maskz_loadu_pd(m, p2 + first))),
          _mm512_div_pd(_mm512_mul_pd(s1, s1), d));
      v = _mm512_mask_blend_pd(m, _mm512_set1_pd(INFINITY), v);
      const double b = _mm512_reduce_min_pd(v);
      const unsigned eq = _mm512_mask_cmp_pd_mask(m, v, _mm512_set1_pd(b), _CMP_EQ_OQ);
      cur[i] = b;
      split[i] = first + __builtin_ctz(eq);
      return;
    }
    const __m512d a0 = _mm512_set1_pd(p0[i]), a1 = _mm512_set1_pd(p1[i]),
                  a2 = _mm512_set1_pd(p2[i]);
    const __m512d inf = _mm512_set1_pd(INFINITY);
    __m512d best = inf;
    __m512i bidx = _mm512_setzero_si512();
    __m512i jv = _mm512_add_epi64(_mm512_set1_epi64(first),
                                  _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    const __m512i eight = _mm512_set1_epi64(8);
    int j = first;
    for (; j + 7 <= top; j += 8) {
      const __m512d s1 = _mm512_sub_pd(a1, _mm512_loadu_pd(p1 + j));
      const __m512d v = _mm512_sub_pd(
          _mm512_add_pd(_mm512_loadu_pd(prev + j), _mm512_sub_pd(a2, _mm512_loadu_pd(p2 + j))),
          _mm512_div_pd(_mm512_mul_pd(s1, s1), _mm512_sub_pd(a0, _mm512_loadu_pd(p0 + j))));
      const __mmask8 take = _mm512_cmp_pd_mask(v, best, _CMP_LT_OQ);
      best = _mm512_mask_blend_pd(take, best, v);
      bidx = _mm512_mask_blend_epi64(take, bidx, jv);
      jv = _mm512_add_epi64(jv, eight);
    }
    if (j <= top) {
      const __mmask8 m = static_cast<__mmask8>((1u << (top - j + 1)) - 1u);
      const __m512d ones = _mm512_set1_pd(1.0);
      const __m512d s1 = _mm512_sub_pd(a1, _mm512_maskz_loadu_pd(m, p1 + j));
      const __m512d d = _mm512_mask_sub_pd(ones, m, a0, _mm512_maskz_loadu_pd(m, p0 + j));
      const __m512d v = _mm512_sub_pd(
          _mm512_add_pd(_mm512_maskz_loadu_pd(m, prev + j),
                        _mm512_sub_pd(a2, _mm512_maskz_loadu_pd(m, p2 + j))),
          _mm512_div_pd(_mm512_mul_pd(s1, s1), d));
      const __mmask8 take = _mm512_mask_cmp_pd_mask(m, v, best, _CMP_LT_OQ);
      best = _mm512_mask_blend_pd(take, best, v);
      bidx = _mm512_mask_blend_epi64(take, bidx, jv);
    }
    const double b = _mm512_reduce_min_pd(best);
    const __mmask8 eq = _mm512_cmp_pd_mask(best, _mm512_set1_pd(b), _CMP_EQ_OQ);
    cur[i] = b;
    split[i] = static_cast<int32_t>(
        _mm512_mask_reduce_min_epi64(eq, bidx));
  }
#endif

  void solve(int lo, int hi, int jlo) const {
    const int count = hi - lo + 1;
    int stride = 1;
    while (stride * 2 <= count) stride *= 2;
    for (; stride >= 1; stride /= 2) {
      // offsets t = stride - 1, 3 stride - 1, ...: neighbours t -+ stride are done
      for (int t = stride - 1; t < count; t += 2 * stride) {
        const int first = t - stride >= 0 ? split[lo + t - stride] : jlo;
        const int top = t + stride < count ? split[lo + t + stride] : hi - 1;
        at(lo + t, first, top);
      }
    }
  }
};

double run_cost(const Scratch& s, int a, int b) {  // weighted SSE of points [a, b), direct
  double sw = 0.0, swx = 0.0;
  for (int i = a; i < b; ++i) {
    sw += s.w[i];
    swx += s.w[i] * s.x[i];
  }
  const double c = swx / sw;
  double e = 0.0;
  for (int i = a; i < b; ++i) e += s.w[i] * (s.x[i] - c) * (s.x[i] - c);
  return e;
}

void one_row(const float* x, const float* w, int len, int k, float* out, float* cost,
             Scratch& s) {
  sort_indices(x, len, s);
  double wsum = 0.0;
  for (int i = 0; i < len; ++i) wsum += w[i] > 0.0f ? w[i] : 0.0f;
  const bool unit = !(wsum > 0.0);  // no positive weight: weigh the values equally
  int n = 0;  // distinct values of positive weight, with their summed weights
  for (int t = 0; t < len; ++t) {
    const int i = static_cast<int>(s.idx[t]);
    const double wi = unit ? 1.0 : static_cast<double>(w[i]);
    if (!(wi > 0.0)) continue;
    if (n > 0 && s.x[n - 1] == x[i]) {
      s.w[n - 1] += wi;
    } else {
      s.x[n] = x[i];
      s.w[n] = wi;
      ++n;
    }
  }
  if (n <= k) {  // every point its own centroid; the extra ones repeat the largest
    for (int c = 0; c < k; ++c) out[c] = static_cast<float>(s.x[std::min(c, n - 1)]);
    *cost = 0.0f;
    return;
  }
  const double mid = 0.5 * (s.x[0] + s.x[n - 1]);
  s.p0[0] = s.p1[0] = s.p2[0] = 0.0;
  for (int i = 0; i < n; ++i) {
    const double d = s.x[i] - mid;
    s.p0[i + 1] = s.p0[i] + s.w[i];
    s.p1[i + 1] = s.p1[i] + s.w[i] * d;
    s.p2[i + 1] = s.p2[i] + s.w[i] * d * d;
  }
  s.split.assign(static_cast<size_t>(k) * (n + 1), 0);
  for (int i = 1; i <= n; ++i) {
    const double s1 = s.p1[i];
    s.prev[i] = s.p2[i] - s1 * s1 / s.p0[i];
  }
  int lo_prev = 1;  // the first position the previous layer computed
  for (int m = 2; m <= k; ++m) {
    // layer m needs D[m][i] for i <= n - (k - m) (the later clusters need a point each) and
    // i >= N_m, where N_k = n and N_{r-1} = opt[r-1][N_r] (the optimal splits are monotone in
    // i and in the layer: the backtrack, and every window searched above, stay at or above
    // N_m). Applying opt[m-1] (known, <= opt[r-1]) k - m times to n gives a lower bound of N_m.
    const int hi = m == k ? n : n - (k - m);
    int lo = m;
    int32_t* split = s.split.data() + static_cast<size_t>(m - 1) * (n + 1);
    if (m > 2 && m < k) {
      const int32_t* below = split - (n + 1);  // positions it did not compute hold 0
      const int hi_prev = n - (k - m + 1);
      int a = n;
      for (int r = 0; r < k - m && a > 0; ++r) a = below[std::min(a, hi_prev)];
      lo = std::max(lo, a);
    }
    const Layer layer{s.p0.data(),   s.p1.data(), s.p2.data(), s.prev.data(),
                      m > 2 ? split - (n + 1) : nullptr, s.cur.data(), split};
    layer.solve(lo, hi, std::max(m - 1, lo_prev));
    lo_prev = lo;
    std::swap(s.prev, s.cur);
  }
  int bounds[257];
  bounds[k] = n;
  for (int m = k; m >= 2; --m) {
    bounds[m - 1] = s.split[static_cast<size_t>(m - 1) * (n + 1) + bounds[m]];
  }
  bounds[0] = 0;
  double total = 0.0;
  for (int c = 0; c < k; ++c) {
    const int a = bounds[c], b = bounds[c + 1];
    const double sw = s.p0[b] - s.p0[a];
    out[c] = static_cast<float>(mid + (s.p1[b] - s.p1[a]) / sw);
    total += run_cost(s, a, b);
  }
  std::sort(out, out + k);  // ascending already, up to rounding
  *cost = static_cast<float>(total);
}

ffi::Error OptimalKMeansRows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                             ffi::ResultBuffer<ffi::F32> centroids,
                             ffi::ResultBuffer<ffi::F32> cost, int64_t k) {
  const auto d = x.dimensions();
  const auto dw = w.dimensions();
  if (d.size() != 2 || dw.size() != 2 || dw[0] != d[0] || dw[1] != d[1] || d[1] < 1 || k < 1 ||
      k > 256) {
    return ffi::Error::InvalidArgument(
        "any4_optimal_kmeans_rows: x and w must be [R, K] with K >= 1, and 1 <= k <= 256");
  }
  const int64_t rows = d[0];
  const int n = static_cast<int>(d[1]);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* cp = centroids->typed_data();
  float* sp = cost->typed_data();
  const int hw = std::max(1u, std::thread::hardware_concurrency());
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(hw, rows / 4)));
  auto work = [&](int tid) {
    Scratch s(n);
    for (int64_t r = tid; r < rows; r += workers) {
      one_row(xp + r * n, wp + r * n, n, static_cast<int>(k), cp + r * k, sp + r, s);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < workers; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Any4OptimalKMeansRows, OptimalKMeansRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, K] (unsorted)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [R, K], >= 0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // centroids [R, k], ascending
                                  .Ret<ffi::Buffer<ffi::F32>>()  // weighted SSE [R]
                                  .Attr<int64_t>("k"));
