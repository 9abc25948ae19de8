// Helper threads for the CPU LUT GEMM that wait for the next call's work awake (spinning) for
// a short while before they sleep.
//
// Why: a decode step calls the kernel ~200 times, 5-60 us each. Tasks put on XLA's intra-op
// pool started too late to take a share of such a call: on the 2-core development VM the
// pool's thread ran 3% of a 576 x 576 GEMV's chunks (the calling thread the rest), so small
// calls ran on one core. A helper that is already awake picks a call's chunks up within a
// microsecond (OpenMP runtimes spin for the same reason): docs/cpu_kernel_notes.md, v7.
//
// Use: `SpinPool::get(n)->post(job, wanted)`, a shared_ptr to a SpinJob and how many helpers
// it can use; the caller then runs the job too. Correctness never depends on a helper: a job
// is a set of chunks claimed from a shared counter, its caller claims chunks until none is
// left, and a helper that comes late finds none. Only the newest job is offered (a call
// overlapping another one leaves the older to its own caller), and only to `wanted` helpers
// (the others stay waiting). `SpinPool::spin_us()` (ANY4_JAX_CPU_SPIN_US, set by
// any4_jax/kernels/cpu.py; default 200) is how long an idle helper spins before it sleeps
// until a post wakes it; 0: it sleeps at once. A spinning helper yields between its checks,
// giving its core to a runnable thread that waits for it.
//
// Everything here has internal linkage (an unnamed namespace; the header is included by one
// source per library): each loaded copy of the library (the instruction-set variants the
// tests build, an A/B of two versions) has its own pool, never one of another build's layout.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#define ANY4_SPIN_PAUSE() _mm_pause()
#else
#define ANY4_SPIN_PAUSE() std::this_thread::yield()
#endif

namespace any4 {
namespace {

struct SpinJob {
  virtual ~SpinJob() = default;
  virtual void run() = 0;
};

class SpinPool {
 public:
  static constexpr int kMaxHelpers = 15;  // a call's chunks are at most 4 x 16 here

  // The process's pool, started by the first call with `helpers` > 0 (capped at kMaxHelpers;
  // later counts are ignored); nullptr before that. Never freed: its detached threads may
  // outlive static destructors at exit. A forked child starts its own (the parent's threads
  // are not in it).
  static SpinPool* get(int helpers) {
    static std::once_flag once;
    std::call_once(once, [] {
      pthread_atfork(nullptr, nullptr, [] { instance().store(nullptr); });
    });
    SpinPool* p = instance().load(std::memory_order_acquire);
    if (p != nullptr || helpers <= 0) return p;
    static std::mutex creating;
    std::lock_guard<std::mutex> lock(creating);
    p = instance().load(std::memory_order_acquire);
    if (p == nullptr) {
      p = new SpinPool(std::min(helpers, kMaxHelpers));
      instance().store(p, std::memory_order_release);
    }
    return p;
  }

  // Microseconds an idle helper spins (read each time it goes idle).
  static std::atomic<long>& spin_us() {
    static std::atomic<long> us{200};
    return us;
  }

  // Offers `job` to `wanted` helpers (replacing an older job).
  void post(std::shared_ptr<SpinJob> job, int wanted) {
    wanted = std::min(wanted, started_);
    if (wanted <= 0) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = std::move(job);
      takers_ = wanted;
      seq_.fetch_add(1, std::memory_order_release);
    }
    for (int i = 0; i < wanted; ++i) cv_.notify_one();  // no system call when none sleeps
  }

 private:
  // Starts the helpers; a thread that cannot be started (a thread limit) leaves fewer, and
  // with none the callers run alone.
  explicit SpinPool(int helpers) {
    for (int i = 0; i < helpers; ++i) {
      try {
        std::thread([this] { loop(); }).detach();
        ++started_;
      } catch (const std::system_error&) {
        break;
      }
    }
  }

  static std::atomic<SpinPool*>& instance() {
    static std::atomic<SpinPool*> p{nullptr};
    return p;
  }

  void loop() {
    uint64_t seen = seq_.load(std::memory_order_acquire);
    for (;;) {
      // awake until the next post or for spin_us(); the clock is read once per 64 pauses
      const std::chrono::microseconds spin(spin_us().load(std::memory_order_relaxed));
      const auto until = std::chrono::steady_clock::now() + spin;
      while (spin.count() > 0 && seq_.load(std::memory_order_acquire) == seen) {
        for (int i = 0; i < 64; ++i) ANY4_SPIN_PAUSE();
        // and let another thread that wants this core run: XLA's pool threads run its own
        // parallel ops between our calls, and a helper that kept the core made them wait (a
        // decode step 8-9% slower, docs/cpu_kernel_notes.md, v9)
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() > until) break;
      }
      std::shared_ptr<SpinJob> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return seq_.load(std::memory_order_acquire) != seen; });
        seen = seq_.load(std::memory_order_acquire);
        if (takers_ > 0) {  // else enough helpers took this job: wait for the next
          --takers_;
          job = job_;
        }
      }
      if (job) job->run();
    }
  }

  int started_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<SpinJob> job_;  // the newest job
  int takers_ = 0;  // helpers the newest job can still use (under mu_)
  std::atomic<uint64_t> seq_{0};  // jobs posted so far
};

}  // namespace
}  // namespace any4
