// The AVX-512 quantized-linear engine, compiled by two tiers from this one source:
//   avx512_vnni (qlinear_avx512vnni.cpp, KS_QL_VNNI 1): weights as unsigned bytes (int8 q ^ 0x80, or int4 nibbles)
//     times signed activation digits in vpdpbusd, int32 sums rescaled in fp32 once per segment;
//   avx512 (qlinear_avx512.cpp, KS_QL_VNNI 0; Skylake-SP, no VNNI): the same products on vpmaddubsw + vpmaddwd.
//     int8 weights stay signed and take the sign trick (|q| as u8 times a * sign(q) as s8, as the AVX2 engine
//     does; AVX-512BW has no vpsignb, so the negation is a masked subtract under the sign mask of q): every pair
//     sum is at most 2 * 128 * 127 < 2^15, nothing saturates, and there is no zero-point term. int4 nibbles
//     (at most 2 * 15 * 127 per pair) are added in int16 before vpmaddwd widens them.
// A register-tiled micro-kernel of MR rows x NT tiles (16 output columns each): weights stream once per row
// block; activation digits are broadcast 4 at a time.
// Include from a tier's translation unit after defining KS_ISA_NS and KS_QL_VNNI, then include qlinear_driver.h.
#pragma once
#include <immintrin.h>

#include "cpu/bf16_avx512.h"
#include "cpu/qlinear_common.h"

#ifndef KS_QL_VNNI
#error "define KS_QL_VNNI (1: vpdpbusd, 0: vpmaddubsw + vpmaddwd) before including qlinear_kernel_avx512.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {
namespace {

#define KS_UNROLL _Pragma("GCC unroll 32")

#if KS_QL_VNNI
// acc += u8(w) . s8(a) over 4-byte lanes, forced in place: GCC otherwise copies the accumulators around
// the destructive vpdpbusd and spills them every iteration.
inline void dpbusd(__m512i& acc, __m512i w, __m512i a) { __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(a)); }
#else
// acc += the int32 sums of 4-byte lanes of int16 pair sums p (vpmaddwd by ones).
inline void add_pairs(__m512i& acc, __m512i p) {
  acc = _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}
#endif

// Software prefetch distance along each weight tile's stream (the streams are 16 rows x K apart).
constexpr int kPrefetchBytes = 2048;

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void store16(const QLinearArgs& a, int64_t m, int64_t n0, __m512 v) {
  const int64_t cnt = std::min<int64_t>(16, a.N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
  if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.bias + n0));
  const int64_t off = m * a.y_row_stride + n0;
  switch (a.y_dtype) {
    case DType::F32: _mm512_mask_storeu_ps(static_cast<float*>(a.y) + off, mask, v); break;
    case DType::BF16: {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + off, mask, cvt_f32_bf16_avx512(v));
      break;
    }
    default: {
      const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + off, mask, h);
    }
  }
}

// The 16 zero-points of int4 weight group g, columns n0..n0+15, as the flush subtracts them (zero * sum(a)): the
// integer or float zero-points, else the implicit 8. (int8 weights pass their own constant.)
inline __m512 int4_zero16(const Plan& p, const QLinearArgs& a, int64_t g, int64_t n0) {
  if (a.zero)
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zero + g * p.Np + n0))));
  if (a.zero_f) return _mm512_loadu_ps(a.zero_f + g * p.Np + n0);
  return _mm512_set1_ps(8.f);
}

