// Quantized linear layer on the CPU: y = x @ dequant(W)^T + bias.
//
// One engine serves every format: weights are unsigned 8-bit lanes (int8 q ^ 0x80, or int4 nibbles) and
// activations are signed int8 "digits", multiplied with VNNI (vpdpbusd) into int32 and rescaled in fp32
// once per segment of K (a weight group, or a chunk for per-channel int8):
//   * dynamic activations (W8A8, W4A8): one digit per element, per-row scale amax/127;
//   * weight-only (W8, W4): activations kept as 21-bit fixed point per (row, segment) block: three base-128
//     digits, so the result matches fp32 arithmetic to ~5e-7 of the block's max|x|.
// Layouts are the package's packed formats (see python/kernswap/formats): int8 tiles of 16 rows x 4 k,
// int4 tiles of 16 rows x 8 k with k and k+4 sharing a byte.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"

namespace kernswap {
namespace cpu {

struct QLinearArgs {
  const void* x;        // [M, K] activations, row stride x_row_stride (elements)
  DType x_dtype;
  int64_t M, K, x_row_stride;
  const uint8_t* packed;  // packed weights (int8 or int4 layout)
  int bits;               // 8 or 4
  int64_t group_size;     // int4: 32/64/128; int8: ignored (per output channel)
  int64_t N;
  const float* scale;     // [K/G, Np] (int8: [1, Np])
  const uint8_t* zero;    // [K/G, Np] integer zero-points for asymmetric int4, else nullptr
  const float* zero_f;    // [K/G, Np] float zero-points for asymmetric int4 (w = (q - z) * s), else nullptr;
                          // at most one of zero / zero_f is set
  const float* bias;      // [N] or nullptr
  void* y;                // [M, N] output, row stride y_row_stride (elements)
  DType y_dtype;
  int64_t y_row_stride;
  bool dynamic_act;
  int num_threads;
};

// Rows [n0, n1) of a packed weight (same layouts and fields as QLinearArgs) dequantized to fp32:
// out[(n - n0) * ld + k] = (q - zero) * scale, k < K (zero from zero or zero_f, 8 when neither is set).
struct QDequantArgs {
  const uint8_t* packed;
  int bits;
  int64_t group_size, N, K;
  const float* scale;
  const uint8_t* zero;
  const float* zero_f;
  int64_t n0, n1;
  float* out;
  int64_t ld;
  int num_threads;
};

// Zero-point of int4 weight element i of the [K/G, Np] arrays: integer, float or the implicit 8 (QLinearArgs and
// QDequantArgs alike).
template <class Args>
inline float zero_of(const Args& a, int64_t i) {
  return a.zero ? static_cast<float>(a.zero[i]) : a.zero_f ? a.zero_f[i] : 8.f;
}

// Entry points: the kernel of the active tier (registry in qlinear.cpp, see dispatch.h).
void qlinear(const QLinearArgs& args);
void qdequant(const QDequantArgs& args);

// Per-tier implementations (each in its own translation unit; the x86 ones are built for x86 targets only).
namespace scalar { void qlinear(const QLinearArgs& args); void qdequant(const QDequantArgs& args); }
namespace avx2 {
void qlinear(const QLinearArgs& args);
void qdequant(const QDequantArgs& args);
// Weight-only formats in fp32 FMA, dequantizing 16-row tiles into L1 (qlinear_fma_avx2.cpp); the avx2 and avx_vnni
// qlinear route weight-only calls with M >= 8 (int8) / 16 (int4) rows to it.
void qlinear_fma(const QLinearArgs& args);
}
namespace avx_vnni { void qlinear(const QLinearArgs& args); }
namespace avx512 {
void qlinear(const QLinearArgs& args);
// Weight-only formats in fp32 FMA at 512 bits (qlinear_fma_avx512.cpp); both AVX-512 tiers route to it from some M.
void qlinear_fma(const QLinearArgs& args);
}
namespace avx512_vnni { void qlinear(const QLinearArgs& args); }
// Dynamic-activation formats on AMX tiles from 32 rows (qlinear_amx.cpp); the rest goes to avx512_vnni::qlinear.
namespace amx { void qlinear(const QLinearArgs& args); }

}  // namespace cpu
}  // namespace kernswap
