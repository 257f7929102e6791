// AVX2 + FMA SwiGLU for the MoE experts: out = silu(g) * u = g / (1 + exp(-g)) * u, 8 lanes per step.
// exp: x clamped to [-110, 100], n = round(x log2 e), r = x - n ln 2 (two-part constant), degree-7 Taylor
// polynomial on |r| <= ln2/2 (the AVX-512 build's), then scaled by 2^n. AVX2 has no vscalefps: 2^n is applied
// as two exponent-bit factors 2^(n >> 1) * 2^(n - (n >> 1)), each a normal number for |n| <= 252, so
// overflow to inf and gradual underflow to 0 come out of the multiplications with one rounding, as with scalef.
#include <immintrin.h>

#include "cpu/moe.h"

namespace kernswap {
namespace cpu {
namespace avx2 {
namespace {

inline __m256 pow2i(__m256i n) {  // 2^n for -126 <= n <= 127, through the exponent bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}

inline __m256 exp_ps(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(100.f)), _mm256_set1_ps(-110.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2i(half)), pow2i(_mm256_sub_epi32(ni, half)));
}

inline __m256 swiglu8(__m256 g, __m256 u) {
  const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

// First n (1..7) lanes of a ymm: a window into {-1 x 8, 0 x 8}.
alignas(32) const int32_t kMaskWindow[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

}  // namespace

void moe_swiglu(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, swiglu8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskWindow + 8 - (n - i)));
    _mm256_maskstore_ps(out + i, m, swiglu8(_mm256_maskload_ps(g + i, m), _mm256_maskload_ps(u + i, m)));
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace kernswap
