// A small persistent thread pool. parallel_for splits [0, n) into `nthreads` contiguous ranges (static
// partition: each range streams its own contiguous slice of the weights). The caller and the workers take the
// ranges from a shared counter in order, so a worker that is not scheduled in time (another process, or
// torch's OpenMP threads still spinning on its core) leaves its range to the caller instead of stalling it.
// Workers spin briefly after a job (back-to-back layer calls reuse them at once) and then sleep, so they
// do not steal cores from torch between calls.
#pragma once
#include <cstdint>
#include <functional>

namespace kernswap {
namespace cpu {

using RangeFn = std::function<void(int64_t begin, int64_t end)>;
void parallel_for(int64_t n, int nthreads, const RangeFn& fn);

}  // namespace cpu
}  // namespace kernswap
