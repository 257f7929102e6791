// Shared pieces of the quantized-linear engine (see qlinear.h), compiled once per ISA translation unit
// inside `namespace KS_ISA_NS` so that each copy carries its own instruction set and nothing clashes.
//   Plan: segment geometry. Acts: activations turned into int8 digits with per-(row, segment) scales.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/half.h"
#include "cpu/parallel.h"
#include "cpu/qlinear.h"

#ifndef KS_ISA_NS
#error "define KS_ISA_NS before including qlinear_common.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {

// Weight-only activations: |a| <= kFixedMax = 127 * 128^2, written as d2*128^2 + d1*128 + d0 with
// d0, d1 in [-64, 63] and d2 in [-127, 127].
constexpr int32_t kFixedMax = 127 * 128 * 128;
// Segment length for per-channel int8 weights (weight-only: finer activation blocks; dynamic: fewer flushes).
constexpr int64_t kInt8SegWeightOnly = 256;
constexpr int64_t kInt8SegDynamic = 1024;

struct Plan {
  int bits = 8, ndig = 1;
  int64_t M = 0, K = 0, N = 0, Np = 0, ntiles = 0;
  int64_t kpad = 0;        // digits per row (K rounded up to the weight layout's k unit)
  int64_t seg_k = 0;       // segment length in k (the group size for int4)
  int64_t nseg = 0;
  int64_t tile_bytes = 0;  // bytes of packed weights per 16-row tile
  int64_t seg_begin(int64_t s) const { return s * seg_k; }
  int64_t seg_end(int64_t s) const { return std::min((s + 1) * seg_k, kpad); }
  int64_t group_of(int64_t s) const { return bits == 4 ? s : 0; }
};

inline Plan make_plan(const QLinearArgs& a) {
  Plan p;
  p.bits = a.bits;
  p.ndig = a.dynamic_act ? 1 : 3;
  p.M = a.M;
  p.K = a.K;
  p.N = a.N;
  p.ntiles = (a.N + 15) / 16;
  p.Np = p.ntiles * 16;
  if (a.bits == 4) {
    p.kpad = a.K;  // K % group_size == 0 and group_size % 32 == 0 are checked by the caller
    p.seg_k = a.group_size;
    p.tile_bytes = a.K * 8;
  } else {
    p.kpad = (a.K + 3) / 4 * 4;
    p.seg_k = a.dynamic_act ? kInt8SegDynamic : kInt8SegWeightOnly;
    p.tile_bytes = p.kpad * 16;
  }
  p.nseg = (p.kpad + p.seg_k - 1) / p.seg_k;
  return p;
}

struct Acts {
  std::vector<int8_t> digits;  // [M][ndig][kpad]
  std::vector<float> sx;       // [M][nseg] scale of one unit of the fixed-point value
  std::vector<float> asum;     // [M][nseg] sum of the fixed-point values over the segment (zero-point term)
  const int8_t* row(const Plan& p, int64_t m, int d) const {
    return digits.data() + (m * p.ndig + d) * p.kpad;
  }
};

inline void load_row(const void* xrow, DType t, int64_t K, float* out) {
  switch (t) {
    case DType::F32: std::memcpy(out, xrow, K * sizeof(float)); break;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(xrow);
      for (int64_t k = 0; k < K; ++k) out[k] = bf16_to_f32(s[k]);
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(xrow);
      for (int64_t k = 0; k < K; ++k) out[k] = f16_to_f32(s[k]);
    }
  }
}

// max |v| over n values, NaN if any value is NaN or +-Inf. Works on the bit patterns (|x| orders like its
// bits as an unsigned integer), so the loop vectorises without fast-math.
inline float abs_max(const float* v, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, v + i, 4);
    u &= 0x7fffffffu;
    m = u > m ? u : m;
  }
  if (m > 0x7f7fffffu) return NAN;
  float f;
  std::memcpy(&f, &m, 4);
  return f;
}

// Quantizes v[0, n) with `inv` (fixed-point units per unit of x), clamps to +-lim, writes digits and
// returns the sum of the fixed-point values. NDIG == 1: plain int8. NDIG == 3: base-128 digits.
// Written as straight-line loops the compiler vectorises: round-half-even through the 1.5 * 2^23 trick
// (exact for |r| < 2^22), int32 sums (|sum| < 2^31 for every segment length used).
template <int NDIG>
inline int32_t quantize_span(const float* v, int64_t n, float inv, int32_t lim, int8_t* d0, int8_t* d1, int8_t* d2) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float flim = static_cast<float>(lim);
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    float r = v[i] * inv;
    r = r < -flim ? -flim : (r > flim ? flim : r);
    const int32_t a = static_cast<int32_t>((r + kRound) - kRound);
    sum += a;
    if constexpr (NDIG == 1) {
      d0[i] = static_cast<int8_t>(a);
    } else {
      const int32_t lo = ((a + 64) & 127) - 64;
      const int32_t a1 = (a - lo) >> 7;
      const int32_t mid = ((a1 + 64) & 127) - 64;
      d0[i] = static_cast<int8_t>(lo);
      d1[i] = static_cast<int8_t>(mid);
      d2[i] = static_cast<int8_t>((a1 - mid) >> 7);
    }
  }
  return sum;
}

