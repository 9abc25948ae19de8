// Standalone timing of the CUDA LUT GEMM variants, free of JAX's dispatch (a GPU program):
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I ffi_kernels \
//        ffi_kernels/bench/lut_gemm_bench.cu -o /tmp/lut_gemm_bench && /tmp/lut_gemm_bench
// (`scripts/device_run.sh` step "cudabench"). For each Llama-3-8B shape and M: device time per
// call of the first kernel (bench/lut_gemm_v1.cuh, canonical scales) and of the configurations
// of ../lut_gemm.cuh (tiled scales), from CUDA events around a graph of many launches that rotate over weight
// copies larger than L2 several times; each variant's output is checked against the first
// kernel's on random codes, tables, scales and zeros (same arithmetic per weight, so the only
// difference is the order of the split-K sums). Also the device-to-device copy bandwidth (read +
// write), the ceiling of a memory-bound kernel. `lut_gemm_bench profile` runs each variant once
// on gate_up (for ncu).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench/lut_gemm_v1.cuh"
#include "lut_gemm.cuh"

#define CHECK(call)                                                                         \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                    \
                   cudaGetErrorString(e_));                                                 \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

using bf16 = __nv_bfloat16;

__device__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}

__global__ void fill_u32(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = hash32(i, seed);
}

// uniform in [lo, hi)
__global__ void fill_bf16(bf16* p, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(lo + (hi - lo) * (hash32(i, seed) >> 8) * (1.0f / 16777216.0f));
}

struct Weight {
  uint2* codes;
  bf16 *lut, *scales, *zeros;  // canonical [N, K/g] scales and zeros (the first kernel)
  bf16 *scales_t, *zeros_t;    // the same in the current layout, [N/16, K/g, 16]
};

// canonical [N, G] -> [N/16, G, 16] (any4_jax/kernels/cuda_layout.py does the same)
__global__ void tile_groups(const bf16* src, bf16* dst, int n, int groups) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(n) * groups;
       i += size_t(gridDim.x) * blockDim.x) {
    const int row = i / groups, grp = i % groups;
    dst[(size_t(row / 16) * groups + grp) * 16 + row % 16] = src[i];
  }
}

using Launch = std::function<cudaError_t(cudaStream_t, const bf16*, const Weight&, bf16*, int,
                                         int, int, int)>;

struct Variant {
  std::string name;
  Launch run;
};

template <typename C>
Launch cur(int int_offset = -1) {
  return [int_offset](cudaStream_t s, const bf16* x, const Weight& w, bf16* y, int M, int N,
                      int K, int g) {
    return any4::launch_config<bf16, C>(s, x, w.codes, w.lut, w.scales_t, w.zeros_t,
                                        any4::kTableBF16, y, M, N, K, g, int_offset);
  };
}

// the library's entry point (configuration by M)
Launch dispatch(int int_offset = -1) {
  return [int_offset](cudaStream_t s, const bf16* x, const Weight& w, bf16* y, int M, int N,
                      int K, int g) {
    return any4::launch_lut_gemm<bf16>(s, x, w.codes, w.lut, w.scales_t, w.zeros_t,
                                       any4::kTableBF16, y, M, N, K, g, int_offset);
  };
}

Launch v1(int int_offset = -1) {
  return [int_offset](cudaStream_t s, const bf16* x, const Weight& w, bf16* y, int M, int N,
                      int K, int g) {
    return any4_v1::launch_lut_gemm<bf16>(s, x, w.codes, w.lut, w.scales, w.zeros,
                                          any4_v1::kTableBF16, y, M, N, K, g, int_offset);
  };
}

static void fill(void* p, size_t bytes, uint32_t seed) {
  fill_u32<<<1024, 256>>>(static_cast<uint32_t*>(p), bytes / 4, seed);
}

