// Weight-only quantized linear (int8 per-channel, int4 group-wise) in fp32 FMA for AVX2 + FMA machines: the tier's
// dequantization and 6 x 16 micro-kernel (12 ymm accumulators) for the shared driver (qlinear_fma_driver.h, which
// says why and how).
//
// Tile layouts (python/kernswap/formats): 16-row tiles. int8: k-quad q is 64 bytes, byte q*64 + nn*4 + kk =
// row nn, k 4q+kk. int4: k-octet o is 64 bytes, byte o*64 + nn*4 + j = row nn, k 8o+j (low nibble) and 8o+4+j
// (high nibble). One 32-byte load is 8 rows x 4 k; vpshufb + vpermd regroup it into four 8-byte chunks, one per
// k, each holding rows 0..7, which vpmovsx/zxbd + vcvtdq2ps turn into one fp32 vector of 8 rows.
#define KS_ISA_NS avx2
#include <immintrin.h>

#include "cpu/qlinear_fma_driver.h"

namespace kernswap {
namespace cpu {
namespace avx2 {
namespace {

constexpr int kPrefetch = 2048;  // software prefetch distance on the packed tile stream (see qlinear_kernel_avx2.h)

// 32 bytes = 8 rows x 4 k (row-major, 4 bytes per row in each 128-bit lane) -> 64-bit chunk i = k i, rows 0..7.
inline __m256i regroup(__m256i v) {
  const __m256i by_k = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,  //
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i rows = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  return _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, by_k), rows);
}

// The four k of a regrouped vector as 8-row int32 vectors (signed for int8, unsigned nibbles for int4).
template <bool SIGNED>
inline void widen4(__m256i v, __m256i out[4]) {
  const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
  const __m128i src[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
  for (int i = 0; i < 4; ++i) out[i] = SIGNED ? _mm256_cvtepi8_epi32(src[i]) : _mm256_cvtepu8_epi32(src[i]);
}

// Tile t, k in [k0, k1) (k0, k1 multiples of 4, k1 <= kpad) -> buf[(k - k0) * ldb + row], fp32, q * scale.
// The dequantization is not inlined into the driver's task: its loop-invariant vectors (scales, masks) would then stay
// live across the micro-kernel's loop too and push two of its 12 accumulators to the stack every k step (GCC 12:
// 1.35x slower at M = 16-64).
__attribute__((noinline)) void dequant_chunk8(const QLinearArgs& a, const FmaGeo& g, int64_t t, int64_t k0, int64_t k1, float* buf,
                           int64_t ldb) {
  const uint8_t* tile = a.packed + t * g.tile_bytes;
  const __m256 sc[2] = {_mm256_loadu_ps(a.scale + t * 16), _mm256_loadu_ps(a.scale + t * 16 + 8)};
  for (int64_t k = k0; k < k1; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(tile + k * 16 + kPrefetch), _MM_HINT_T0);
    float* o = buf + (k - k0) * ldb;
    for (int h = 0; h < 2; ++h) {
      __m256i w[4];
      widen4<true>(regroup(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + k * 16 + 32 * h))), w);
      for (int i = 0; i < 4; ++i) _mm256_store_ps(o + ldb * i + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(w[i]), sc[h]));
    }
  }
}

