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
// The inner loops live in lut_gemm_problem_cpu.h (the problem, the scalar loop),
// lut_gemm_vector_cpu.h (AVX-512 / AVX2) and lut_gemm_dot_bf16_cpu.h (vdpbf16ps).
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

#include "lut_gemm_dot_bf16_cpu.h"
#include "lut_gemm_problem_cpu.h"
#include "lut_gemm_vector_cpu.h"
#include "spin_pool_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
