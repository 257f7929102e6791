// Fused mixture-of-experts on the CPU (torch-free): routing, alignment, the experts' SwiGLU MLPs, combine.
//
//   moe_route:   per token, top-k experts of the router logits (softmax-then-top-k, top-k-then-softmax, or
//                sigmoid scores with a selection-only bias), optional renormalisation. Threads over tokens.
//   moe_align:   counting sort of the pairs p = t * top_k + slot by expert (stable), offsets [E + 1].
//   moe_experts: for the pairs of each expert e, y = W_down[e] (silu(g) * u) with [g; u] = W_gate_up[e] x,
//                written in sorted pair order (row i of `sorted_out` is pair sorted_pair_ids[i]).
//                Float weights: fp32 GEMM (sgemm.h), tasks (expert, column panel) in two stages (one parallel
//                region; weight-stationary products for experts of 5..64 rows).
//                Quantized weights: the quantized-linear engine (qlinear.h), tasks (expert, row block).
//   moe_combine: out[t] = sum_s w[t, s] * rows[pos(t * top_k + s)] (fp32 accumulation).
// The Python side validates every argument; these functions trust sizes and pointers.
#pragma once
#include <cstdint>

#include "cpu/qlinear.h"

namespace kernswap {
namespace cpu {

enum class MoEScoring : int { SoftmaxTopk = 0, TopkSoftmax = 1, Sigmoid = 2 };

// logits fp32 [T, E] (row stride ld); bias fp32 [E] or nullptr (selection only); outputs [T, top_k].
void moe_route(const float* logits, int64_t T, int64_t E, int64_t ld, int64_t top_k, MoEScoring scoring,
               bool renormalize, const float* bias, float* weights, int32_t* ids, int num_threads);

// ids int32 [P] (every value in [0, E)); sorted int32 [P]; offsets int32 [E + 1]. Returns the number of ids
// outside [0, E) (those pairs are left out; the caller rejects such input before calling).
int64_t moe_align(const int32_t* ids, int64_t P, int64_t E, int32_t* sorted, int32_t* offsets);

// One stacked quantized weight [E, N, K] (packed formats of python/kernswap/formats): expert e's
// QuantizedWeight tensors start at packed + e * packed_stride (bytes), scale + e * scale_stride (floats),
// zero + e * zero_stride (bytes).
struct MoEQuantWeight {
  const uint8_t* packed = nullptr;
  int64_t packed_stride = 0;
  const float* scale = nullptr;
  int64_t scale_stride = 0;
  const uint8_t* zero = nullptr;
  int64_t zero_stride = 0;
  int bits = 0;  // 0: not quantized (float weights are used)
  int64_t group_size = 0;
  bool dynamic_act = false;
};

struct MoEExpertsArgs {
  const void* x;  // [T, H] rows of stride x_row_stride (elements)
  DType x_dtype;
  int64_t T, H, I, E, top_k, x_row_stride;
  const int32_t* sorted_pair_ids;  // [P = T * top_k]
  const int32_t* expert_offsets;   // [E + 1]
  // float weights (contiguous): w_gate_up [E, 2I, H], w_down [E, H, I]; ignored when quantized
  const void* w_gate_up;
  const void* w_down;
  DType w_dtype;
  MoEQuantWeight q_gate_up, q_down;  // bits != 0: quantized experts
  float* sorted_out;                 // [P, H] fp32, row i = the output of pair sorted_pair_ids[i]
  int num_threads;
};

void moe_experts(const MoEExpertsArgs& args);

// moe_experts into an internal scratch (args.sorted_out is ignored), then moe_combine into out [T, H]
// with weights [T, top_k] fp32: the whole layer after routing and alignment in one call.
void moe_experts_combine(MoEExpertsArgs args, const float* weights, void* out, DType out_dtype, int64_t ldo);

// out [T, H] (dtype out_dtype, row stride ldo) = sum over slots s of weights[t, s] * rows[r] where
// r = pos[t * top_k + s] (pos == nullptr: r = t * top_k + s; r < 0: slot left out); rows fp32 [*, H] (row stride ldr).
void moe_combine(const float* rows, int64_t ldr, const int32_t* pos, const float* weights, int64_t T,
                 int64_t top_k, int64_t H, void* out, DType out_dtype, int64_t ldo, int num_threads);

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], by the active tier's kernel (registered
// as op "moe_swiglu" in swiglu.cpp; the experts and the decode-layer kernel both call it).
void swiglu(const float* gate, const float* up, float* out, int64_t n);

// Per-tier pieces of swiglu (moe_act_avx512.cpp, moe_act_avx2.cpp; the portable version lives in swiglu.cpp).
namespace avx512 {
void moe_swiglu(const float* gate, const float* up, float* out, int64_t n);
}
namespace avx2 {
void moe_swiglu(const float* gate, const float* up, float* out, int64_t n);
}

}  // namespace cpu
}  // namespace kernswap
