// Parallel work on the host process's OpenMP team (the one torch's intra-op threads belong to), when the process
// has loaded an OpenMP runtime; kernswap's own pool otherwise (parallel.cpp).
#pragma once
#include <cstdint>
#include <string>

#include "cpu/parallel.h"

namespace kernswap {
namespace cpu {

// Runs fn over [0, n) split into `nthreads` contiguous parts on the host's OpenMP team and returns true; returns
// false (nothing run) when no OpenMP runtime is loaded, KERNSWAP_PARALLEL=pool asks for kernswap's own pool, or
// the process is a forked child (the parent's OpenMP team does not survive fork).
bool host_parallel_for(int64_t n, int nthreads, const RangeFn& fn);

// "openmp (<library>)" or "kernswap pool (<why>)": what parallel_for runs on, for diagnostics.
std::string parallel_backend();

}  // namespace cpu
}  // namespace kernswap
