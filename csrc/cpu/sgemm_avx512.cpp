// AVX-512 build of the fp32 GEMM (sgemm.h): a register-tiled micro-kernel of up to 6 rows x 64 columns
// (24 zmm accumulators; each k step loads one B row as 4 zmm and broadcasts one A element per row straight
// from memory into the FMA), masked on the last column vector; dot products for small-M sgemm_nt.
#define KS_ISA_NS avx512
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace kernswap {
namespace cpu {
namespace avx512 {
namespace sgemm_detail {

#define KS_UNROLL _Pragma("GCC unroll 16")

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u)); }

// Loads/stores of the last column vector: masked only when the panel width is not a multiple of 16 (a masked
// store does not forward to a later load of the same data).
template <bool kFull>
inline __m512 load_last(__mmask16 last, const float* p) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(last, p);
}

template <int MR, int NV, bool kFull>
inline void micro_fixed(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb, float* C,
                        int64_t ldc, __mmask16 last, bool acc, const float* cs) {
  __m512 c[MR][NV];
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int v = 0; v < NV; ++v) c[m][v] = _mm512_setzero_ps();
  const float* a[MR];
  KS_UNROLL
  for (int m = 0; m < MR; ++m) a[m] = A + m * a_rs;
  if (acc) {  // the C tile is read after the k loop: fetch it meanwhile
    KS_UNROLL
    for (int m = 0; m < MR; ++m)
      KS_UNROLL
      for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(C + m * ldc + 16 * v), _MM_HINT_T0);
  }
  int64_t ak = 0;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    KS_UNROLL
    for (int v = 0; v < NV; ++v)
      b[v] = (v == NV - 1) ? load_last<kFull>(last, B + 16 * v) : _mm512_loadu_ps(B + 16 * v);
    KS_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(a[m][ak]);
      KS_UNROLL
      for (int v = 0; v < NV; ++v) c[m][v] = _mm512_fmadd_ps(av, b[v], c[m][v]);
    }
    B += ldb;
    ak += a_cs;
  }
  if (acc) {
    __m512 s[NV];
    if (cs) {
      KS_UNROLL
      for (int v = 0; v < NV; ++v)
        s[v] = (v == NV - 1) ? load_last<kFull>(last, cs + 16 * v) : _mm512_loadu_ps(cs + 16 * v);
    }
    KS_UNROLL
    for (int m = 0; m < MR; ++m)
      KS_UNROLL
      for (int v = 0; v < NV; ++v) {
        const float* p = C + m * ldc + 16 * v;
        const __m512 old = (v == NV - 1) ? load_last<kFull>(last, p) : _mm512_loadu_ps(p);
        c[m][v] = cs ? _mm512_fmadd_ps(old, s[v], c[m][v]) : _mm512_add_ps(old, c[m][v]);
      }
  }
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int v = 0; v < NV; ++v) {
      float* p = C + m * ldc + 16 * v;
      if (v == NV - 1 && !kFull)
        _mm512_mask_storeu_ps(p, last, c[m][v]);
      else
        _mm512_storeu_ps(p, c[m][v]);
    }
}

template <int MR>
void micro(int64_t nc, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb, float* C,
           int64_t ldc, bool acc, const float* cs) {
  const __mmask16 last = tail_mask(nc - (nc - 1) / 16 * 16);
  if (nc % 16 == 0) {
    switch (nc / 16) {
      case 1: return micro_fixed<MR, 1, true>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
      case 2: return micro_fixed<MR, 2, true>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
      case 3: return micro_fixed<MR, 3, true>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
      default: return micro_fixed<MR, 4, true>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
    }
  }
  switch ((nc + 15) / 16) {
    case 1: return micro_fixed<MR, 1, false>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
    case 2: return micro_fixed<MR, 2, false>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
    case 3: return micro_fixed<MR, 3, false>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
    default: return micro_fixed<MR, 4, false>(K, A, a_rs, a_cs, B, ldb, C, ldc, last, acc, cs);
  }
}

