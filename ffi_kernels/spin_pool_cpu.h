// Helper threads for the CPU LUT GEMM that wait for the next call's work awake (spinning) for
// a short while before they sleep.
//
// Why: a decode step calls the kernel ~200 times, 5-60 us each. Tasks put on XLA's intra-op
// pool started too late to take a share of such a call: on the 2-core development VM the
// pool's thread ran 3% of a 576 x 576 GEMV's chunks (the calling thread the rest), so small
// calls ran on one core. A helper that is already awake picks a call's chunks up within a
// microsecond (OpenMP runtimes spin for the same reason): docs/cpu_kernel_notes.md, v7.
//
// Use: `SpinPool::get(n)->post(job)`, a shared_ptr to a SpinJob; the caller then runs the job
// too. Correctness never depends on a helper: a job is a set of chunks claimed from a shared
// counter, its caller claims chunks until none is left, and a helper that comes late finds
// none. Only the newest job is offered (a call overlapping another one leaves the older to its
// own caller). `SpinPool::spin_us()` (ANY4_JAX_CPU_SPIN_US, set by any4_jax/kernels/cpu.py;
// default 200) is how long an idle helper spins before it sleeps until the next post; 0: it
// sleeps at once.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#define ANY4_SPIN_PAUSE() _mm_pause()
#else
#define ANY4_SPIN_PAUSE() std::this_thread::yield()
#endif

namespace any4 {

struct SpinJob {
  virtual ~SpinJob() = default;
  virtual void run() = 0;
};

class SpinPool {
 public:
  // The process's pool, started by the first call with `helpers` > 0 threads (later counts
  // are ignored); nullptr before that. Never freed: its detached threads may outlive static
  // destructors at exit. A forked child starts its own (the parent's threads are not in it).
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
      p = new SpinPool(helpers);
      instance().store(p, std::memory_order_release);
    }
    return p;
  }

  // Offers `job` to the helpers (replacing an older job).
  void post(std::shared_ptr<SpinJob> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = std::move(job);
      seq_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();  // no system call when no helper sleeps
  }

  // Microseconds an idle helper spins (read each time it goes idle).
  static std::atomic<long>& spin_us() {
    static std::atomic<long> us{200};
    return us;
  }

 private:
  explicit SpinPool(int helpers) {
    for (int i = 0; i < helpers; ++i) std::thread([this] { loop(); }).detach();
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
        if (std::chrono::steady_clock::now() > until) break;
      }
      std::shared_ptr<SpinJob> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return seq_.load(std::memory_order_acquire) != seen; });
        seen = seq_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->run();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<SpinJob> job_;
  std::atomic<uint64_t> seq_{0};
};

}  // namespace any4
