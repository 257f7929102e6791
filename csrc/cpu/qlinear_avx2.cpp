// Tier avx2 (AVX2 + FMA + F16C) of the quantized-linear engine: vpmaddubsw + vpmaddwd (qlinear_kernel_avx2.h),
// plus its vectorised qdequant tile.
#define KS_ISA_NS avx2
#define KS_QL_VNNI 0
#include "cpu/qlinear_kernel_avx2.h"
#include "cpu/qlinear_dequant.h"

namespace kernswap {
namespace cpu {
namespace avx2 {

// Dequantization of a 16-row tile (contract in qlinear_dequant.h): each 8-byte chunk of a 64-byte k-block holds
// two rows' bytes (4 k each): widened to 8 int32 lanes, converted, scaled (int4: (q - z) * s, rounded as the format's
// dequantize() does) and stored as 16 bytes (int8) or 32 bytes (int4: low nibbles k..k+3, high nibbles k+4..k+7) per row.
// Full tiles only; partial ones (r0 > 0 or r1 < 16) take the shared plain loop (qlinear_dequant.h).
inline void dequant_tile_avx2(const QDequantArgs& a, int64_t t, int64_t r0, int64_t r1) {
  if (r0 != 0 || r1 != 16 || (a.bits == 8 && a.K % 4 != 0)) return dequant_tile_plain(a, t, r0, r1);
  const int64_t n0 = t * 16, Np = (a.N + 15) / 16 * 16;
  float* out = a.out + (n0 - a.n0) * a.ld;
  if (a.bits == 8) {
    const int8_t* tile = reinterpret_cast<const int8_t*>(a.packed) + t * a.K * 16;
    for (int r = 0; r < 8; ++r) {  // row pairs outermost: each pair writes two contiguous output rows
      const __m256 sc = _mm256_setr_m128(_mm_set1_ps(a.scale[n0 + 2 * r]), _mm_set1_ps(a.scale[n0 + 2 * r + 1]));
      float* o0 = out + (2 * r) * a.ld;
      float* o1 = o0 + a.ld;
      for (int64_t k = 0; k < a.K; k += 4) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tile + k * 16 + 8 * r));
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sc);
        _mm_storeu_ps(o0 + k, _mm256_castps256_ps128(v));
        _mm_storeu_ps(o1 + k, _mm256_extractf128_ps(v, 1));
      }
    }
    return;
  }
  const uint8_t* tile = a.packed + t * a.K * 8;
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  for (int r = 0; r < 8; ++r) {
    float* o0 = out + (2 * r) * a.ld;
    float* o1 = o0 + a.ld;
    for (int64_t g = 0; g < a.K / a.group_size; ++g) {
      const int64_t i = g * Np + n0 + 2 * r;
      const float z0 = zero_of(a, i), z1 = zero_of(a, i + 1);
      const __m256 sc = _mm256_setr_m128(_mm_set1_ps(a.scale[i]), _mm_set1_ps(a.scale[i + 1]));
      const __m256 zs = _mm256_setr_m128(_mm_set1_ps(z0), _mm_set1_ps(z1));
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += 8) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tile + k * 8 + 8 * r)));
        const __m256 lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), zs), sc);
        const __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), zs), sc);
        _mm256_storeu_ps(o0 + k, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(o1 + k, _mm256_permute2f128_ps(lo, hi, 0x31));
      }
    }
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace kernswap

// The weight block of a task (packed bytes that stay cached while its row blocks pass): AVX2 machines have
// 256-512 KiB of L2 per core.
#define KS_QL_BLOCK_BYTES (256 << 10)
#define KS_QL_DEQUANT_TILE dequant_tile_avx2
// Weight-only calls from 8 (int8) / 16 (int4) rows on run the fp32 FMA kernel (qlinear_fma_avx2.cpp): one fp32
// product per weight and activation instead of this engine's three digit products, but a dequantization of every
// weight per row block. Measured (2 threads, 4096 x 4096 and 576 x 576): at M = 2 this engine is 1.3-3x faster
// (the FMA kernel's dequantization dominates), at M = 16 the FMA kernel is 1.7-2.9x faster for int8 and
// 0.8-1.9x for int4 (4096 x 4096 int4-g128 still slightly favours the engine); bench/qlinear_fma_sweep.py.
#define KS_QL_FMA_FROM_ROWS (a.bits == 8 ? 8 : 16)
#include "cpu/qlinear_driver.h"
