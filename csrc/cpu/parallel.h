// A small persistent thread pool. parallel_for splits [0, n) into `nthreads` contiguous ranges (static
// partition: each thread streams its own contiguous slice of the weights), the caller runs range 0.
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
