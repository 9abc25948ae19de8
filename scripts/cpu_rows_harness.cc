// One thread running the CPU LUT GEMM's row loop (`rows()`) directly, without XLA, threads or
// the FFI call: how fast the inner loop is per weight, from cache or from memory.
//
//   g++ -O3 -march=native -std=c++17 -pthread -Wno-attributes -Wno-return-type \
//       -I "$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
//       -o /tmp/cpu_rows_harness scripts/cpu_rows_harness.cc
//   /tmp/cpu_rows_harness N K G REPS [COPIES]   # e.g. 576 576 64 2000; 4096 4096 128 20 8
//
// M = 1, float32 x, tables, scales and zeros; COPIES weight copies rotated (8 of 4096 x 4096
// exceed the L3). Prints the best of five timings. Used for docs/cpu_kernel_notes.md (v8).
#include "../ffi_kernels/lut_gemm_cpu.cc"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
int main(int argc, char** argv) {
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
    for (int64_t i = 0; i < reps; ++i) { p.codes = codes[i % copies].data(); rows(p, 0, N); }
    const double ns =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e9 / reps;
    best = std::min(best, ns);
  }
  printf("N=%ld K=%ld g=%ld copies=%ld: %.1f us per call, %.2f weights/ns (1 thread), "
         "%.2f GB/s codes\n", static_cast<long>(N), static_cast<long>(K), static_cast<long>(g),
         static_cast<long>(copies), best / 1e3, N * K / best, N * K / 2 / best);
}
