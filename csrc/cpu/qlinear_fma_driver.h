// The tier-independent part of the weight-only fp32 FMA kernels (qlinear_fma_avx2.cpp, qlinear_fma_avx512.cpp):
// y = x @ dequant(W)^T + bias, with dequant(W) computed exactly as the format's dequantize() does (int8: q * s,
// int4: (q - zero) * s, one fp32 rounding), so the only difference from the reference is the summation order.
//
// Why: the integer engines carry weight-only activations as three int8 digits, i.e. three times the products of a
// dynamic-activation call; torch's fp32 GEMM on dequantized panels writes and re-reads a 4 MiB fp32 copy of the
// weight. Here each task dequantizes NT 16-row weight tiles, kFmaKC / NT values of k at a time, into a 16 KiB fp32
// buffer (buf[k * 16 NT + 16 j + row] for tile j) that stays in L1, and the tier's MR x 16 NT FMA micro-kernel runs
// every activation row of its block against that buffer. The weight is read once from memory in its packed size (8 or 4 bits) and dequantized
// once per row block; the fp32 panel never leaves L1.
//
// A tier's TU includes this header inside no namespace after defining KS_ISA_NS, then defines a struct T with
//   static constexpr int kMR, kNT;               rows and 16-column tiles per micro-kernel call
//   static void dequant8(const QLinearArgs&, const FmaGeo&, int64_t t, int64_t k0, int64_t k1, float* buf,
//                        int64_t ldb);            tile t, k in [k0, k1) -> buf[(k - k0) * ldb + row]
//   static void dequant4(...same...);
//   static void rows(int rows, int nt, const float* x, int64_t ldx, int64_t kc, const float* buf, int64_t ldb,
//                    float* o, int64_t ldo, bool first);
//                                                 o[m * ldo + c] (+)= sum_k x[m * ldx + k] * buf[k * ldb + c],
//                                                 m < rows, c < 16 nt, k < kc
// and its qlinear_fma as FmaDriver<T>::run.
#pragma once
#include "cpu/qlinear_common.h"

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {

struct FmaGeo {
  int64_t M, K, N, Np, ntiles, kpad, tile_bytes;
};

constexpr int64_t kFmaKC = 256;  // k per dequantized chunk: 16 rows x 256 x 4 B = 16 KiB, half of L1d

inline FmaGeo make_fma_geo(const QLinearArgs& a) {
  FmaGeo g;
  g.M = a.M;
  g.K = a.K;
  g.N = a.N;
  g.ntiles = (a.N + 15) / 16;
  g.Np = g.ntiles * 16;
  g.kpad = a.bits == 4 ? a.K : (a.K + 3) / 4 * 4;  // int4: K % group_size == 0 (checked by the binding)
  g.tile_bytes = a.bits == 4 ? a.K * 8 : g.kpad * 16;
  return g;
}

template <class T>
struct FmaDriver {
  static constexpr int64_t kMaxRowBlock = 120;  // rows per task; outputs of a block: 120 x 64 B
  static_assert(kMaxRowBlock % T::kMR == 0, "a row block is a whole number of micro-kernel calls");

  static constexpr int64_t kKC = kFmaKC / T::kNT;  // k per chunk: the buffer stays 16 KiB whatever NT
  static_assert(kKC % 8 == 0, "chunks of whole int4 k-octets");

  // One task: weight tiles [t0, t0 + nt) against activation rows [m0, m0 + mc).
  static void tile_task(const QLinearArgs& a, const FmaGeo& g, const float* x, int64_t ldx, int64_t t0, int nt,
                        int64_t m0, int64_t mc) {
    alignas(64) float buf[kKC * 16 * T::kNT];
    alignas(64) float out[kMaxRowBlock * 16 * T::kNT];
    const int64_t ld = 16 * nt;
    for (int64_t k0 = 0; k0 < g.K; k0 += kKC) {
      const int64_t k1 = std::min(k0 + kKC, g.kpad);  // dequantize the zero padding too (int8 K % 4 != 0) ...
      for (int j = 0; j < nt; ++j) {
        if (a.bits == 8) {
          T::dequant8(a, g, t0 + j, k0, k1, buf + 16 * j, ld);
        } else {
          T::dequant4(a, g, t0 + j, k0, k1, buf + 16 * j, ld);
        }
      }
      const int64_t kc = std::min(k1, g.K) - k0;  // ... but multiply only the real k (x has K columns)
      for (int64_t m = 0; m < mc; m += T::kMR) {
        const int rows = static_cast<int>(std::min<int64_t>(T::kMR, mc - m));
        T::rows(rows, nt, x + (m0 + m) * ldx + k0, ldx, kc, buf, ld, out + ld * m, ld, k0 == 0);
      }
    }
    const int64_t n0 = t0 * 16, cnt = std::min<int64_t>(ld, g.N - n0);
    for (int64_t m = 0; m < mc; ++m) {
      const float* o = out + ld * m;
      if (a.y_dtype == DType::F32) {  // the common case, vectorised (bias added in fp32 as store_span)
        float* y = static_cast<float*>(a.y) + (m0 + m) * a.y_row_stride + n0;
        if (a.bias) {
          for (int64_t i = 0; i < cnt; ++i) y[i] = o[i] + a.bias[n0 + i];
        } else {
          for (int64_t i = 0; i < cnt; ++i) y[i] = o[i];
        }
      } else {
        store_span(a, m0 + m, n0, cnt, o);
      }
    }
  }

  static void run(const QLinearArgs& a) {
    const FmaGeo g = make_fma_geo(a);
    if (g.M <= 0 || g.N <= 0) return;
    // Threads only where each gets enough work to pay for waking it (~0.5M multiply-adds, ~50 us: measured, a
    // 576 x 576 layer at M = 16 already runs 1.3x faster on 2 threads than on one).
    const double work = static_cast<double>(g.M) * g.Np * g.K;
    const int threads = static_cast<int>(std::max<double>(1, std::min<double>(a.num_threads, work / (1 << 19))));

    // Activations as fp32 rows: fp32 inputs are read in place; bf16/fp16 ones converted once per call.
    const float* x = static_cast<const float*>(a.x);
    int64_t ldx = a.x_row_stride;
    static thread_local std::vector<float> xs;  // per calling thread, reused across calls
    if (a.x_dtype != DType::F32) {
      xs.resize(static_cast<size_t>(g.M * g.K));
      float* dst = xs.data();
      const int64_t esz = 2;
      parallel_for(g.M, g.M * g.K >= (1 << 16) ? threads : 1, [&](int64_t b, int64_t e) {
        for (int64_t m = b; m < e; ++m)
          load_row(static_cast<const char*>(a.x) + m * a.x_row_stride * esz, a.x_dtype, g.K, dst + m * g.K);
      });
      x = dst;
      ldx = g.K;
    }

    // Tasks: (group of NT tiles, row block), tile-major, so each thread's contiguous range streams its own slice
    // of the weight.
    const int64_t nblk = (g.M + kMaxRowBlock - 1) / kMaxRowBlock;
    const int64_t mb = (g.M + nblk - 1) / nblk;
    const int64_t mbr = std::min<int64_t>(kMaxRowBlock, (mb + T::kMR - 1) / T::kMR * T::kMR);
    const int64_t nmb = (g.M + mbr - 1) / mbr, ngroups = (g.ntiles + T::kNT - 1) / T::kNT;
    parallel_for(ngroups * nmb, threads, [&](int64_t b, int64_t e) {
      for (int64_t id = b; id < e; ++id) {
        const int64_t t0 = id / nmb * T::kNT, m0 = (id % nmb) * mbr;
        tile_task(a, g, x, ldx, t0, static_cast<int>(std::min<int64_t>(T::kNT, g.ntiles - t0)), m0,
                  std::min(mbr, g.M - m0));
      }
    });
  }
};

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
