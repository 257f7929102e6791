// The 256-bit quantized-linear engine, compiled by two tiers from this one source: the same integer engine as
// the AVX-512 builds (qlinear.h: int8 activation digits, exact int32 sums per segment, one fp32 rescale per
// segment). A micro-kernel runs R digit rows (MR activation rows x NDIG digits each) against one 16-column weight
// tile, as two 8-row halves (one ymm of int32 sums each).
//   avx2 (qlinear_avx2.cpp, KS_QL_VNNI 0), vpmaddubsw + vpmaddwd:
//     int8 weights: signed q with the sign trick, |q| (u8) x a*sign(q) (s8) in vpmaddubsw: every pair sum is at
//                   most 2 * 128 * 127 < 2^15, so nothing saturates; vpmaddwd by ones widens to int32. No
//                   zero-point term (the weights stay signed).
//     int4 weights: nibbles 0..15 (u8) x digits (s8): |pair| <= 2 * 15 * 127, so the two nibble products of a
//                   k-octet are added in int16 before widening; the zero-point is the engine's usual
//                   -zero * sum(a) term at the flush.
//   avx_vnni (qlinear_avxvnni.cpp, KS_QL_VNNI 1; Alder Lake and later clients, Sierra Forest): VEX vpdpbusd, one
//     instruction for the three above: int8 weights as q ^ 0x80 (u8, zero-point 128), int4 nibbles as they are.
// Weight-only formats (three digits per activation) run here for few rows; from KS_QL_FMA_FROM_ROWS on, the
// driver hands them to the fp32 FMA kernel (qlinear_fma_avx2.cpp), and for large M the Python backend
// dequantizes panels of the weight (qdequant) and runs torch's fp32 GEMM.
// Include from a tier's translation unit after defining KS_ISA_NS and KS_QL_VNNI, then include qlinear_driver.h.
#pragma once
#include <immintrin.h>

#include "cpu/qlinear_common.h"

#ifndef KS_QL_VNNI
#error "define KS_QL_VNNI (1: vpdpbusd, 0: vpmaddubsw + vpmaddwd) before including qlinear_kernel_avx2.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {
namespace {

#define KS_UNROLL _Pragma("GCC unroll 16")

// Software prefetch distance along a weight tile's stream (one 64-byte line per k step of the loops below).
#ifndef KS_QL_PREFETCH
#define KS_QL_PREFETCH 4096
#endif
constexpr int kPrefetchBytes = KS_QL_PREFETCH;

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 8 fp32 results (+ bias) to row m, columns n0 .. n0 + 7 (fewer at the right edge), in the output dtype.
inline void store8(const QLinearArgs& a, int64_t m, int64_t n0, __m256 v) {
  const int64_t cnt = std::min<int64_t>(8, a.N - n0);
  if (cnt <= 0) return;
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  store_span(a, m, n0, cnt, tmp);
}

template <int BITS, int NDIG, int MR>
void micro_kernel(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t t) {
  constexpr int R = MR * NDIG;  // digit rows: r = m * NDIG + d
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* wt = a.packed + t * p.tile_bytes;
  const int8_t* ar[R];
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int d = 0; d < NDIG; ++d) ar[m * NDIG + d] = acts.row(p, m0 + m, d);
  const int64_t n0 = t * 16;
  __m256 out[MR][2];
  KS_UNROLL
  for (int m = 0; m < MR; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();

  for (int64_t s = 0; s < p.nseg; ++s) {
    __m256i acc[R][2];
    KS_UNROLL
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int64_t kb = p.seg_begin(s), ke = p.seg_end(s);
    if constexpr (BITS == 8) {
      for (int64_t k = kb; k < ke; k += 4) {
        _mm_prefetch(reinterpret_cast<const char*>(wt + k * 16 + kPrefetchBytes), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + k * 16));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + k * 16 + 32));
#if KS_QL_VNNI
        const __m256i u0 = _mm256_xor_si256(w0, flip), u1 = _mm256_xor_si256(w1, flip);
        KS_UNROLL
        for (int r = 0; r < R; ++r) {
          const __m256i av = bcast4(ar[r] + k);
          acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], u0, av);
          acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], u1, av);
        }
#else
        const __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1);
        KS_UNROLL
        for (int r = 0; r < R; ++r) {
          const __m256i av = bcast4(ar[r] + k);
          const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(av, w0));
          const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(av, w1));
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
        }
