// kernswap CUDA small-M weight-only quantized GEMV: torch-free host API (plain C++, no CUDA headers needed).
// Reads the SPEC packed layouts directly: int8 "16n x 4k" tiles (per-channel scale) and int4 nibble tiles
// (group scales [K/G, Np], optional uint8 or fp32 zeros [K/G, Np]).  y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
#pragma once
#include <cstdint>

namespace kernswap {
namespace cuda {

// dtype codes shared with kernswap._C: 0 = fp32, 1 = bf16, 2 = fp16 (only 1 and 2 are accepted here).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Launches on `stream` (a cudaStream_t passed as an integer; 0 = legacy default stream) and returns 0, a
// cudaError_t value (> 0) from the launch, or a negative argument error (see error_string).  Pointers are device
// pointers; zero (uint8) or zero_f (fp32 float zero-points) for asymmetric int4, both nullptr for symmetric formats,
// bias == nullptr for no bias (else contiguous fp32 [N]).
// Strides are in elements.  Any M is accepted (M tiles of up to 16 rows); it is meant for M <= 16.
int qgemv(const void* x, int x_dtype, int64_t M, int64_t K, int64_t x_row_stride, const void* packed, int bits,
          int64_t group_size, int64_t N, const float* scale, const uint8_t* zero, const float* zero_f,
          const float* bias, void* y, int y_dtype, int64_t y_row_stride, std::uintptr_t stream);

// Message for a qgemv return code.
const char* error_string(int code);

}  // namespace cuda
}  // namespace kernswap
