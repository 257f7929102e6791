// AVX2 + FMA build of the block-sparse attention (driver: attention_driver.h; compiled with -mavx2 -mfma
// -mf16c): vectorised dtype conversions (bf16 by shifting the bits, fp16 through F16C), the causal/visibility
// masking and the online-softmax update with the same base-2 exponential polynomial as the other builds,
// 8 query columns per ymm vector. The GEMMs are the AVX2 fp32 GEMM's (sgemm_avx2.cpp).
#define KS_ISA_NS avx2
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/attention.h"
#include "cpu/half.h"

namespace kernswap {
namespace cpu {
namespace avx2 {
namespace attn_detail {

// The tails (< 8 elements) of a row use the scalar conversions of cpu/half.h.
inline void to_f32(const void* src, DType t, int64_t n, float* dst) {
  int64_t i = 0;
  switch (t) {
    case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + 8 <= n; i += 8) {  // bf16 is the top half of an fp32: widen and shift left by 16
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      }
      for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      const _Float16* h = static_cast<const _Float16*>(src);
      for (; i < n; ++i) dst[i] = static_cast<float>(h[i]);
    }
  }
}

// 8 fp32 to bf16 with round-to-nearest-even (NaN stays a quiet NaN), as the scalar f32_to_bf16.
inline __m128i cvt_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);  // 8 x 16-bit values in 32-bit lanes
  // packus works within 128-bit halves: pack, then gather the two low quadwords
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(packed);
}

inline void from_f32(const float* src, float mul, DType t, int64_t n, void* dst) {
  const __m256 s = _mm256_set1_ps(mul);
  int64_t i = 0;
  switch (t) {
    case DType::F32: {
      float* d = static_cast<float*>(dst);
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), s));
      for (; i < n; ++i) d[i] = src[i] * mul;
      return;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), cvt_bf16(_mm256_mul_ps(_mm256_loadu_ps(src + i), s)));
      for (; i < n; ++i) d[i] = f32_to_bf16(src[i] * mul);
      return;
    }
    default: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                         _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), s), _MM_FROUND_TO_NEAREST_INT));
      _Float16* h = static_cast<_Float16*>(dst);
      for (; i < n; ++i) h[i] = static_cast<_Float16>(src[i] * mul);
    }
  }
}

// 2^x for x <= 0: x = n + f with |f| <= 1/2 (n rounded to nearest), 2^f by the degree-6 polynomial of the
// other builds, 2^n built in the exponent bits ((n + 127) << 23). Lanes with x < -125 (and -inf, NaN) are
// cleared to exactly 0 by the compare mask, so no result is ever subnormal; n is clamped first so that the
// integer conversion of those lanes is harmless.
inline __m256 exp2_neg(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-125.f), _CMP_GE_OQ);
  const __m256 n = _mm256_round_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

inline void apply_limits(float* st, int64_t ld, int64_t nk, int64_t ncols, const int32_t* lim) {
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  for (int64_t c = 0; c < ncols; c += 8) {  // ncols is a multiple of 16
    const __m256i lv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lim + c));
    for (int64_t r = 0; r < nk; ++r) {
      const __m256 hide = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(r)), lv));
      float* p = st + r * ld + c;
      _mm256_storeu_ps(p, _mm256_blendv_ps(_mm256_loadu_ps(p), ninf, hide));
    }
  }
}

// Columns in groups of NV vectors of 8 (ncols is a multiple of 16: the driver pads its column buffers); each
// row of the group is read twice (max, then exp and sum), still in L1 from the GEMM that wrote it.
template <int NV>
inline void softmax_cols(float* st, int64_t ld, int64_t nk, int64_t c0, float* m, float* l, float* alpha) {
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  __m256 mx[NV], mu[NV], sum[NV];
  for (int v = 0; v < NV; ++v) {
    mx[v] = _mm256_loadu_ps(m + c0 + 8 * v);
    sum[v] = _mm256_setzero_ps();
  }
  for (int64_t r = 0; r < nk; ++r) {
    const float* row = st + r * ld + c0;
    for (int v = 0; v < NV; ++v) mx[v] = _mm256_max_ps(mx[v], _mm256_loadu_ps(row + 8 * v));
  }
  for (int v = 0; v < NV; ++v)  // mu = mx, or 0 where mx = -inf (nothing visible yet: every term is 2^-inf = 0)
    mu[v] = _mm256_andnot_ps(_mm256_cmp_ps(mx[v], ninf, _CMP_EQ_OQ), mx[v]);
  for (int64_t r = 0; r < nk; ++r) {
    float* row = st + r * ld + c0;
    for (int v = 0; v < NV; ++v) {
      const __m256 e = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(row + 8 * v), mu[v]));
      sum[v] = _mm256_add_ps(sum[v], e);
      _mm256_storeu_ps(row + 8 * v, e);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = c0 + 8 * v;
    const __m256 a = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(m + c), mu[v]));
    _mm256_storeu_ps(alpha + c, a);
    _mm256_storeu_ps(l + c, _mm256_fmadd_ps(_mm256_loadu_ps(l + c), a, sum[v]));
    _mm256_storeu_ps(m + c, mx[v]);
  }
}

inline void softmax_update(float* st, int64_t ld, int64_t nk, int64_t ncols, float* m, float* l, float* alpha) {
  int64_t c0 = 0;
  for (; c0 + 32 <= ncols; c0 += 32) softmax_cols<4>(st, ld, nk, c0, m, l, alpha);
  if (c0 < ncols) softmax_cols<2>(st, ld, nk, c0, m, l, alpha);  // 16 columns left
}

}  // namespace attn_detail
}  // namespace avx2
}  // namespace cpu
}  // namespace kernswap

#include "cpu/attention_driver.h"
