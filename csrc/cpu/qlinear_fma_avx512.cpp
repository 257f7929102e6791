// Weight-only quantized linear (int8 per-channel, int4 group-wise) in fp32 FMA for AVX-512 machines: the tier's
// dequantization and 6 x 64 micro-kernel (24 zmm accumulators over four 16-row tiles: per k, four weight loads and
// six activation broadcasts feed 24 FMAs, so the FMA units, not the loads, set the pace) for the shared driver (qlinear_fma_driver.h, which says why and how).
// The avx512 tier (Skylake-SP) routes weight-only calls to it from a few rows on, the avx512_vnni tier from more
// (its vpdpbusd engine stays faster below); qlinear_avx512.cpp / qlinear_avx512vnni.cpp give the row counts.
//
// Tile layouts (python/kernswap/formats): 16-row tiles. int8: k-quad q is 64 bytes, byte q*64 + nn*4 + kk = row nn,
// k 4q+kk: one 64-byte load holds, in 32-bit lane nn, row nn's four k, so shifting each lane left then
// arithmetically right by 24 bits sign-extends one k of all 16 rows. int4: k-octet o is 64 bytes, byte
// o*64 + nn*4 + j = row nn, k 8o+j (low nibble) and 8o+4+j (high nibble): lane nn shifted right by 8j (+4) and
// masked to 4 bits is k 8o+j (8o+4+j) of all 16 rows.
#define KS_ISA_NS avx512
#include <immintrin.h>

#include "cpu/qlinear_fma_driver.h"

namespace kernswap {
namespace cpu {
namespace avx512 {
namespace {

constexpr int kPrefetch = 2048;  // software prefetch distance on the packed tile stream

// Tile t, k in [k0, k1) (k0, k1 multiples of 4, k1 <= kpad) -> buf[(k - k0) * ldb + row], fp32, q * scale. Not
// inlined, as in qlinear_fma_avx2.cpp: its invariant vectors must not hold registers the micro-kernel needs.
__attribute__((noinline)) void dequant_chunk8(const QLinearArgs& a, const FmaGeo& g, int64_t t, int64_t k0, int64_t k1, float* buf,
                           int64_t ldb) {
  const uint8_t* tile = a.packed + t * g.tile_bytes;
  const __m512 sc = _mm512_loadu_ps(a.scale + t * 16);
  for (int64_t k = k0; k < k1; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(tile + k * 16 + kPrefetch), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(tile + k * 16);
    float* o = buf + (k - k0) * ldb;
    _mm512_store_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), sc));
    _mm512_store_ps(o + ldb, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), sc));
    _mm512_store_ps(o + 2 * ldb, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), sc));
    _mm512_store_ps(o + 3 * ldb, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), sc));
  }
}

// Tile t, k in [k0, k1) (multiples of 8) -> buf, fp32, (q - zero) * scale with the group's zero and scale.
__attribute__((noinline)) void dequant_chunk4(const QLinearArgs& a, const FmaGeo& g, int64_t t, int64_t k0, int64_t k1, float* buf,
                           int64_t ldb) {
  const uint8_t* tile = a.packed + t * g.tile_bytes;
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  const int64_t gs = a.group_size;
  __m512 sc = _mm512_setzero_ps(), zp = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 8) {
    if (k == k0 || k % gs == 0) {  // a new group: its 16 scales and zero-points
      const int64_t i = (k / gs) * g.Np + t * 16;
      sc = _mm512_loadu_ps(a.scale + i);
      zp = a.zero     ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zero + i))))
           : a.zero_f ? _mm512_loadu_ps(a.zero_f + i)
                      : _mm512_set1_ps(8.f);
    }
    _mm_prefetch(reinterpret_cast<const char*>(tile + k * 8 + kPrefetch), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(tile + k * 8);
    float* o = buf + (k - k0) * ldb;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {  // j < 4: low nibbles, k + j; j >= 4: high nibbles, k + j
      const int shift = 8 * (j & 3) + 4 * (j >> 2);
      const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, shift), low4);
      _mm512_store_ps(o + ldb * j, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), zp), sc));
    }
  }
}

// o[m * ldo + c] (+)= sum_{k < kc} x[m * ldx + k] * buf[k * ldb + c], m < MR, c < 16 NT; `first` starts from zero.
template <int MR, int NT>
inline void micro_kernel(const float* x, int64_t ldx, int64_t kc, const float* buf, int64_t ldb, float* o, int64_t ldo,
                         bool first) {
  __m512 acc[MR][NT];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) acc[m][j] = first ? _mm512_setzero_ps() : _mm512_load_ps(o + m * ldo + 16 * j);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 w[NT];
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) w[j] = _mm512_load_ps(buf + k * ldb + 16 * j);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_fmadd_ps(xb, w[j], acc[m][j]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) _mm512_store_ps(o + m * ldo + 16 * j, acc[m][j]);
}

// The instantiation for `rows` (<= MR) rows and `nt` (<= NT) tiles.
template <int MR, int NT>
inline void run_rows(int rows, int nt, const float* x, int64_t ldx, int64_t kc, const float* buf, int64_t ldb, float* o,
                     int64_t ldo, bool first) {
  if constexpr (MR > 1) {
    if (rows < MR) return run_rows<MR - 1, NT>(rows, nt, x, ldx, kc, buf, ldb, o, ldo, first);
  }
  if constexpr (NT > 1) {
    if (nt < NT) return run_rows<MR, NT - 1>(rows, nt, x, ldx, kc, buf, ldb, o, ldo, first);
  }
  micro_kernel<MR, NT>(x, ldx, kc, buf, ldb, o, ldo, first);
}

}  // namespace

struct FmaTier {
  static constexpr int kMR = 6, kNT = 4;  // 24 zmm accumulators, 4 weight vectors, 1 broadcast
  static constexpr auto dequant8 = dequant_chunk8;
  static constexpr auto dequant4 = dequant_chunk4;
  static constexpr auto rows = run_rows<kMR, kNT>;
};

void qlinear_fma(const QLinearArgs& a) { FmaDriver<FmaTier>::run(a); }

}  // namespace avx512
}  // namespace cpu
}  // namespace kernswap
