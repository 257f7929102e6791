// The fp32 GEMM driver shared by every ISA (see sgemm.h), compiled once per ISA translation unit inside
// `namespace KS_ISA_NS`. Each TU defines, before including this file:
//   template <int MR> void micro(int64_t nc, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
//                                const float* B, int64_t ldb, float* C, int64_t ldc, bool acc, const float* cs);
//       C[MR x nc] (nc <= kNR) = (acc ? C * cs : 0) + A[MR x K] * B[K x nc]  (cs may be null: scale 1)
//   void dot_nt_small(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt,
//                     int64_t ldbt, float* C, int64_t ldc, bool acc);   // M <= kDotRows
//   void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd);
//       (the public internal one, sgemm.h)
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/sgemm.h"

#ifndef KS_ISA_NS
#error "define KS_ISA_NS before including sgemm_driver.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {
namespace sgemm_detail {

constexpr int64_t kNR = 64;       // columns per panel (4 AVX-512 vectors)
constexpr int64_t kMR = 6;        // rows per micro-tile
constexpr int64_t kKC = 256;      // k per packed panel (256 x 64 fp32 = 64 KiB, L2-resident)
constexpr int64_t kMC = 480;      // rows per packed A block (480 x 272 fp32 = 510 KiB)
constexpr int64_t kDotRows = 4;   // sgemm_nt: up to this many rows run as dot products on the Bt rows

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// Thread-local 64-byte aligned panel buffer (kKC x kNR floats).
inline float* panel_buffer() {
  static thread_local std::unique_ptr<float, FreeDeleter> buf(
      static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kKC * kNR)));
  return buf.get();
}

inline void micro_rows(int64_t mr, int64_t nc, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                       int64_t ldb, float* C, int64_t ldc, bool acc, const float* cs) {
  switch (mr) {
    case 1: return micro<1>(nc, K, A, a_rs, a_cs, B, ldb, C, ldc, acc, cs);
    case 2: return micro<2>(nc, K, A, a_rs, a_cs, B, ldb, C, ldc, acc, cs);
    case 3: return micro<3>(nc, K, A, a_rs, a_cs, B, ldb, C, ldc, acc, cs);
    case 4: return micro<4>(nc, K, A, a_rs, a_cs, B, ldb, C, ldc, acc, cs);
    case 5: return micro<5>(nc, K, A, a_rs, a_cs, B, ldb, C, ldc, acc, cs);
    default: return micro<6>(nc, K, A, a_rs, a_cs, B, ldb, C, ldc, acc, cs);
  }
}

// Every row of one column panel: micro-tiles of kMR rows (the last one shorter).
inline void panel_rows(int64_t M, int64_t nc, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                       int64_t ldb, float* C, int64_t ldc, bool acc, const float* cs) {
  for (int64_t m0 = 0; m0 < M; m0 += kMR)
    micro_rows(std::min(kMR, M - m0), nc, K, A + m0 * a_rs, a_rs, a_cs, B, ldb, C + m0 * ldc, ldc, acc, cs);
}

// A block copied row by row with a padded leading dimension (kKC + 16): the rows of a micro-tile then fall in
// different L1 sets whatever lda is (a power-of-two lda otherwise makes them evict the B panel).
constexpr int64_t kLdA = kKC + 16;
inline void pack_a(const float* A, int64_t lda, int64_t mc, int64_t kc, float* dst) {
  for (int64_t m = 0; m < mc; ++m) std::memcpy(dst + m * kLdA, A + m * lda, kc * sizeof(float));
}

// Packed path: per block of kMC rows and kKC k, A is copied once when several column panels reuse it;
// each 64-column panel of B is packed once (row copy or transpose) and run against every row of the block.
template <bool kTransB>
void gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  float* buf = panel_buffer();
  const bool pack_rows = N > 2 * kNR;
  static thread_local std::unique_ptr<float, FreeDeleter> abuf;
  if (pack_rows && !abuf) abuf.reset(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kMC * kLdA)));
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t mc = std::min(kMC, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const bool acc = accumulate || k0 > 0;
      const float* a = A + m0 * lda + k0;
      if (pack_rows) pack_a(a, lda, mc, kc, abuf.get());
      for (int64_t n0 = 0; n0 < N; n0 += kNR) {
        const int64_t nc = std::min(kNR, N - n0);
        if (kTransB) {
          transpose(nc, kc, B + n0 * ldb + k0, ldb, buf, kNR);
        } else {
          for (int64_t k = 0; k < kc; ++k) std::memcpy(buf + k * kNR, B + (k0 + k) * ldb + n0, nc * sizeof(float));
        }
        float* c = C + m0 * ldc + n0;
        if (pack_rows) {
          panel_rows(mc, nc, kc, abuf.get(), kLdA, 1, buf, kNR, c, ldc, acc, nullptr);
        } else {
          panel_rows(mc, nc, kc, a, lda, 1, buf, kNR, c, ldc, acc, nullptr);
        }
      }
    }
  }
}

}  // namespace sgemm_detail

void gemm_strided(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate, const float* col_scale) {
  using namespace sgemm_detail;
  if (M <= 0 || N <= 0) return;
  K = std::max<int64_t>(K, 0);
  for (int64_t n0 = 0; n0 < N; n0 += kNR)
    panel_rows(M, std::min(kNR, N - n0), K, A, a_rs, a_cs, B + n0, ldb, C + n0, ldc, accumulate,
               col_scale ? col_scale + n0 : nullptr);
}

void sgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  using namespace sgemm_detail;
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || M <= 2 * kMR) return gemm_strided(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate, nullptr);
  gemm_packed<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C,
              int64_t ldc, bool accumulate) {
  using namespace sgemm_detail;
  if (M <= 0 || N <= 0) return;
  if (M <= kDotRows || K <= 0) return dot_nt_small(M, N, std::max<int64_t>(K, 0), A, lda, Bt, ldbt, C, ldc, accumulate);
  gemm_packed<true>(M, N, K, A, lda, Bt, ldbt, C, ldc, accumulate);
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