inline void prepare_row(const Plan& p, const QLinearArgs& a, int64_t m, float* tmp, Acts& acts) {
  load_row(static_cast<const char*>(a.x) + m * a.x_row_stride * (a.x_dtype == DType::F32 ? 4 : 2), a.x_dtype, p.K,
           tmp);
  std::fill(tmp + p.K, tmp + p.kpad, 0.f);
  int8_t* d[3] = {nullptr, nullptr, nullptr};
  for (int i = 0; i < p.ndig; ++i) d[i] = acts.digits.data() + (m * p.ndig + i) * p.kpad;
  float* sx = acts.sx.data() + m * p.nseg;
  float* as = acts.asum.data() + m * p.nseg;
  if (p.ndig == 1) {  // per-row dynamic int8 quantization (the reference's formula, in fp32)
    const float amax = abs_max(tmp, p.kpad);
    const bool ok = amax > 0.f && amax <= FLT_MAX;
    const float inv = ok ? 127.f / amax : 0.f;
    const float scale = std::isnan(amax) ? NAN : (ok ? amax / 127.f : 0.f);
    for (int64_t s = 0; s < p.nseg; ++s) {
      const int64_t b = p.seg_begin(s), e = p.seg_end(s);
      if (ok) {
        as[s] = static_cast<float>(quantize_span<1>(tmp + b, e - b, inv, 127, d[0] + b, nullptr, nullptr));
      } else {
        std::memset(d[0] + b, 0, e - b);
        as[s] = 0.f;
      }
      sx[s] = scale;
    }
    return;
  }
  for (int64_t s = 0; s < p.nseg; ++s) {  // weight-only: 21-bit fixed point per segment
    const int64_t b = p.seg_begin(s), e = p.seg_end(s);
    const float amax = abs_max(tmp + b, e - b);
    const bool ok = amax > 0.f && amax <= FLT_MAX;
    if (ok) {
      const float inv = static_cast<float>(kFixedMax) / amax;
      as[s] = static_cast<float>(quantize_span<3>(tmp + b, e - b, inv, kFixedMax, d[0] + b, d[1] + b, d[2] + b));
      sx[s] = amax / static_cast<float>(kFixedMax);
    } else {
      for (int i = 0; i < 3; ++i) std::memset(d[i] + b, 0, e - b);
      as[s] = 0.f;
      sx[s] = std::isnan(amax) ? NAN : 0.f;
    }
  }
}

inline void prepare_acts(const Plan& p, const QLinearArgs& a, Acts& acts) {
  acts.digits.resize(static_cast<size_t>(p.M * p.ndig * p.kpad));
  acts.sx.resize(static_cast<size_t>(p.M * p.nseg));
  acts.asum.resize(static_cast<size_t>(p.M * p.nseg));
  const int threads = (p.M * p.K >= (1 << 16)) ? a.num_threads : 1;
  parallel_for(p.M, threads, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(static_cast<size_t>(p.kpad));
    for (int64_t m = b; m < e; ++m) prepare_row(p, a, m, tmp.data(), acts);
  });
}

// Zero-point of weight group g for output column n, as the kernels use it (unsigned weight lanes).
inline float zero_point(const Plan& p, const QLinearArgs& a, int64_t g, int64_t n) {
  if (p.bits == 8) return 128.f;  // int8 q is fed as q ^ 0x80 == q + 128
  return zero_of(a, g * p.Np + n);
}

// Writes vals[0, count) (+ bias) to row m, columns [n0, n0 + count), in the output dtype.
inline void store_span(const QLinearArgs& a, int64_t m, int64_t n0, int64_t count, const float* vals) {
  const int64_t off = m * a.y_row_stride + n0;
  for (int64_t i = 0; i < count; ++i) {
    const float v = vals[i] + (a.bias ? a.bias[n0 + i] : 0.f);
    switch (a.y_dtype) {
      case DType::F32: static_cast<float*>(a.y)[off + i] = v; break;
      case DType::BF16: static_cast<uint16_t*>(a.y)[off + i] = f32_to_bf16(v); break;
      default: static_cast<uint16_t*>(a.y)[off + i] = f32_to_f16(v);
    }
  }
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
