#include "cpu/parallel.h"

#include "cpu/parallel_host.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define KS_HAVE_ATFORK 1
#endif

namespace kernswap {
namespace cpu {
namespace {

// True on a thread while it runs a part of a pool job (caller or worker).
bool& in_job() {
  static thread_local bool v = false;
  return v;
}

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true, std::memory_order_release);
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
    nparts_.store(nthreads, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    next_.store(0, std::memory_order_release);  // publishes fn_, n_, nparts_ to whoever takes a part
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    in_job() = true;
    take_parts();  // the caller takes parts too: a worker that is not scheduled yet never holds the job up
    in_job() = false;
    while (done_.load(std::memory_order_acquire) < nthreads) cpu_relax();
    next_.store(kClosed, std::memory_order_release);  // a worker waking late finds nothing to take
    fn_ = nullptr;
  }

 private:
  static constexpr int kClosed = 1 << 30;

  // Takes parts [0, nparts_) one at a time from the shared counter; each part is the same contiguous range
  // of [0, n) whoever runs it.
  void take_parts() {
    const auto more = [this](int part) { return part < nparts_.load(std::memory_order_relaxed); };
    for (int part = next_.fetch_add(1, std::memory_order_acq_rel); more(part);
         part = next_.fetch_add(1, std::memory_order_acq_rel)) {
      run_part(part);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void run_part(int part) {
    const int np = nparts_.load(std::memory_order_relaxed);
    const int64_t b = n_ * part / np, e = n_ * (part + 1) / np;
    if (b < e) (*fn_)(b, e);
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const uint64_t seen = gen_.load();  // read before this job's generation is published
      workers_.emplace_back([this, seen] { loop(seen); });
    }
  }

  void loop(uint64_t seen) {
    for (;;) {
      // Spin for a short while, then sleep until the next job.
      auto t0 = std::chrono::steady_clock::now();
      while (gen_.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(100)) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      in_job() = true;  // a parallel_for inside a part runs inline: the pool runs one job at a time
      take_parts();
      in_job() = false;
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> next_{kClosed}, done_{0};
  const RangeFn* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int> nparts_{1};
  std::atomic<bool> stop_{false};
};

// The process's pool. Never destroyed (joining threads during interpreter shutdown can hang). A forked child
// (DataLoader workers, multiprocessing) inherits the parent's pool object but none of its threads, and possibly
// a mutex held mid-job: the fork handler drops the pointer, so the child builds a fresh pool on first use (the
// old object is leaked on purpose; its threads do not exist in the child).
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static std::mutex create_mu;
  std::lock_guard<std::mutex> lk(create_mu);
  p = g_pool.load(std::memory_order_acquire);
  if (!p) {
#if KS_HAVE_ATFORK
    static const int registered = pthread_atfork(nullptr, nullptr, [] {
      g_pool.store(nullptr, std::memory_order_release);
      in_job() = false;
    });
    (void)registered;
#endif
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
  }
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
  if (host_parallel_for(n, nthreads, fn)) return;  // torch's OpenMP team when it is loaded
  if (in_job()) {  // nested inside a pool job: inline (the pool's job lock is held by the outer call)
    fn(0, n);
    return;
  }
  pool().run(n, nthreads, fn);
}

}  // namespace cpu
}  // namespace kernswap