int main(int argc, char** argv) {
  const bool profile = argc > 1 && std::string(argv[1]) == "profile";
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));

  using any4::Config;
  using any4::kLaneTable;
  using any4::kPairTable;
  std::vector<Variant> variants = {
      {"v1 (float table, 8w x 8)", v1()},
      {"library (by M)", dispatch()},
      {"lane 8w x 1", cur<Config<kLaneTable, 8, 1>>()},
      {"lane 16w x 1", cur<Config<kLaneTable, 16, 1>>()},
      {"lane 8w x 2", cur<Config<kLaneTable, 8, 2>>()},
      {"pair 8w x 1", cur<Config<kPairTable, 8, 1>>()},
      {"pair 16w x 1", cur<Config<kPairTable, 16, 1>>()},
      {"pair 8w x 2 min3", cur<Config<kPairTable, 8, 2, 3>>()},
  };
  // the integer grid: checked against the first kernel's integer path
  std::vector<Variant> int_variants = {
      {"v1 int4", v1(8)},
      {"library int4", dispatch(8)},
      {"lane int4 8w x 1", cur<Config<kLaneTable, 8, 1>>(8)},
  };

  // copy bandwidth: 1 GiB device to device, read + write
  {
    const size_t bytes = size_t(1) << 30;
    void *a, *b;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    fill(a, bytes, 1);
    for (int i = 0; i < 3; ++i) CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK(cudaEventRecord(e0, stream));
    for (int i = 0; i < 10; ++i) CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK(cudaEventRecord(e1, stream));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    std::printf("copy bandwidth: %.0f GB/s (read + write)\n", 2.0 * bytes * 10 / (ms * 1e-3) / 1e9);
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
  }

  struct Shape {
    const char* name;
    int n, k;
  };
  const Shape shapes[] = {{"llama3-8b/gate_up", 14336, 4096}, {"llama3-8b/down", 4096, 14336},
                          {"llama3-8b/qkv", 6144, 4096},      {"llama3-8b/o", 4096, 4096}};
  const int ms[] = {1, 4, 16};
  const int g = 128;
  std::printf("| shape | M | variant | us | GB/s | max rel diff vs the first kernel |\n|---|---|---|---|---|---|\n");
  for (const Shape& sh : shapes) {
    if (profile && std::string(sh.name) != "llama3-8b/gate_up") continue;
    const int N = sh.n, K = sh.k, groups = K / g;
    const size_t code_bytes = size_t(N) * K / 2, tab = size_t(N) * 16,
                 sz = size_t(N) * groups;
    const size_t wbytes = code_bytes + 2 * (tab + 2 * sz);
    const int copies = profile ? 1 : std::max<int>(2, (4 * prop.l2CacheSize) / wbytes + 1);
    std::vector<Weight> ws(copies);
    for (int c = 0; c < copies; ++c) {
      Weight& w = ws[c];
      CHECK(cudaMalloc(&w.codes, code_bytes));
      CHECK(cudaMalloc(&w.lut, tab * 2));
      CHECK(cudaMalloc(&w.scales, sz * 2));
      CHECK(cudaMalloc(&w.zeros, sz * 2));
      CHECK(cudaMalloc(&w.scales_t, sz * 2));
      CHECK(cudaMalloc(&w.zeros_t, sz * 2));
      fill(w.codes, code_bytes, 10 + c);
      fill_bf16<<<1024, 256>>>(w.lut, tab, 20 + c, -1.f, 1.f);
      fill_bf16<<<1024, 256>>>(w.scales, sz, 30 + c, 0.005f, 0.02f);
      fill_bf16<<<1024, 256>>>(w.zeros, sz, 40 + c, -0.01f, 0.01f);
      tile_groups<<<1024, 256>>>(w.scales, w.scales_t, N, groups);
      tile_groups<<<1024, 256>>>(w.zeros, w.zeros_t, N, groups);
      CHECK(cudaGetLastError());
    }
    for (int M : ms) {
      if (profile && M == 4) continue;
      bf16 *x, *y, *y_ref;
      CHECK(cudaMalloc(&x, size_t(M) * K * 2));
      CHECK(cudaMalloc(&y, size_t(M) * N * 2));
      CHECK(cudaMalloc(&y_ref, size_t(M) * N * 2));
      fill_bf16<<<256, 256>>>(x, size_t(M) * K, 7 + M, -1.f, 1.f);
      for (int grid_kind = 0; grid_kind < 2; ++grid_kind) {
      const std::vector<Variant>& vs = grid_kind ? int_variants : variants;
      if (grid_kind && (profile || N != 14336)) continue;  // int4: checked on gate_up, timed
      CHECK(vs[0].run(stream, x, ws[0], y_ref, M, N, K, g));
      std::vector<bf16> ref(size_t(M) * N), out(size_t(M) * N);
      CHECK(cudaMemcpyAsync(ref.data(), y_ref, ref.size() * 2, cudaMemcpyDeviceToHost, stream));
      CHECK(cudaStreamSynchronize(stream));
      for (const Variant& v : vs) {
        // poison, run, compare with v1
        CHECK(cudaMemsetAsync(y, 0xFF, size_t(M) * N * 2, stream));
        CHECK(v.run(stream, x, ws[0], y, M, N, K, g));
        CHECK(cudaMemcpyAsync(out.data(), y, out.size() * 2, cudaMemcpyDeviceToHost, stream));
        CHECK(cudaStreamSynchronize(stream));
        double worst = 0, scale = 0;
        for (size_t i = 0; i < ref.size(); ++i) scale = std::max(scale, std::fabs((double)__bfloat162float(ref[i])));
        for (size_t i = 0; i < ref.size(); ++i) {
          const double d = std::fabs((double)__bfloat162float(out[i]) - __bfloat162float(ref[i]));
          worst = std::max(worst, std::isnan(d) ? 1e30 : d / scale);
        }
        if (profile) continue;
        // timing: a graph of `iters` launches over the copies
        const int iters = std::max(copies, 60);
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        for (int i = 0; i < iters; ++i) CHECK(v.run(stream, x, ws[i % copies], y, M, N, K, g));
        CHECK(cudaStreamEndCapture(stream, &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(exec, stream));
        std::vector<float> times;
        for (int r = 0; r < 7; ++r) {
          CHECK(cudaEventRecord(e0, stream));
          CHECK(cudaGraphLaunch(exec, stream));
          CHECK(cudaEventRecord(e1, stream));
          CHECK(cudaEventSynchronize(e1));
          float t;
          CHECK(cudaEventElapsedTime(&t, e0, e1));
          times.push_back(t);
        }
        std::sort(times.begin(), times.end());
        const double us = times[times.size() / 2] * 1e3 / iters;
        const double bytes = wbytes + 2.0 * M * (K + N);
        std::printf("| %s (%dx%d) | %d | %s | %.2f | %.0f | %.1e |\n", sh.name, N, K, M,
                    v.name.c_str(), us, bytes / (us * 1e-6) / 1e9, worst);
        CHECK(cudaGraphExecDestroy(exec));
        CHECK(cudaGraphDestroy(graph));
      }
      }
      CHECK(cudaFree(x));
      CHECK(cudaFree(y));
      CHECK(cudaFree(y_ref));
    }
    for (Weight& w : ws) {
      CHECK(cudaFree(w.codes));
      CHECK(cudaFree(w.lut));
      CHECK(cudaFree(w.scales));
      CHECK(cudaFree(w.zeros));
      CHECK(cudaFree(w.scales_t));
      CHECK(cudaFree(w.zeros_t));
    }
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
