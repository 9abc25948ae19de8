// The CPU LUT GEMM's row loop (`rows()`) run directly, without XLA or the FFI call: how fast
// the inner loop is per weight, from cache or from memory, on one thread or split over this
// thread and one helper of the kernel's SpinPool as the handler splits a call (THREADS=2).
//
//   g++ -O3 -march=native -std=c++17 -pthread -Wno-attributes -Wno-return-type \
//       -I "$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
//       -o /tmp/cpu_rows_harness scripts/cpu_rows_harness.cc
//   [THREADS=2] /tmp/cpu_rows_harness N K G REPS [COPIES]   # e.g. 576 576 64 2000 256
//
// M = 1, float32 x, tables, scales and zeros; COPIES weight copies rotated (8 of 4096 x 4096,
// or 256 of 576 x 576, exceed the L3). With THREADS=2 the rows are cut into the handler's
// chunks (at least 64K weight-rows each, at most 4 per thread). Prints the best of five
// timings. Used for docs/cpu_kernel_notes.md (v8, v9).
#include "../ffi_kernels/lut_gemm_cpu.cc"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
// One call's rows in chunks claimed by this thread and a SpinPool helper (the handler's way).
struct Chunks : any4::SpinJob {
  const Problem* p = nullptr;
  int64_t chunks = 0, per = 0;
  std::atomic<int64_t> next{0}, done{0};
  void run() override {
    for (int64_t c; (c = next.fetch_add(1)) < chunks; done.fetch_add(1))
      rows(*p, c * per, std::min(p->N, (c + 1) * per));
  }
};

void rows_split(const Problem& p, int threads) {
  if (threads < 2) return rows(p, 0, p.N);
  const int64_t target = std::max<int64_t>(1, std::min<int64_t>(4 * threads, p.N * p.K >> 16));
  auto job = std::make_shared<Chunks>();
  job->p = &p;
  job->per = (p.N + target - 1) / target;
  job->chunks = (p.N + job->per - 1) / job->per;
  if (job->chunks > 1) any4::SpinPool::get(threads - 1)->post(job, threads - 1);
  job->run();
  while (job->done.load() < job->chunks) ANY4_SPIN_PAUSE();
}

int main(int argc, char** argv) {
  const int threads = getenv("THREADS") ? atoi(getenv("THREADS")) : 1;
  int64_t N = atol(argv[1]), K = atol(argv[2]), g = atol(argv[3]), reps = atol(argv[4]);
  int64_t copies = argc > 5 ? atol(argv[5]) : 1;
  int64_t G = K / g;
  std::vector<std::vector<uint8_t>> codes(copies, std::vector<uint8_t>(N * K / 2));
  std::vector<float> lut(N * 16), sc(N * G, 0.01f), ze(N * G, 0.001f), x(K, 0.5f), y(N);
  for (auto& c : codes) for (auto& b : c) b = rand();
  for (auto& v : lut) v = (rand() % 100) / 10.f;
  Problem p{};
  p.x = x.data(); p.lut = lut.data(); p.scales = sc.data(); p.zeros = ze.data(); p.y = y.data();
  p.M = 1; p.N = N; p.K = K; p.g = g; p.groups = G; p.round = 0; p.param = kParamF32;
  std::vector<float> xw = x_in_dot_order<float>(p, 64, [](float v) { return v; });
  p.xw = xw.data();
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i) { p.codes = codes[i % copies].data(); rows_split(p, threads); }
    const double ns =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e9 / reps;
    best = std::min(best, ns);
  }
  printf("N=%ld K=%ld g=%ld copies=%ld: %.1f us per call, %.2f weights/ns (%d thread%s), "
         "%.2f GB/s codes\n", static_cast<long>(N), static_cast<long>(K), static_cast<long>(g),
         static_cast<long>(copies), best / 1e3, N * K / best, threads, threads > 1 ? "s" : "",
         N * K / 2 / best);
}
