// One decoder layer of a Llama-style model for decode steps (one new token per sequence), in two calls around
// the KV-cache append that stays on the Python side (the model's own cache object):
//   decode_attn_in:  xn = rmsnorm(x) * w_in;  qkv = xn @ Wqkv^T (+ b);  [per-head rmsnorm of the q and k heads
//                    (Qwen3's q_norm / k_norm)];  RoPE on the q and k heads of qkv
//   decode_attn_out: a = softmax(q k^T * scaling) v over the cached keys (GQA);  h = x + a @ Wo^T (+ b);
//                    hn = rmsnorm(h) * w_post;  gu = hn @ Wgu^T;  y = h + (silu(g) * u) @ Wd^T
// Everything fp32; the matmuls are the quantized-linear kernels of the active tier (qlinear.h).
#pragma once
#include <cstdint>

#include "cpu/qlinear.h"

namespace kernswap {
namespace cpu {

// One packed quantized weight: a QLinearArgs with its weight fields set (x, M, y, the strides and the threads are
// set per matmul).
using DecodeWeight = QLinearArgs;

struct DecodeAttnInArgs {
  const float* x;         // [M, H] rows (one token per sequence), contiguous
  int64_t M, H;
  const float* norm_w;    // [H]
  float eps;
  DecodeWeight qkv;       // N = (Hq + 2 Hkv) D, K = H
  const float* cos;       // [M, D] (row m: the position of sequence m)
  const float* sin;       // [M, D]
  int64_t Hq, Hkv, D;
  const float* q_norm;    // [D] or nullptr: rmsnorm of each q head (with qk_eps) before RoPE
  const float* k_norm;    // [D] or nullptr: the same for each k head
  float qk_eps;
  float* qkv_out;         // [M, N] out: q (RoPE'd), k (RoPE'd), v
  int num_threads;
};

struct DecodeAttnOutArgs {
  const float* x;         // [M, H] the layer's input (residual)
  const float* q;         // row m's q heads at q + m * q_row_stride (Hq x D, contiguous)
  int64_t q_row_stride;
  const float* k;         // keys of sequence m, kv head j, position l at k + m*ks0 + j*ks1 + l*ks2 (D contiguous)
  const float* v;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  int64_t L;              // cached positions (all attended: no mask)
  int64_t M, H, Hq, Hkv, D;
  float scaling;
  DecodeWeight o;         // N = H, K = Hq D
  const float* post_w;    // [H]
  float eps;
  DecodeWeight gate_up;   // N = 2 I, K = H (gate rows then up rows)
  DecodeWeight down;      // N = H, K = I
  int64_t I;
  float* out;             // [M, H]
  int num_threads;
};

void decode_attn_in(const DecodeAttnInArgs& a);
void decode_attn_out(const DecodeAttnOutArgs& a);

// Both halves in one call, with the cache append in between: the new keys and values are written at position
// `pos` of the caller's key / value buffers (out.k / out.v, strides out.ks* / out.vs*, room for out.L >= pos + 1
// positions), then attention runs over positions 0..pos. in.qkv_out and out.q / out.q_row_stride / out.L are set
// here (qkv goes to scratch).
void decode_layer_step(DecodeAttnInArgs in, DecodeAttnOutArgs out, int64_t pos);

}  // namespace cpu
}  // namespace kernswap
