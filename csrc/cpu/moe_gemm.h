// Weight-stationary fp32 product for the MoE experts with few rows (moe_experts.cpp):
//   C[M x N] (row stride N) = (acc ? C : 0) + W[M x K] (rows of stride ldw) * Xt[K x N] (row stride N), 1 <= N <= 64.
// The weight rows are read in place (no packing) and each weight element is broadcast against the whole row of
// Xt, so the micro-kernel's width is the expert's row count (columns past N are masked off).
#pragma once
#include <cstdint>

namespace kernswap {
namespace cpu {
namespace avx512 {
void moe_ws_gemm(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* Xt, float* C, bool acc);
}
}  // namespace cpu
}  // namespace kernswap