template <int BITS, int NDIG, int MR, int NT>
void micro_kernel(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t t0) {
  [[maybe_unused]] const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const uint8_t* wt[NT];
  KS_UNROLL
  for (int t = 0; t < NT; ++t) wt[t] = a.packed + (t0 + t) * p.tile_bytes;
  const int8_t* ar[MR][NDIG];
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int d = 0; d < NDIG; ++d) ar[m][d] = acts.row(p, m0 + m, d);
  __m512 out[MR][NT];
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int t = 0; t < NT; ++t) out[m][t] = _mm512_setzero_ps();

  for (int64_t s = 0; s < p.nseg; ++s) {
    __m512i acc[NDIG][MR][NT];
    KS_UNROLL
    for (int d = 0; d < NDIG; ++d)
      KS_UNROLL
      for (int m = 0; m < MR; ++m)
        KS_UNROLL
        for (int t = 0; t < NT; ++t) acc[d][m][t] = _mm512_setzero_si512();
    const int64_t kb = p.seg_begin(s), ke = p.seg_end(s);
    if constexpr (BITS == 8) {
      for (int64_t k = kb; k < ke; k += 4) {
        __m512i w[NT];
#if !KS_QL_VNNI
        __mmask64 neg[NT];
#endif
        KS_UNROLL
        for (int t = 0; t < NT; ++t) {
          _mm_prefetch(reinterpret_cast<const char*>(wt[t] + k * 16 + kPrefetchBytes), _MM_HINT_T0);
          const __m512i raw = _mm512_loadu_si512(wt[t] + k * 16);
#if KS_QL_VNNI
          w[t] = _mm512_xor_si512(raw, flip);
#else
          w[t] = _mm512_abs_epi8(raw);  // |q| as u8 (-128 gives 0x80 = 128)
          neg[t] = _mm512_movepi8_mask(raw);
#endif
        }
        KS_UNROLL
        for (int m = 0; m < MR; ++m)
          KS_UNROLL
          for (int d = 0; d < NDIG; ++d) {
            const __m512i av = bcast4(ar[m][d] + k);
            KS_UNROLL
            for (int t = 0; t < NT; ++t) {
#if KS_QL_VNNI
              dpbusd(acc[d][m][t], w[t], av);
#else
              const __m512i sa = _mm512_mask_sub_epi8(av, neg[t], _mm512_setzero_si512(), av);  // a * sign(q)
              add_pairs(acc[d][m][t], _mm512_maddubs_epi16(w[t], sa));
#endif
            }
          }
      }
    } else {
      for (int64_t k = kb; k < ke; k += 8) {
        __m512i lo[NT], hi[NT];
        KS_UNROLL
        for (int t = 0; t < NT; ++t) {
          _mm_prefetch(reinterpret_cast<const char*>(wt[t] + k * 8 + kPrefetchBytes), _MM_HINT_T0);
          const __m512i raw = _mm512_loadu_si512(wt[t] + k * 8);
          lo[t] = _mm512_and_si512(raw, low4);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        }
        KS_UNROLL
        for (int m = 0; m < MR; ++m)
          KS_UNROLL
          for (int d = 0; d < NDIG; ++d) {
            const __m512i a0 = bcast4(ar[m][d] + k), a1 = bcast4(ar[m][d] + k + 4);
            KS_UNROLL
            for (int t = 0; t < NT; ++t) {
#if KS_QL_VNNI
              dpbusd(acc[d][m][t], lo[t], a0);
              dpbusd(acc[d][m][t], hi[t], a1);
#else
              add_pairs(acc[d][m][t], _mm512_add_epi16(_mm512_maddubs_epi16(lo[t], a0), _mm512_maddubs_epi16(hi[t], a1)));
#endif
            }
          }
      }
    }
    // Flush: out += scale_w * scale_x * (sum_d 128^d acc_d - zero * sum(a)).
    const int64_t g = p.group_of(s);
    KS_UNROLL
    for (int t = 0; t < NT; ++t) {
      const int64_t n0 = (t0 + t) * 16;
      const __m512 sw = _mm512_loadu_ps(a.scale + g * p.Np + n0);
      // int8: q ^ 0x80 == q + 128 (vpdpbusd); the sign trick keeps q signed
      const __m512 zf = BITS == 8 ? _mm512_set1_ps(KS_QL_VNNI ? 128.f : 0.f) : int4_zero16(p, a, g, n0);
      KS_UNROLL
      for (int m = 0; m < MR; ++m) {
        __m512 tv = _mm512_cvtepi32_ps(acc[NDIG - 1][m][t]);
        KS_UNROLL
        for (int d = NDIG - 2; d >= 0; --d) tv = _mm512_fmadd_ps(tv, _mm512_set1_ps(128.f), _mm512_cvtepi32_ps(acc[d][m][t]));
        const int64_t i = (m0 + m) * p.nseg + s;
        tv = _mm512_fnmadd_ps(zf, _mm512_set1_ps(acts.asum[i]), tv);
        out[m][t] = _mm512_fmadd_ps(_mm512_mul_ps(tv, _mm512_set1_ps(acts.sx[i])), sw, out[m][t]);
      }
    }
  }
  KS_UNROLL
  for (int m = 0; m < MR; ++m)
    KS_UNROLL
    for (int t = 0; t < NT; ++t) store16(a, m0 + m, (t0 + t) * 16, out[m][t]);
}

// Picks the instantiation for the remaining rows (mr <= MR) and tiles (nt <= NT).
template <int BITS, int NDIG, int MR, int NT>
void run_tile(int mr, int nt, const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t t0) {
  if constexpr (MR > 0 && NT > 0) {
    if (mr < MR) return run_tile<BITS, NDIG, (MR > 1 ? MR - 1 : 1), NT>(mr, nt, p, a, acts, m0, t0);
    if (nt < NT) return run_tile<BITS, NDIG, MR, (NT > 1 ? NT - 1 : 1)>(mr, nt, p, a, acts, m0, t0);
    micro_kernel<BITS, NDIG, MR, NT>(p, a, acts, m0, t0);
  }
}

template <int BITS, int NDIG, int MR, int NT>
void block(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t mc, int64_t t0, int64_t tc) {
  for (int64_t m = m0; m < m0 + mc; m += MR)
    for (int64_t t = t0; t < t0 + tc; t += NT)
      run_tile<BITS, NDIG, MR, NT>(static_cast<int>(std::min<int64_t>(MR, m0 + mc - m)),
                                   static_cast<int>(std::min<int64_t>(NT, t0 + tc - t)), p, a, acts, m, t);
}

}  // namespace

inline void compute_block(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t mc, int64_t t0,
                          int64_t tc) {
  if (p.bits == 8) {
    if (p.ndig == 1) return block<8, 1, 6, 3>(p, a, acts, m0, mc, t0, tc);
    return block<8, 3, 3, 2>(p, a, acts, m0, mc, t0, tc);
  }
  if (p.ndig == 1) return block<4, 1, 6, 2>(p, a, acts, m0, mc, t0, tc);
  return block<4, 3, 3, 2>(p, a, acts, m0, mc, t0, tc);
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap

