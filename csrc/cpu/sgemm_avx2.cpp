// AVX2 + FMA build of the fp32 GEMM (sgemm.h; compiled with -mavx2 -mfma -mf16c).
//
// Micro-kernel: 16 ymm registers hold at most 6 rows x 16 columns of C (12 accumulators), the B row of the
// slice (2 ymm) and one broadcast A element, the classic Haswell-era register block (BLIS, oneDNN use the same
// shape). Per k step: 2 B loads and MR broadcasts (broadcast-from-memory is a load, no shuffle port) feed
// 2 * MR FMAs, so with two FMA pipes the loads never limit. The driver's 64-column panel is run as four
// 16-column slices, each over the whole k range (the slice of B, kc x 16 floats, stays in L1; the MR A rows are
// re-read from L1 per slice). The last slice is 8 or 16 wide with masked loads/stores (vmaskmov) when the panel
// width is not a multiple of 8.
// sgemm_nt with M <= 4: dot products along k straight on the Bt rows, MM rows x NB columns of 8-lane partial
// sums, reduced at the end. transpose: 8 x 8 tiles through unpack / shuffle / permute2f128.
#define KS_ISA_NS avx2
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace kernswap {
namespace cpu {
namespace avx2 {
namespace sgemm_detail {

#define KS_UNROLL _Pragma("GCC unroll 16")

// Lane mask for the first n (0..8) lanes of a ymm: a window into {-1 x 8, 0 x 8}.
alignas(32) static const int32_t kMaskWindow[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline __m256i lane_mask(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskWindow + 8 - std::min<int64_t>(8, n)));
}

// Vector v of a slice: the last one is masked when kMask (a partial 8-lane vector).
template <int NV, bool kMask>
inline __m256 load_v(int v, const float* p, __m256i last) {
  return (kMask && v == NV - 1) ? _mm256_maskload_ps(p, last) : _mm256_loadu_ps(p);
}
template <int NV, bool kMask>
inline void store_v(int v, float* p, __m256i last, __m256 x) {
  if (kMask && v == NV - 1)
    _mm256_maskstore_ps(p, last, x);
  else
    _mm256_storeu_ps(p, x);
}

// C[MR x 8*NV] (last vector masked when kMask) = (acc ? C * cs : 0) + A[MR x K] * B[K x 8*NV].
template <int MR, int NV, bool kMask>
inline void slice(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb, float* C,
                  int64_t ldc, __m256i last, bool acc, const float* cs) {
  __m256 c[MR][NV];
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int v = 0; v < NV; ++v) c[m][v] = _mm256_setzero_ps();
  const float* a[MR];
  KS_UNROLL
  for (int m = 0; m < MR; ++m) a[m] = A + m * a_rs;
  int64_t ak = 0;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
    KS_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = load_v<NV, kMask>(v, B + 8 * v, last);
    KS_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_broadcast_ss(a[m] + ak);
      KS_UNROLL
      for (int v = 0; v < NV; ++v) c[m][v] = _mm256_fmadd_ps(av, b[v], c[m][v]);
    }
    B += ldb;
    ak += a_cs;
  }
  if (acc) {
    __m256 s[NV];
    if (cs) {
      KS_UNROLL
      for (int v = 0; v < NV; ++v) s[v] = load_v<NV, kMask>(v, cs + 8 * v, last);
    }
    KS_UNROLL
    for (int m = 0; m < MR; ++m)
      KS_UNROLL
      for (int v = 0; v < NV; ++v) {
        const __m256 old = load_v<NV, kMask>(v, C + m * ldc + 8 * v, last);
        c[m][v] = cs ? _mm256_fmadd_ps(old, s[v], c[m][v]) : _mm256_add_ps(old, c[m][v]);
      }
  }
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int v = 0; v < NV; ++v) store_v<NV, kMask>(v, C + m * ldc + 8 * v, last, c[m][v]);
}

