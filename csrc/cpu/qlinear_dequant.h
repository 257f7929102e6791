// Dequantization of packed weight rows to fp32, compiled once per ISA translation unit inside
// `namespace KS_ISA_NS` (plain loops the compiler vectorises for the TU's instruction set).
//   W[n - n0][k] (row stride ld) = (q[n][k] - zero[n][k]) * scale[n][k] for n0 <= n < n1, every k < K,
// with the packed layouts of qlinear.h (int8: 16n x 4k tiles, zero 0; int4: 16n x 8k nibble tiles, zero 8 or
// the asymmetric zero-points). Used where an fp32 GEMM on dequantized panels beats the integer engine
// (weight-only formats at larger M: three activation digits cost three times the products).
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/parallel.h"
#include "cpu/qlinear.h"

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {

// Rows [r0, r1) of 16-row tile t, plain loops. A TU may bring a vectorised tile function with the same contract
// (KS_QL_DEQUANT_TILE, qlinear_driver.h) and keep this one for partial tiles.
inline void dequant_tile_plain(const QDequantArgs& a, int64_t t, int64_t r0, int64_t r1) {
  const int64_t Np = (a.N + 15) / 16 * 16;
  if (a.bits == 8) {
    const int64_t kpad = (a.K + 3) / 4 * 4;
    const int8_t* tile = reinterpret_cast<const int8_t*>(a.packed) + t * kpad * 16;
    for (int64_t nn = r0; nn < r1; ++nn) {
      const int64_t n = t * 16 + nn;
      const float s = a.scale[n];
      float* dst = a.out + (n - a.n0) * a.ld;
      for (int64_t q = 0; q < a.K / 4; ++q)
        for (int kk = 0; kk < 4; ++kk) dst[q * 4 + kk] = static_cast<float>(tile[q * 64 + nn * 4 + kk]) * s;
      for (int64_t k = a.K / 4 * 4; k < a.K; ++k) dst[k] = static_cast<float>(tile[(k / 4) * 64 + nn * 4 + k % 4]) * s;
    }
    return;
  }
  const uint8_t* tile = a.packed + t * a.K * 8;
  for (int64_t nn = r0; nn < r1; ++nn) {
    const int64_t n = t * 16 + nn;
    float* dst = a.out + (n - a.n0) * a.ld;
    for (int64_t g = 0; g < a.K / a.group_size; ++g) {
      const float s = a.scale[g * Np + n];
      const float z = zero_of(a, g * Np + n);
      for (int64_t o = g * a.group_size / 8; o < (g + 1) * a.group_size / 8; ++o)
        for (int j = 0; j < 4; ++j) {
          const uint8_t b = tile[o * 64 + nn * 4 + j];
          dst[o * 8 + j] = (static_cast<float>(b & 0x0F) - z) * s;
          dst[o * 8 + 4 + j] = (static_cast<float>(b >> 4) - z) * s;
        }
    }
  }
}

// Every requested row, tile by tile through `tile` (a function with dequant_tile_plain's contract).
template <class TileFn>
inline void run_qdequant(const QDequantArgs& a, TileFn tile) {
  if (a.n1 <= a.n0) return;
  const int64_t t0 = a.n0 / 16, t1 = (a.n1 + 15) / 16;
  const double work = static_cast<double>(a.n1 - a.n0) * a.K;
  // one thread below ~1 ms of work: waking the pool right after torch's GEMM (its OpenMP threads still spin on the
  // other cores) costs more than it saves (576 x 576: 0.07 ms on one thread, 0.2 ms on two)
  const int threads = work >= (1 << 22) ? a.num_threads : 1;
  parallel_for(t1 - t0, threads, [&](int64_t b, int64_t e) {
    for (int64_t t = t0 + b; t < t0 + e; ++t)
      tile(a, t, std::max<int64_t>(0, a.n0 - t * 16), std::min<int64_t>(16, a.n1 - t * 16));
  });
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