// Tile t, k in [k0, k1) (multiples of 8) -> buf, fp32, (q - zero) * scale with the group's zero and scale.
__attribute__((noinline)) void dequant_chunk4(const QLinearArgs& a, const FmaGeo& g, int64_t t, int64_t k0, int64_t k1, float* buf,
                           int64_t ldb) {
  const uint8_t* tile = a.packed + t * g.tile_bytes;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t gs = a.group_size;
  __m256 sc[2], zp[2];
  for (int64_t k = k0; k < k1; k += 8) {
    if (k == k0 || k % gs == 0) {  // a new group: its 16 scales and zero-points
      const int64_t i = (k / gs) * g.Np + t * 16;
      for (int h = 0; h < 2; ++h) {
        sc[h] = _mm256_loadu_ps(a.scale + i + 8 * h);
        zp[h] = a.zero     ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zero + i + 8 * h))))
                : a.zero_f ? _mm256_loadu_ps(a.zero_f + i + 8 * h)
                           : _mm256_set1_ps(8.f);
      }
    }
    _mm_prefetch(reinterpret_cast<const char*>(tile + k * 8 + kPrefetch), _MM_HINT_T0);
    float* o = buf + (k - k0) * ldb;
    for (int h = 0; h < 2; ++h) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + k * 8 + 32 * h));
      const __m256i nib[2] = {_mm256_and_si256(raw, low4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)};
      for (int half = 0; half < 2; ++half) {  // low nibbles: k .. k+3; high nibbles: k+4 .. k+7
        __m256i w[4];
        widen4<false>(regroup(nib[half]), w);
        for (int i = 0; i < 4; ++i) {
          const __m256 v = _mm256_sub_ps(_mm256_cvtepi32_ps(w[i]), zp[h]);
          _mm256_store_ps(o + ldb * (4 * half + i) + 8 * h, _mm256_mul_ps(v, sc[h]));
        }
      }
    }
  }
}

// o[m][0..15] (+)= sum_{k < kc} x[m][k] * buf[k][0..15] for MR rows; `first` starts from zero.
template <int MR>
inline void micro_kernel(const float* x, int64_t ldx, int64_t kc, const float* buf, float* o, bool first) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = first ? _mm256_setzero_ps() : _mm256_load_ps(o + 16 * m);
    acc[m][1] = first ? _mm256_setzero_ps() : _mm256_load_ps(o + 16 * m + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(buf + 16 * k), w1 = _mm256_load_ps(buf + 16 * k + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      acc[m][0] = _mm256_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xb, w1, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_store_ps(o + 16 * m, acc[m][0]);
    _mm256_store_ps(o + 16 * m + 8, acc[m][1]);
  }
}

inline void run_rows(int rows, const float* x, int64_t ldx, int64_t kc, const float* buf, float* o, bool first) {
  switch (rows) {
    case 6: return micro_kernel<6>(x, ldx, kc, buf, o, first);
    case 5: return micro_kernel<5>(x, ldx, kc, buf, o, first);
    case 4: return micro_kernel<4>(x, ldx, kc, buf, o, first);
    case 3: return micro_kernel<3>(x, ldx, kc, buf, o, first);
    case 2: return micro_kernel<2>(x, ldx, kc, buf, o, first);
    default: return micro_kernel<1>(x, ldx, kc, buf, o, first);
  }
}

}  // namespace

struct FmaTier {
  static constexpr int kMR = 6;  // activation rows per micro-kernel: 6 x 2 accumulators + 2 weights + 1 broadcast
  static constexpr int kNT = 1;
  static void dequant8(const QLinearArgs& a, const FmaGeo& g, int64_t t, int64_t k0, int64_t k1, float* buf,
                       int64_t ldb) {
    dequant_chunk8(a, g, t, k0, k1, buf, ldb);
  }
  static void dequant4(const QLinearArgs& a, const FmaGeo& g, int64_t t, int64_t k0, int64_t k1, float* buf,
                       int64_t ldb) {
    dequant_chunk4(a, g, t, k0, k1, buf, ldb);
  }
  static void rows(int rows, int, const float* x, int64_t ldx, int64_t kc, const float* buf, int64_t, float* o,
                   int64_t, bool first) {
    run_rows(rows, x, ldx, kc, buf, o, first);  // one tile: ldb = ldo = 16
  }
};

void qlinear_fma(const QLinearArgs& a) { FmaDriver<FmaTier>::run(a); }

}  // namespace avx2
}  // namespace cpu
}  // namespace kernswap
