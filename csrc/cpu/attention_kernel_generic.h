// Portable primitives of the block-sparse attention driver (contract in attention_driver.h): plain loops the
// compiler vectorises for the translation unit's ISA (baseline x86-64 or AVX2 + FMA). The base-2 exponential
// is the same polynomial as the AVX-512 build's.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/attention.h"
#include "cpu/half.h"

#ifndef KS_ISA_NS
#error "define KS_ISA_NS before including attention_kernel_generic.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {
namespace attn_detail {

inline void to_f32(const void* src, DType t, int64_t n, float* dst) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * sizeof(float)); break;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
    }
  }
}

inline void from_f32(const float* src, float mul, DType t, int64_t n, void* dst) {
  switch (t) {
    case DType::F32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
      break;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i] * mul);
      break;
    }
    default: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i] * mul);
    }
  }
}

// 2^x for x <= 0: x = n + f, |f| <= 1/2, 2^f by a degree-6 polynomial, 2^n via the exponent bits. x < -125
// (and -inf) gives exactly 0, so no result is subnormal.
inline float exp2_neg(float x) {
  const bool keep = x >= -125.f;
  x = keep ? x : 0.f;
  const float n = std::floor(x + 0.5f);
  const float f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return keep ? p * s : 0.f;
}

inline void apply_limits(float* st, int64_t ld, int64_t nk, int64_t ncols, const int32_t* lim) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < nk; ++r) {
    float* row = st + r * ld;
    for (int64_t c = 0; c < ncols; ++c) row[c] = r > lim[c] ? ninf : row[c];
  }
}

inline void softmax_update(float* st, int64_t ld, int64_t nk, int64_t ncols, float* m, float* l, float* alpha) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < ncols; ++c) alpha[c] = m[c];  // alpha holds the new maximum for a moment
  for (int64_t r = 0; r < nk; ++r)
    for (int64_t c = 0; c < ncols; ++c) alpha[c] = std::max(alpha[c], st[r * ld + c]);
  for (int64_t c = 0; c < ncols; ++c) {
    const float mn = alpha[c], mu = mn == ninf ? 0.f : mn;
    alpha[c] = exp2_neg(m[c] - mu);
    l[c] *= alpha[c];
    m[c] = mn;
  }
  for (int64_t r = 0; r < nk; ++r) {
    float* row = st + r * ld;
    for (int64_t c = 0; c < ncols; ++c) {
      row[c] = exp2_neg(row[c] - (m[c] == ninf ? 0.f : m[c]));
      l[c] += row[c];
    }
  }
}

}  // namespace attn_detail
}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
