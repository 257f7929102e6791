// Why the host's OpenMP team: torch runs its own ops on an OpenMP team whose threads spin for a while after each
// op. A second pool of threads (kernswap's) then competes with those spinning threads for the same cores, and a
// call that follows a torch op loses its worker for a scheduler slice: on a 2-core AVX2 machine a 576 x 576 W8A8
// layer at M = 512 measured anywhere between 0.55x and 1.03x torch's fp32 GEMM from one run to the next, and a
// steady 1.0x with OMP_WAIT_POLICY=PASSIVE. Running on the same team instead finds its threads hot and idle.
// The runtime is the one already loaded (dlopen with RTLD_NOLOAD): kernswap links no OpenMP itself and stays
// torch-free; libgomp and Intel's libiomp5 both export GOMP_parallel.
#include "cpu/parallel_host.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <dlfcn.h>
#include <pthread.h>
#define KS_HOST_OMP 1
#else
#define KS_HOST_OMP 0
#endif

namespace kernswap {
namespace cpu {
namespace {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpQuery = int (*)();

struct HostOmp {
  GompParallel parallel = nullptr;
  OmpQuery in_parallel = nullptr;
  const char* library = nullptr;
  const char* why_not = "no OpenMP runtime loaded in this process";
};

// Set in a forked child: GNU OpenMP's team does not survive fork (a child that enters a parallel region after
// its parent used one hangs, torch's own ops included), so the child's kernels run on a fresh kernswap pool.
std::atomic<bool> g_forked{false};

const HostOmp& host() {
  static const HostOmp h = [] {
    HostOmp r;
#if KS_HOST_OMP
    pthread_atfork(nullptr, nullptr, [] { g_forked.store(true, std::memory_order_relaxed); });
#endif
    const char* want = std::getenv("KERNSWAP_PARALLEL");
    if (want && std::strcmp(want, "pool") == 0) {
      r.why_not = "KERNSWAP_PARALLEL=pool";
      return r;
    }
#if KS_HOST_OMP
    for (const char* lib : {"libgomp.so.1", "libiomp5.so"}) {
      void* so = dlopen(lib, RTLD_NOW | RTLD_NOLOAD);  // only a runtime the process has already loaded
      if (!so) continue;
      auto par = reinterpret_cast<GompParallel>(dlsym(so, "GOMP_parallel"));
      auto inpar = reinterpret_cast<OmpQuery>(dlsym(so, "omp_in_parallel"));
      if (par && inpar) {
        r.parallel = par;
        r.in_parallel = inpar;
        r.library = lib;
        return r;
      }
    }
#endif
    return r;
  }();
  return h;
}

struct Job {
  const RangeFn* fn;
  int64_t n;
  int parts;
  std::atomic<int> next{0};
};

// Every thread of the team (the caller included) takes parts from the shared counter, so a team thread that
// starts late leaves its part to the others instead of holding the call up.
void run_parts(void* data) {
  Job& j = *static_cast<Job*>(data);
  for (int part = j.next.fetch_add(1, std::memory_order_relaxed); part < j.parts;
       part = j.next.fetch_add(1, std::memory_order_relaxed)) {
    const int64_t b = j.n * part / j.parts, e = j.n * (part + 1) / j.parts;
    if (b < e) (*j.fn)(b, e);
  }
}

}  // namespace

bool host_parallel_for(int64_t n, int nthreads, const RangeFn& fn) {
  const HostOmp& h = host();
  if (!h.parallel || g_forked.load(std::memory_order_relaxed)) return false;
  if (h.in_parallel()) {  // already inside a parallel region (nested call): run inline, never a nested team
    fn(0, n);
    return true;
  }
  Job job{&fn, n, nthreads};
  h.parallel(run_parts, &job, static_cast<unsigned>(nthreads), 0);
  return true;
}

std::string parallel_backend() {
  const HostOmp& h = host();
  if (h.parallel && g_forked.load(std::memory_order_relaxed))
    return "kernswap pool (forked child: the parent's OpenMP team does not exist here)";
  return h.parallel ? std::string("openmp (") + h.library + ", the host's team)"
                    : std::string("kernswap pool (") + h.why_not + ")";
}

}  // namespace cpu
}  // namespace kernswap
