// The engine's driver, shared by every ISA: activation preparation, then a static partition of
// (weight block x row block) tasks over the threads. Each TU defines `compute_block` before including.
#pragma once
#include "cpu/qlinear_common.h"
#include "cpu/qlinear_dequant.h"

// Bytes of packed weights per task's weight block (kept cached while the row blocks pass); a TU may set it
// to its machines' L2 size before including this file.
#ifndef KS_QL_BLOCK_BYTES
#define KS_QL_BLOCK_BYTES (1 << 20)
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {

inline void run_qlinear(const QLinearArgs& a) {
  const Plan p = make_plan(a);
  if (p.M <= 0 || p.N <= 0) return;
  static thread_local Acts scratch;  // per calling thread; reused across calls
  Acts& acts = scratch;              // workers must see the caller's buffers, not their own thread_local
  prepare_acts(p, a, acts);

  // Weight block: KS_QL_BLOCK_BYTES of packed weights (stays in L2 while the row blocks stream past it).
  int64_t nb = std::max<int64_t>(1, std::min<int64_t>(32, int64_t{KS_QL_BLOCK_BYTES} / p.tile_bytes));
  // Threads only where each gets enough work to pay for waking it: ~256K digit-MACs (~10 us) a thread. The CPU
  // threads are torch's OpenMP team (parallel_host.cpp), still spinning from the previous op or layer, so waking them
  // costs little: SmolLM2-135M int4 decode (576-wide layers on two threads instead of one) went from 47.5 to 59-63
  // tokens/s on a 2-core Xeon (the threshold was ~8M digit-MACs, from when the pool's workers slept between calls).
  const double work = static_cast<double>(p.M) * p.Np * p.kpad * p.ndig;
  const int threads = static_cast<int>(std::max<double>(1, std::min<double>(a.num_threads, work / (1 << 18))));
  while (nb > 1 && (p.ntiles + nb - 1) / nb < 2 * threads && p.M <= 64) nb /= 2;  // enough tasks to share
  // Equal blocks: the tiles (and rows) split into as many blocks as the caps ask for, of equal size, so that the
  // static partition gives every thread the same work (36 tiles as 28 + 8 left one of two threads idle 60% of
  // the call on a 576-wide layer).
  const int64_t nmb = p.M <= 96 ? 1 : (p.M + 63) / 64, mb = (p.M + nmb - 1) / nmb;
  int64_t ntb = (p.ntiles + nb - 1) / nb;
  if (ntb * nmb < 8 * threads) ntb = std::min<int64_t>(p.ntiles, (ntb + threads - 1) / threads * threads);
  nb = (p.ntiles + ntb - 1) / ntb;
  ntb = (p.ntiles + nb - 1) / nb;
  parallel_for(ntb * nmb, threads, [&](int64_t b, int64_t e) {
    for (int64_t id = b; id < e; ++id) {
      const int64_t tb = id / nmb, mi = id % nmb;
      const int64_t m0 = mi * mb, t0 = tb * nb;
      compute_block(p, a, acts, m0, std::min(mb, p.M - m0), t0, std::min(nb, p.ntiles - t0));
    }
  });
}

// A TU may route weight-only calls from KS_QL_FMA_FROM_ROWS rows on to its fp32 kernel `qlinear_fma`.
void qlinear(const QLinearArgs& a) {
#ifdef KS_QL_FMA_FROM_ROWS
  if (!a.dynamic_act && a.M >= KS_QL_FMA_FROM_ROWS) return qlinear_fma(a);
#endif
  run_qlinear(a);
}
// A TU may dequantize whole tiles with its own vectorised function (KS_QL_DEQUANT_TILE), or leave qdequant to a
// lower tier's (KS_QL_NO_QDEQUANT: the registry then picks that one).
#ifndef KS_QL_NO_QDEQUANT
#ifndef KS_QL_DEQUANT_TILE
#define KS_QL_DEQUANT_TILE dequant_tile_plain
#endif
void qdequant(const QDequantArgs& a) { run_qdequant(a, KS_QL_DEQUANT_TILE); }
#endif

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