// MM rows x NB columns of C as dot products along k (rows of A against rows of Bt).
template <int MM, int NB>
inline void dot_block(int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C, int64_t ldc,
                      bool acc) {
  __m512 s[MM][NB];
  KS_UNROLL
  for (int m = 0; m < MM; ++m)
    KS_UNROLL
    for (int j = 0; j < NB; ++j) s[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 b[NB];
    KS_UNROLL
    for (int j = 0; j < NB; ++j) b[j] = _mm512_loadu_ps(Bt + j * ldbt + k);
    KS_UNROLL
    for (int m = 0; m < MM; ++m) {
      const __m512 a = _mm512_loadu_ps(A + m * lda + k);
      KS_UNROLL
      for (int j = 0; j < NB; ++j) s[m][j] = _mm512_fmadd_ps(a, b[j], s[m][j]);
    }
  }
  if (k < K) {
    const __mmask16 mk = tail_mask(K - k);
    __m512 b[NB];
    KS_UNROLL
    for (int j = 0; j < NB; ++j) b[j] = _mm512_maskz_loadu_ps(mk, Bt + j * ldbt + k);
    KS_UNROLL
    for (int m = 0; m < MM; ++m) {
      const __m512 a = _mm512_maskz_loadu_ps(mk, A + m * lda + k);
      KS_UNROLL
      for (int j = 0; j < NB; ++j) s[m][j] = _mm512_fmadd_ps(a, b[j], s[m][j]);
    }
  }
  KS_UNROLL
  for (int m = 0; m < MM; ++m)
    KS_UNROLL
    for (int j = 0; j < NB; ++j) {
      const float r = _mm512_reduce_add_ps(s[m][j]);
      C[m * ldc + j] = acc ? C[m * ldc + j] + r : r;
    }
}

template <int MM>
void dot_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C, int64_t ldc,
              bool acc) {
  constexpr int64_t NB = MM == 1 ? 8 : 4;
  int64_t n = 0;
  for (; n + NB <= N; n += NB) dot_block<MM, NB>(K, A, lda, Bt + n * ldbt, ldbt, C + n, ldc, acc);
  for (; n < N; ++n) dot_block<MM, 1>(K, A, lda, Bt + n * ldbt, ldbt, C + n, ldc, acc);
}

void dot_nt_small(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C,
                  int64_t ldc, bool acc) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* a = A + m0 * lda;
    float* c = C + m0 * ldc;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: dot_rows<1>(N, K, a, lda, Bt, ldbt, c, ldc, acc); break;
      case 2: dot_rows<2>(N, K, a, lda, Bt, ldbt, c, ldc, acc); break;
      case 3: dot_rows<3>(N, K, a, lda, Bt, ldbt, c, ldc, acc); break;
      default: dot_rows<4>(N, K, a, lda, Bt, ldbt, c, ldc, acc);
    }
  }
}

// One tile of up to 16 x 16: dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
inline void transpose16(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  // rows (j) x cols (k) of src -> cols x rows of dst; partial tiles through masked loads/stores.
  __m512 r[16];
  const __mmask16 mc = tail_mask(cols);
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(mc, src + i * lds) : _mm512_setzero_ps();
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 8] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 4], 0x88);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 8], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 8], t[i + 12], 0xDD);
  }
  // r[k] now holds column k of the tile.
  const __mmask16 mr = tail_mask(rows);
  for (int k = 0; k < cols; ++k) _mm512_mask_storeu_ps(dst + k * ldd, mr, r[k]);
}

void transpose_any(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 16)
      transpose16(src + r * lds + c, lds, std::min<int64_t>(16, rows - r), std::min<int64_t>(16, cols - c),
                  dst + c * ldd + r, ldd);
}

}  // namespace sgemm_detail
void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  sgemm_detail::transpose_any(rows, cols, src, lds, dst, ldd);
}
using sgemm_detail::dot_nt_small;
using sgemm_detail::micro;
}  // namespace avx512
}  // namespace cpu
}  // namespace kernswap

#include "cpu/sgemm_driver.h"
