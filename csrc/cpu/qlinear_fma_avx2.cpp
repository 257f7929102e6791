// Weight-only quantized linear (int8 per-channel, int4 group-wise) for AVX2 + FMA machines, in fp32 arithmetic:
// y = x @ dequant(W)^T + bias, with dequant(W) computed exactly as the format's dequantize() does (int8: q * s,
// int4: (q - zero) * s, one fp32 rounding), so the only difference from the reference is the summation order.
//
// Why: the integer engine (qlinear_avx2.cpp) carries weight-only activations as three int8 digits, i.e. three
// times the products of a dynamic-activation call; torch's fp32 GEMM on dequantized panels writes and re-reads a
// 4 MiB fp32 copy of the weight. Here each task dequantizes one 16-row weight tile, kKC values of k at a time,
// into a 16 KiB fp32 buffer that stays in L1, and an MR x 16 FMA micro-kernel (12 ymm accumulators) runs every
// activation row of its block against that buffer. The weight is read once from memory in its packed size (8 or
// 4 bits) and dequantized once per row block; the fp32 panel never leaves L1.
//
// Tile layouts (python/kernswap/formats): 16-row tiles. int8: k-quad q is 64 bytes, byte q*64 + nn*4 + kk =
// row nn, k 4q+kk. int4: k-octet o is 64 bytes, byte o*64 + nn*4 + j = row nn, k 8o+j (low nibble) and 8o+4+j
// (high nibble). One 32-byte load is 8 rows x 4 k; vpshufb + vpermd regroup it into four 8-byte chunks, one per
// k, each holding rows 0..7, which vpmovsx/zxbd + vcvtdq2ps turn into one fp32 vector of 8 rows.
#define KS_ISA_NS avx2
#include <immintrin.h>

#include "cpu/qlinear_common.h"

namespace kernswap {
namespace cpu {
namespace avx2 {
namespace {

constexpr int kMR = 6;           // activation rows per micro-kernel: 6 x 2 accumulators + 2 weights + 1 broadcast
constexpr int64_t kKC = 256;     // k per dequantized chunk: 16 rows x 256 x 4 B = 16 KiB, half of L1d
constexpr int kPrefetch = 2048;  // software prefetch distance on the packed tile stream (see qlinear_avx2.cpp)
constexpr int64_t kMaxRowBlock = 120;  // rows per task (multiple of kMR); outputs of a block: 120 x 64 B

struct Geo {
  int64_t M, K, N, Np, ntiles, kpad, tile_bytes;
};

inline Geo make_geo(const QLinearArgs& a) {
  Geo g;
  g.M = a.M;
  g.K = a.K;
  g.N = a.N;
  g.ntiles = (a.N + 15) / 16;
  g.Np = g.ntiles * 16;
  g.kpad = a.bits == 4 ? a.K : (a.K + 3) / 4 * 4;  // int4: K % group_size == 0 (checked by the binding)
  g.tile_bytes = a.bits == 4 ? a.K * 8 : g.kpad * 16;
  return g;
}

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

// Tile t, k in [k0, k1) (k0, k1 multiples of 4, k1 <= kpad) -> buf[(k - k0) * 16 + row], fp32, q * scale.
inline void dequant_chunk8(const QLinearArgs& a, const Geo& g, int64_t t, int64_t k0, int64_t k1, float* buf) {
  const uint8_t* tile = a.packed + t * g.tile_bytes;
  const __m256 sc[2] = {_mm256_loadu_ps(a.scale + t * 16), _mm256_loadu_ps(a.scale + t * 16 + 8)};
  for (int64_t k = k0; k < k1; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(tile + k * 16 + kPrefetch), _MM_HINT_T0);
    float* o = buf + (k - k0) * 16;
    for (int h = 0; h < 2; ++h) {
      __m256i w[4];
      widen4<true>(regroup(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + k * 16 + 32 * h))), w);
      for (int i = 0; i < 4; ++i) _mm256_store_ps(o + 16 * i + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(w[i]), sc[h]));
    }
  }
}

// Tile t, k in [k0, k1) (multiples of 8) -> buf, fp32, (q - zero) * scale with the group's zero and scale.
inline void dequant_chunk4(const QLinearArgs& a, const Geo& g, int64_t t, int64_t k0, int64_t k1, float* buf) {
  const uint8_t* tile = a.packed + t * g.tile_bytes;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t gs = a.group_size;
  __m256 sc[2], zp[2];
  for (int64_t k = k0; k < k1; k += 8) {
    if (k == k0 || k % gs == 0) {  // a new group: its 16 scales and zero-points
      const int64_t i = (k / gs) * g.Np + t * 16;
      for (int h = 0; h < 2; ++h) {
        sc[h] = _mm256_loadu_ps(a.scale + i + 8 * h);
        zp[h] = a.zero ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zero + i + 8 * h))))
                       : _mm256_set1_ps(8.f);
      }
    }
    _mm_prefetch(reinterpret_cast<const char*>(tile + k * 8 + kPrefetch), _MM_HINT_T0);
    float* o = buf + (k - k0) * 16;
    for (int h = 0; h < 2; ++h) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + k * 8 + 32 * h));
      const __m256i nib[2] = {_mm256_and_si256(raw, low4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)};
      for (int half = 0; half < 2; ++half) {  // low nibbles: k .. k+3; high nibbles: k+4 .. k+7
        __m256i w[4];
        widen4<false>(regroup(nib[half]), w);
        for (int i = 0; i < 4; ++i) {
          const __m256 v = _mm256_sub_ps(_mm256_cvtepi32_ps(w[i]), zp[h]);
          _mm256_store_ps(o + 16 * (4 * half + i) + 8 * h, _mm256_mul_ps(v, sc[h]));
        }
      }
    }
  }
}

