// A small persistent thread pool. parallel_for splits [0, n) into `nthreads` contiguous ranges (static
// partition: each range streams its own contiguous slice of the weights). The caller and the workers take the
// ranges from a shared counter in order, so a worker that is not scheduled in time (another process, or
// torch's OpenMP threads still spinning on its core) leaves its range to the caller instead of stalling it.
// Workers spin briefly after a job (back-to-back layer calls reuse them at once) and then sleep, so they
// do not steal cores from torch between calls.
#pragma once
#include <cstdint>
#include <functional>

#include "cpu/isa.h"
#if KS_X86
#include <immintrin.h>
#endif

namespace kernswap {
namespace cpu {

// One iteration of a spin-wait: tells the core that the thread is spinning (saves power, frees the sibling
// hyper-thread, avoids the memory-order flush when the wait ends).
inline void cpu_relax() {
#if KS_X86
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

using RangeFn = std::function<void(int64_t begin, int64_t end)>;
void parallel_for(int64_t n, int nthreads, const RangeFn& fn);

}  // namespace cpu
}  // namespace kernswap
