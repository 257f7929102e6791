// fp32 -> bf16 for AVX-512 kernels with AVX512F/BW only (no AVX512_BF16, so Skylake-X and Cascade Lake run
// them): the same round-to-nearest-even as f32_to_bf16 in half.h, lane by lane, with integer arithmetic; NaN
// becomes a quiet NaN. (vcvtneps2bf16 would also flush subnormals; this keeps them, like the scalar tier.)
// Include only from *_avx512*.cpp files (compiled with AVX-512 flags, for x86 targets only).
#pragma once
#include <immintrin.h>

namespace kernswap {
namespace cpu {

inline __m256i cvt_f32_bf16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_mask_blend_epi32(nan, rounded, quiet), 16));
}

}  // namespace cpu
}  // namespace kernswap
