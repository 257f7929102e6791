// SwiGLU's elementwise half, out = silu(g) * u, and its registry entry (op "moe_swiglu"; see moe.h).
#include <cmath>

#include "cpu/dispatch.h"
#include "cpu/moe.h"

namespace kernswap {
namespace cpu {
namespace {

void swiglu_portable(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

const Dispatch<void (*)(const float*, const float*, float*, int64_t)> kSwiglu{"moe_swiglu", {
    {Isa::Scalar, swiglu_portable},
    {Isa::Avx2, KS_X86_KERNEL(avx2::moe_swiglu)},
    {Isa::Avx512, KS_X86_KERNEL(avx512::moe_swiglu)},
}};

}  // namespace

void swiglu(const float* g, const float* u, float* out, int64_t n) { kSwiglu(g, u, out, n); }

}  // namespace cpu
}  // namespace kernswap
