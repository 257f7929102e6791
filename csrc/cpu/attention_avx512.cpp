// AVX-512 build of the block-sparse attention (driver: attention_driver.h): vectorised dtype conversions, the
// causal/visibility masking and the online-softmax update with a polynomial base-2 exponential, 16 query
// columns per vector.
#define KS_ISA_NS avx512
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/attention.h"
#include "cpu/bf16_avx512.h"

namespace kernswap {
namespace cpu {
namespace avx512 {
namespace attn_detail {

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u)); }

inline __m512 load_f32(const void* src, DType t, int64_t i, __mmask16 mk) {
  switch (t) {
    case DType::F32: return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(src) + i);
    case DType::BF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(src) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(src) + i));
  }
}

inline void to_f32(const void* src, DType t, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, mk, load_f32(src, t, i, mk));
  }
}

inline void from_f32(const float* src, float mul, DType t, int64_t n, void* dst) {
  const __m512 s = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, src + i), s);
    switch (t) {
      case DType::F32: _mm512_mask_storeu_ps(static_cast<float*>(dst) + i, mk, v); break;
      case DType::BF16:
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + i, mk, cvt_f32_bf16_avx512(v));
        break;
      default:
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + i, mk,
                                 _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// 2^x for x <= 0: x = n + f with |f| <= 1/2, 2^f by a degree-6 polynomial, then vscalefps by n. Lanes with
// x < -125 (and -inf, NaN) give exactly 0 through the zero-masked scalef, so no result is ever subnormal
// (subnormal results cost microcode assists) and no clamp is needed.
inline __m512 exp2_neg(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

inline void apply_limits(float* st, int64_t ld, int64_t nk, int64_t ncols, const int32_t* lim) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  for (int64_t c = 0; c < ncols; c += 16) {  // ncols is a multiple of 16
    const __m512i lv = _mm512_loadu_si512(lim + c);
    for (int64_t r = 0; r < nk; ++r) {
      const __mmask16 hide = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(r)), lv);
      float* p = st + r * ld + c;
      _mm512_storeu_ps(p, _mm512_mask_blend_ps(hide, _mm512_loadu_ps(p), ninf));
    }
  }
}

// Columns in groups of up to 4 vectors (ncols is a multiple of 16: the driver pads its column buffers); each
// row of the group is read twice (max, then exp and sum). Unmasked accesses only: the rows were just stored by
// the GEMM, and masked stores/loads would not forward.
template <int NV>
inline void softmax_cols(float* st, int64_t ld, int64_t nk, int64_t c0, float* m, float* l, float* alpha) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 mo[NV], mx[NV], mu[NV], sum[NV];
  for (int v = 0; v < NV; ++v) {
    mo[v] = _mm512_loadu_ps(m + c0 + 16 * v);
    mx[v] = mo[v];
    sum[v] = _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < nk; ++r) {
    const float* row = st + r * ld + c0;
    for (int v = 0; v < NV; ++v) mx[v] = _mm512_max_ps(mx[v], _mm512_loadu_ps(row + 16 * v));
  }
  for (int v = 0; v < NV; ++v) {
    // mu = mx, or 0 where mx = -inf (nothing visible yet: every term then is 2^-inf = 0)
    mu[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx[v], ninf, _CMP_EQ_OQ), mx[v], _mm512_setzero_ps());
  }
  for (int64_t r = 0; r < nk; ++r) {
    float* row = st + r * ld + c0;
    for (int v = 0; v < NV; ++v) {
      const __m512 e = exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(row + 16 * v), mu[v]));
      sum[v] = _mm512_add_ps(sum[v], e);
      _mm512_storeu_ps(row + 16 * v, e);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = c0 + 16 * v;
    const __m512 a = exp2_neg(_mm512_sub_ps(mo[v], mu[v]));
    _mm512_storeu_ps(alpha + c, a);
    _mm512_storeu_ps(l + c, _mm512_fmadd_ps(_mm512_loadu_ps(l + c), a, sum[v]));
    _mm512_storeu_ps(m + c, mx[v]);
  }
}

inline void softmax_update(float* st, int64_t ld, int64_t nk, int64_t ncols, float* m, float* l, float* alpha) {
  for (int64_t c0 = 0; c0 < ncols; c0 += 64) {
    switch (std::min<int64_t>(4, (ncols - c0 + 15) / 16)) {
      case 1: softmax_cols<1>(st, ld, nk, c0, m, l, alpha); break;
      case 2: softmax_cols<2>(st, ld, nk, c0, m, l, alpha); break;
      case 3: softmax_cols<3>(st, ld, nk, c0, m, l, alpha); break;
      default: softmax_cols<4>(st, ld, nk, c0, m, l, alpha);
    }
  }
}

}  // namespace attn_detail
}  // namespace avx512
}  // namespace cpu
}  // namespace kernswap

#include "cpu/attention_driver.h"
