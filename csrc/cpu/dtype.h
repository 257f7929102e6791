// Element types the CPU kernels read and write; the codes match the Python side (fp32 0, bf16 1, fp16 2).
#pragma once

namespace kernswap {
namespace cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

}  // namespace cpu
}  // namespace kernswap