#endif
      }
    } else {
      for (int64_t k = kb; k < ke; k += 8) {
        _mm_prefetch(reinterpret_cast<const char*>(wt + k * 8 + kPrefetchBytes), _MM_HINT_T0);
        const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + k * 8));
        const __m256i raw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + k * 8 + 32));
        const __m256i lo0 = _mm256_and_si256(raw0, low4), hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), low4);
        const __m256i lo1 = _mm256_and_si256(raw1, low4), hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), low4);
        KS_UNROLL
        for (int r = 0; r < R; ++r) {
          const __m256i a0 = bcast4(ar[r] + k), a1 = bcast4(ar[r] + k + 4);
#if KS_QL_VNNI
          acc[r][0] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc[r][0], lo0, a0), hi0, a1);
          acc[r][1] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc[r][1], lo1, a0), hi1, a1);
#else
          const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, a0), _mm256_maddubs_epi16(hi0, a1));
          const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, a0), _mm256_maddubs_epi16(hi1, a1));
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
#endif
        }
      }
    }
    // Flush: out += scale_w * scale_x * (sum_d 128^d acc_d - zero * sum(a)); int8 has no zero term with the sign
    // trick and 128 (q ^ 0x80 == q + 128) with vpdpbusd.
    const int64_t g = p.group_of(s);
    KS_UNROLL
    for (int h = 0; h < 2; ++h) {
      const __m256 sw = _mm256_loadu_ps(a.scale + g * p.Np + n0 + 8 * h);
      __m256 zf = _mm256_set1_ps(KS_QL_VNNI ? 128.f : 0.f);
      if constexpr (BITS == 4) {
        zf = a.zero     ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zero + g * p.Np + n0 + 8 * h))))
             : a.zero_f ? _mm256_loadu_ps(a.zero_f + g * p.Np + n0 + 8 * h)
                        : _mm256_set1_ps(8.f);
      }
      KS_UNROLL
      for (int m = 0; m < MR; ++m) {
        __m256 tv = _mm256_cvtepi32_ps(acc[m * NDIG + NDIG - 1][h]);
        KS_UNROLL
        for (int d = NDIG - 2; d >= 0; --d)
          tv = _mm256_fmadd_ps(tv, _mm256_set1_ps(128.f), _mm256_cvtepi32_ps(acc[m * NDIG + d][h]));
        const int64_t i = (m0 + m) * p.nseg + s;
        if constexpr (BITS == 4 || KS_QL_VNNI) tv = _mm256_fnmadd_ps(zf, _mm256_set1_ps(acts.asum[i]), tv);
        out[m][h] = _mm256_fmadd_ps(_mm256_mul_ps(tv, _mm256_set1_ps(acts.sx[i])), sw, out[m][h]);
      }
    }
  }
  KS_UNROLL
  for (int m = 0; m < MR; ++m) {
    store8(a, m0 + m, n0, out[m][0]);
    store8(a, m0 + m, n0 + 8, out[m][1]);
  }
}

// The micro-kernel for the last `left` (< MR) rows of a row block: one pass over the tile for all of them.
template <int BITS, int NDIG, int MR>
void tail_rows(int left, const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m, int64_t t) {
  if constexpr (MR > 1) {
    if (left == MR - 1) return micro_kernel<BITS, NDIG, MR - 1>(p, a, acts, m, t);
    return tail_rows<BITS, NDIG, MR - 1>(left, p, a, acts, m, t);
  }
}

// Rows in groups of MR (the last group shorter), each group against every tile of the block.
template <int BITS, int NDIG, int MR>
void block(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t mc, int64_t t0, int64_t tc) {
  for (int64_t m = m0; m < m0 + mc; m += MR) {
    const int64_t left = m0 + mc - m;
    for (int64_t t = t0; t < t0 + tc; ++t) {
      if (left >= MR) {
        micro_kernel<BITS, NDIG, MR>(p, a, acts, m, t);
      } else {
        tail_rows<BITS, NDIG, MR>(static_cast<int>(left), p, a, acts, m, t);
      }
    }
  }
}

}  // namespace

inline void compute_block(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t mc, int64_t t0,
                          int64_t tc) {
  if (p.bits == 8) {
    if (p.ndig == 1) return block<8, 1, 6>(p, a, acts, m0, mc, t0, tc);
    return block<8, 3, 1>(p, a, acts, m0, mc, t0, tc);
  }
  if (p.ndig == 1) return block<4, 1, 4>(p, a, acts, m0, mc, t0, tc);
  return block<4, 3, 1>(p, a, acts, m0, mc, t0, tc);
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
