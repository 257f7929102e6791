#include "cpu/parallel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <immintrin.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kernswap {
namespace cpu {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t n, int nthreads, const RangeFn& fn) {
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one job at a time (calls from several Python threads)
    ensure_workers(nthreads - 1);
    fn_ = &fn;
    n_ = n;
    nparts_ = nthreads;
    pending_.store(nthreads - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    run_part(0);
    while (pending_.load(std::memory_order_acquire) > 0) _mm_pause();
    fn_ = nullptr;
  }

 private:
  void run_part(int part) {
    const int64_t b = n_ * part / nparts_, e = n_ * (part + 1) / nparts_;
    if (b < e) (*fn_)(b, e);
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int part = static_cast<int>(workers_.size()) + 1;
      const uint64_t seen = gen_.load();  // read before this job's generation is published
      workers_.emplace_back([this, part, seen] { loop(part, seen); });
    }
  }

  void loop(int part, uint64_t seen) {
    for (;;) {
      // Spin for a short while, then sleep until the next job.
      auto t0 = std::chrono::steady_clock::now();
      while (gen_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(100)) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      if (fn_ != nullptr && part < nparts_) {
        run_part(part);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  const RangeFn* fn_ = nullptr;
  int64_t n_ = 0;
  int nparts_ = 1;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: avoids joining threads during interpreter shutdown
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int nthreads, const RangeFn& fn) {
  if (n <= 0) return;
  if (nthreads > n) nthreads = static_cast<int>(n);
  if (nthreads <= 1) {
    fn(0, n);
    return;
  }
  pool().run(n, nthreads, fn);
}

}  // namespace cpu
}  // namespace kernswap
