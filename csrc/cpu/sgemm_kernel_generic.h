// Portable fp32 GEMM pieces (see sgemm_driver.h for the contract): plain loops over 16-column slices that
// the compiler vectorises for the translation unit's ISA (baseline x86-64 or AVX2 + FMA).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#ifndef KS_ISA_NS
#error "define KS_ISA_NS before including sgemm_kernel_generic.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {
namespace sgemm_detail {

inline float madd(float a, float b, float c) {
#ifdef __FMA__
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

template <int MR>
void micro(int64_t nc, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb, float* C,
           int64_t ldc, bool acc, const float* cs) {
  for (int64_t j0 = 0; j0 < nc; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, nc - j0);
    float c[MR][16] = {};
    float brow[16] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float* b = B + k * ldb + j0;
      if (w < 16) {
        std::memcpy(brow, b, w * sizeof(float));
        b = brow;
      }
      for (int m = 0; m < MR; ++m) {
        const float a = A[m * a_rs + k * a_cs];
        for (int j = 0; j < 16; ++j) c[m][j] = madd(a, b[j], c[m][j]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int64_t j = 0; j < w; ++j) {
        float* p = C + m * ldc + j0 + j;
        *p = acc ? madd(*p, cs ? cs[j0 + j] : 1.f, c[m][j]) : c[m][j];
      }
  }
}

void dot_nt_small(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C,
                  int64_t ldc, bool acc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float* a = A + m * lda;
      const float* b = Bt + n * ldbt;
      float part[16] = {};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int i = 0; i < 16; ++i) part[i] = madd(a[k + i], b[k + i], part[i]);
      for (int i = 0; k + i < K; ++i) part[i] = madd(a[k + i], b[k + i], part[i]);
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += part[i];
      C[m * ldc + n] = acc ? C[m * ldc + n] + s : s;
    }
}

}  // namespace sgemm_detail

void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {  // 16-row strips: 16 read streams, contiguous writes
    const int64_t w = std::min<int64_t>(16, rows - r0);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < w; ++r) dst[c * ldd + r0 + r] = src[(r0 + r) * lds + c];
  }
}
}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
