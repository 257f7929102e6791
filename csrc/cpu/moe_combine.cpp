// MoE combine: out[t] = sum_s w[t, s] * rows[pos(t, s)], fp32 accumulation, threads over tokens.
#include <cstring>
#include <vector>

#include "cpu/half.h"
#include "cpu/moe.h"
#include "cpu/parallel.h"

namespace kernswap {
namespace cpu {

void moe_combine(const float* rows, int64_t ldr, const int32_t* pos, const float* weights, int64_t T,
                 int64_t top_k, int64_t H, void* out, DType out_dtype, int64_t ldo, int num_threads) {
  if (T <= 0 || H <= 0) return;
  const int threads = T * top_k * H >= (1 << 16) ? num_threads : 1;
  parallel_for(T, threads, [&](int64_t b, int64_t e) {
    std::vector<float> acc(static_cast<size_t>(H));
    for (int64_t t = b; t < e; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < top_k; ++s) {
        const int64_t p = t * top_k + s;
        const int64_t r = pos ? pos[p] : p;
        if (r < 0) continue;
        const float w = weights[p];
        const float* src = rows + r * ldr;
        for (int64_t h = 0; h < H; ++h) acc[h] += w * src[h];
      }
      switch (out_dtype) {
        case DType::F32: std::memcpy(static_cast<float*>(out) + t * ldo, acc.data(), H * sizeof(float)); break;
        case DType::BF16: {
          uint16_t* o = static_cast<uint16_t*>(out) + t * ldo;
          for (int64_t h = 0; h < H; ++h) o[h] = f32_to_bf16(acc[h]);
          break;
        }
        default: {
          uint16_t* o = static_cast<uint16_t*>(out) + t * ldo;
          for (int64_t h = 0; h < H; ++h) o[h] = f32_to_f16(acc[h]);
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace kernswap