// o[m][0..15] (+)= sum_{k < kc} x[m][k] * buf[k][0..15] for MR rows; `first` starts from zero.
template <int MR>
inline void micro_kernel(const float* x, int64_t ldx, int64_t kc, const float* buf, float* o, bool first) {
  __m256 acc[MR][2];
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

// One task: weight tile t against activation rows [m0, m0 + mc).
void tile_task(const QLinearArgs& a, const Geo& g, const float* x, int64_t ldx, int64_t t, int64_t m0, int64_t mc) {
  alignas(64) float buf[kKC * 16];
  alignas(64) float out[kMaxRowBlock * 16];
  for (int64_t k0 = 0; k0 < g.K; k0 += kKC) {
    const int64_t k1 = std::min(k0 + kKC, g.kpad);  // dequantize the zero padding too (int8 K % 4 != 0) ...
    if (a.bits == 8) {
      dequant_chunk8(a, g, t, k0, k1, buf);
    } else {
      dequant_chunk4(a, g, t, k0, k1, buf);
    }
    const int64_t kc = std::min(k1, g.K) - k0;  // ... but multiply only the real k (x has K columns)
    for (int64_t m = 0; m < mc; m += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - m));
      run_rows(rows, x + (m0 + m) * ldx + k0, ldx, kc, buf, out + 16 * m, k0 == 0);
    }
  }
  const int64_t n0 = t * 16, cnt = std::min<int64_t>(16, g.N - n0);
  for (int64_t m = 0; m < mc; ++m) {
    if (a.y_dtype == DType::F32 && cnt == 16) {  // the common case, vectorised (bias added in fp32 as store_span)
      float* y = static_cast<float*>(a.y) + (m0 + m) * a.y_row_stride + n0;
      for (int h = 0; h < 2; ++h) {
        __m256 v = _mm256_load_ps(out + 16 * m + 8 * h);
        if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + n0 + 8 * h));
        _mm256_storeu_ps(y + 8 * h, v);
      }
    } else {
      store_span(a, m0 + m, n0, cnt, out + 16 * m);
    }
  }
}

}  // namespace

void qlinear_fma(const QLinearArgs& a) {
  const Geo g = make_geo(a);
  if (g.M <= 0 || g.N <= 0) return;
  // Threads only where each gets enough work to pay for waking it (~0.5M multiply-adds, ~50 us: measured, a
  // 576 x 576 layer at M = 16 already runs 1.3x faster on 2 threads than on one).
  const double work = static_cast<double>(g.M) * g.Np * g.K;
  const int threads = static_cast<int>(std::max<double>(1, std::min<double>(a.num_threads, work / (1 << 19))));

  // Activations as fp32 rows: fp32 inputs are read in place; bf16/fp16 ones converted once per call.
  const float* x = static_cast<const float*>(a.x);
  int64_t ldx = a.x_row_stride;
  static thread_local std::vector<float> xs;  // per calling thread, reused across calls
  if (a.x_dtype != DType::F32) {
    xs.resize(static_cast<size_t>(g.M * g.K));
    float* dst = xs.data();
    const int64_t esz = 2;
    parallel_for(g.M, g.M * g.K >= (1 << 16) ? threads : 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        load_row(static_cast<const char*>(a.x) + m * a.x_row_stride * esz, a.x_dtype, g.K, dst + m * g.K);
    });
    x = dst;
    ldx = g.K;
  }

  // Tasks: (tile, row block), tile-major, so each thread's contiguous range streams its own slice of the weight.
  const int64_t mb = g.M <= kMaxRowBlock ? g.M : (g.M + (g.M + kMaxRowBlock - 1) / kMaxRowBlock - 1) /
                                                     ((g.M + kMaxRowBlock - 1) / kMaxRowBlock);
  const int64_t mbr = std::min<int64_t>(kMaxRowBlock, (mb + kMR - 1) / kMR * kMR);
  const int64_t nmb = (g.M + mbr - 1) / mbr;
  parallel_for(g.ntiles * nmb, threads, [&](int64_t b, int64_t e) {
    for (int64_t id = b; id < e; ++id) {
      const int64_t t = id / nmb, m0 = (id % nmb) * mbr;
      tile_task(a, g, x, ldx, t, m0, std::min(mbr, g.M - m0));
    }
  });
}

}  // namespace avx2
}  // namespace cpu
}  // namespace kernswap
