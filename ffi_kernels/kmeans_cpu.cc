// Weighted 1-D k-means on every row of a matrix, on the CPU, as an XLA FFI handler
// (docs/design.md s.4 "Weighted k-means"). Compiled on first use by any4_jax/quant/kmeans_cpu.py.
//
// Per row: radix-sort the values carrying their weights; prefix sums (double) of w, w x,
// w x^2 centred on the row's mid-range; k-means++ seeding (weighted, greedy, 2 + floor(ln k)
// trials) whose D^2 draws and candidate potentials come from the prefix sums in O(k log K);
// Lloyd iterations whose clusters are contiguous runs found by binary search of the
// midpoints (a value on a midpoint joins the lower cluster), until the largest squared
// centroid shift is <= tol * variance(row) or max_iter. Rows are independent (each draws from
// its own counter-based stream keyed by seed and global row id) and split over threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct Rng {
  uint64_t state;
  double uniform() { return (splitmix64(state++) >> 11) * 0x1.0p-53; }  // [0, 1)
};

inline uint32_t order_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Stable LSD radix sort of (value, weight) by value: 4 passes of 8 bits.
void sort_pairs(const float* x, const float* w, int n, std::vector<float>& xs,
                std::vector<float>& ws, std::vector<uint32_t>& keys, std::vector<uint32_t>& idx,
                std::vector<uint32_t>& tmp_k, std::vector<uint32_t>& tmp_i) {
  for (int i = 0; i < n; ++i) {
    keys[i] = order_key(x[i]);
    idx[i] = i;
  }
  for (int shift = 0; shift < 32; shift += 8) {
    int count[257] = {0};
    for (int i = 0; i < n; ++i) ++count[((keys[i] >> shift) & 0xFF) + 1];
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (int i = 0; i < n; ++i) {
      const int pos = count[(keys[i] >> shift) & 0xFF]++;
      tmp_k[pos] = keys[i];
      tmp_i[pos] = idx[i];
    }
    keys.swap(tmp_k);
    idx.swap(tmp_i);
  }
  for (int i = 0; i < n; ++i) {
    xs[i] = x[idx[i]];
    ws[i] = w[idx[i]];
  }
}

struct Row {
  int n;
  const float* xs;
  std::vector<double> p0, p1, p2;  // prefix sums, length n + 1
  double mid;

  // First index whose value is > v (values <= v stay left): std::upper_bound.
  int bound(double v) const {
    return static_cast<int>(std::upper_bound(xs, xs + n, static_cast<float>(v)) - xs);
  }
  double range(const std::vector<double>& p, int lo, int hi) const { return p[hi] - p[lo]; }
  // Weighted squared distance of x[lo:hi] to c.
  double pot(int lo, int hi, double c) const {
    const double d = c - mid;
    const double v = range(p2, lo, hi) - 2.0 * d * range(p1, lo, hi) + d * d * range(p0, lo, hi);
    return v > 0.0 ? v : 0.0;
  }
  // Cell bounds of sorted centroids c[0..m): b[0] = 0, b[m] = n.
  void bounds(const double* c, int m, int* b) const {
    b[0] = 0;
    for (int j = 0; j + 1 < m; ++j) b[j + 1] = bound(0.5 * (c[j] + c[j + 1]));
    b[m] = n;
  }
  double total_pot(const double* c, int m) const {
    int b[65];
    bounds(c, m, b);
    double s = 0.0;
    for (int j = 0; j < m; ++j) s += pot(b[j], b[j + 1], c[j]);
    return s;
  }
};

void kmeanspp(const Row& r, int k, Rng& rng, double* out) {
  const int n = r.n;
  const int trials = 2 + static_cast<int>(std::log(static_cast<double>(k)));
  // first centroid: drawn with probability proportional to w
  const double u0 = rng.uniform() * r.p0[n];
  int first = static_cast<int>(std::upper_bound(r.p0.begin() + 1, r.p0.end(), u0) -
                               (r.p0.begin() + 1));
  first = std::min(first, n - 1);
  std::vector<double> c = {static_cast<double>(r.xs[first])};
  std::vector<double> cand_set;
  for (int i = 1; i < k; ++i) {
    std::sort(c.begin(), c.end());
    const int m = static_cast<int>(c.size());
    int b[65];
    r.bounds(c.data(), m, b);
    double cum[64];
    double acc = 0.0;
    for (int j = 0; j < m; ++j) cum[j] = (acc += r.pot(b[j], b[j + 1], c[j]));
    double best_pot = INFINITY, best = c[0];
    for (int t = 0; t < trials; ++t) {
      const double u = rng.uniform() * acc;
      int cell = static_cast<int>(std::upper_bound(cum, cum + m, u) - cum);
      cell = std::min(cell, m - 1);
      const double rem = u - (cum[cell] - r.pot(b[cell], b[cell + 1], c[cell]));
      // smallest p in [lo, hi) with pot(lo, p + 1) > rem
      int lo = b[cell], hi = std::max(b[cell + 1] - 1, b[cell]);
      const int base = b[cell];
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (r.pot(base, mid + 1, c[cell]) <= rem) lo = mid + 1; else hi = mid;
      }
      const double cand = r.xs[std::min(std::max(lo, 0), n - 1)];
      cand_set.assign(c.begin(), c.end());
      cand_set.insert(std::upper_bound(cand_set.begin(), cand_set.end(), cand), cand);
      const double p = r.total_pot(cand_set.data(), m + 1);
      if (p < best_pot) {
        best_pot = p;
        best = cand;
      }
    }
    c.push_back(best);
  }
  std::sort(c.begin(), c.end());
  for (int j = 0; j < k; ++j) out[j] = c[j];
}

int lloyd(const Row& r, int k, int max_iter, double limit, double* c) {
  int b[65];
  double nc[64];
  int iters = 0;
  for (int it = 0; it < max_iter; ++it) {
    r.bounds(c, k, b);
    double shift = 0.0;
    for (int j = 0; j < k; ++j) {
      const double sw = r.range(r.p0, b[j], b[j + 1]);
      // computed in float as the stored centroids are: the shift test sees what is kept
      nc[j] = sw > 0.0 ? static_cast<float>(r.mid + r.range(r.p1, b[j], b[j + 1]) / sw) : c[j];
    }
    std::sort(nc, nc + k);
    for (int j = 0; j < k; ++j) shift = std::max(shift, (nc[j] - c[j]) * (nc[j] - c[j]));
    std::copy(nc, nc + k, c);
    ++iters;
    if (shift <= limit) break;
  }
  return iters;
}

void one_row(const float* x, const float* w, int n, int32_t row_id, const float* init, int k,
             int max_iter, double tol, uint64_t seed, bool plusplus, float* out, int32_t* iters,
             std::vector<float>& xs, std::vector<float>& ws, std::vector<uint32_t>* scratch) {
  sort_pairs(x, w, n, xs, ws, scratch[0], scratch[1], scratch[2], scratch[3]);
  Row r;
  r.n = n;
  r.xs = xs.data();
  r.mid = 0.5 * (static_cast<double>(xs[0]) + xs[n - 1]);
  double wsum = 0.0;
  for (int i = 0; i < n; ++i) wsum += ws[i];
  const bool unit = !(wsum > 0.0);  // no positive weight: weigh the values equally
  r.p0.assign(n + 1, 0.0);
  r.p1.assign(n + 1, 0.0);
  r.p2.assign(n + 1, 0.0);
  double mean = 0.0;
  for (int i = 0; i < n; ++i) mean += xs[i];
  mean /= n;
  double var = 0.0;
  for (int i = 0; i < n; ++i) {
    const double wi = unit ? 1.0 : ws[i];
    const double d = xs[i] - r.mid;
    r.p0[i + 1] = r.p0[i] + wi;
    r.p1[i + 1] = r.p1[i] + wi * d;
    r.p2[i + 1] = r.p2[i] + wi * d * d;
    var += (xs[i] - mean) * (xs[i] - mean);
  }
  var /= n;
  double c[64];
  if (plusplus) {
    Rng rng{splitmix64(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(row_id))};
    kmeanspp(r, k, rng, c);
  } else {
    for (int j = 0; j < k; ++j) c[j] = init[j];
    std::sort(c, c + k);
  }
  *iters = lloyd(r, k, max_iter, tol * var, c);
  for (int j = 0; j < k; ++j) out[j] = static_cast<float>(c[j]);
}

ffi::Error KMeansRows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::S32> row_ids, ffi::Buffer<ffi::F32> init,
                      ffi::ResultBuffer<ffi::F32> centroids, ffi::ResultBuffer<ffi::S32> iters,
                      int64_t k, int64_t max_iter, float tol, int64_t seed, int64_t plusplus) {
  const auto d = x.dimensions();
  const auto dw = w.dimensions();
  if (d.size() != 2 || dw.size() != 2 || dw[0] != d[0] || dw[1] != d[1] || k < 2 || k > 64) {
    return ffi::Error::InvalidArgument("any4_kmeans_rows: x and w must be [R, K], 2 <= k <= 64");
  }
  const int64_t rows = d[0];
  const int n = static_cast<int>(d[1]);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int32_t* ids = row_ids.typed_data();
  const float* ip = init.typed_data();
  float* cp = centroids->typed_data();
  int32_t* it = iters->typed_data();
  const int hw = std::max(1u, std::thread::hardware_concurrency());
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(hw, rows / 16)));
  auto work = [&](int tid) {
    std::vector<float> xs(n), ws(n);
    std::vector<uint32_t> scratch[4] = {std::vector<uint32_t>(n), std::vector<uint32_t>(n),
                                        std::vector<uint32_t>(n), std::vector<uint32_t>(n)};
    for (int64_t r = tid; r < rows; r += workers) {
      one_row(xp + r * n, wp + r * n, n, ids[r], ip + r * k, static_cast<int>(k),
              static_cast<int>(max_iter), static_cast<double>(tol), static_cast<uint64_t>(seed),
              plusplus != 0, cp + r * k, it + r, xs, ws, scratch);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < workers; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Any4KMeansRows, KMeansRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, K] (unsorted)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [R, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // global row ids [R]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // initial centroids [R, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // centroids [R, k], sorted
                                  .Ret<ffi::Buffer<ffi::S32>>()  // Lloyd iterations [R]
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("max_iter")
                                  .Attr<float>("tol")
                                  .Attr<int64_t>("seed")
                                  .Attr<int64_t>("plusplus"));