template <int MR>
void micro(int64_t nc, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb, float* C,
           int64_t ldc, bool acc, const float* cs) {
  const __m256i all = lane_mask(8);
  int64_t j = 0;
  for (; j + 16 <= nc; j += 16)
    slice<MR, 2, false>(K, A, a_rs, a_cs, B + j, ldb, C + j, ldc, all, acc, cs ? cs + j : nullptr);
  const int64_t w = nc - j;  // 0..15 columns left
  if (w == 0) return;
  const __m256i last = lane_mask(w - (w - 1) / 8 * 8);
  const float* s = cs ? cs + j : nullptr;
  if (w == 8) return slice<MR, 1, false>(K, A, a_rs, a_cs, B + j, ldb, C + j, ldc, all, acc, s);
  if (w < 8) return slice<MR, 1, true>(K, A, a_rs, a_cs, B + j, ldb, C + j, ldc, last, acc, s);
  slice<MR, 2, true>(K, A, a_rs, a_cs, B + j, ldb, C + j, ldc, last, acc, s);
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// MM rows x NB columns of C as dot products along k (rows of A against rows of Bt), 8 lanes of partial sums each.
template <int MM, int NB>
inline void dot_block(int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C, int64_t ldc,
                      bool acc) {
  __m256 s[MM][NB];
  KS_UNROLL
  for (int m = 0; m < MM; ++m)
    KS_UNROLL
    for (int j = 0; j < NB; ++j) s[m][j] = _mm256_setzero_ps();
  auto step = [&](int64_t k, bool masked, __m256i mk) {
    __m256 a[MM];
    KS_UNROLL
    for (int m = 0; m < MM; ++m) a[m] = masked ? _mm256_maskload_ps(A + m * lda + k, mk) : _mm256_loadu_ps(A + m * lda + k);
    KS_UNROLL
    for (int j = 0; j < NB; ++j) {
      const float* b = Bt + j * ldbt + k;
      const __m256 bv = masked ? _mm256_maskload_ps(b, mk) : _mm256_loadu_ps(b);
      KS_UNROLL
      for (int m = 0; m < MM; ++m) s[m][j] = _mm256_fmadd_ps(a[m], bv, s[m][j]);
    }
  };
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) step(k, false, lane_mask(8));
  if (k < K) step(k, true, lane_mask(K - k));
  KS_UNROLL
  for (int m = 0; m < MM; ++m)
    KS_UNROLL
    for (int j = 0; j < NB; ++j) {
      const float r = hsum(s[m][j]);
      C[m * ldc + j] = acc ? C[m * ldc + j] + r : r;
    }
}

template <int MM>
void dot_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C, int64_t ldc,
              bool acc) {
  // accumulators + A vectors stay within the 16 ymm registers: 1x8, 2x4, 3x3, 4x2
  constexpr int64_t NB = MM == 1 ? 8 : MM == 2 ? 4 : MM == 3 ? 3 : 2;
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

// One tile of up to 8 x 8: dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols. Full tiles use plain
// loads/stores; partial ones masked loads (columns) and stores (rows), missing rows read as zero.
template <bool kFull>
inline void transpose8(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  const __m256i mc = lane_mask(cols);
  KS_UNROLL
  for (int i = 0; i < 8; ++i)
    r[i] = kFull ? _mm256_loadu_ps(src + i * lds) : (i < rows ? _mm256_maskload_ps(src + i * lds, mc) : _mm256_setzero_ps());
  KS_UNROLL
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs: (r0 c0, r1 c0, r0 c1, r1 c1 | same for c4..c5) ...
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  KS_UNROLL
  for (int i = 0; i < 8; i += 4) {  // 4 rows of each column within each 128-bit half
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  KS_UNROLL
  for (int i = 0; i < 4; ++i) {  // join the halves of rows 0-3 and 4-7: column i and column i + 4
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  if (kFull) {
    KS_UNROLL
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + k * ldd, t[k]);
  } else {
    const __m256i mr = lane_mask(rows);
    for (int k = 0; k < cols; ++k) _mm256_maskstore_ps(dst + k * ldd, mr, t[k]);
  }
}

void transpose_any(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; r += 8) {
    const int64_t nr = std::min<int64_t>(8, rows - r);
    for (int64_t c = 0; c < cols; c += 8) {
      const int64_t nc = std::min<int64_t>(8, cols - c);
      if (nr == 8 && nc == 8)
        transpose8<true>(src + r * lds + c, lds, 8, 8, dst + c * ldd + r, ldd);
      else
        transpose8<false>(src + r * lds + c, lds, nr, nc, dst + c * ldd + r, ldd);
    }
  }
}

}  // namespace sgemm_detail
void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  sgemm_detail::transpose_any(rows, cols, src, lds, dst, ldd);
}
using sgemm_detail::dot_nt_small;
using sgemm_detail::micro;
}  // namespace avx2
}  // namespace cpu
}  // namespace kernswap

#include "cpu/sgemm_driver.h"
