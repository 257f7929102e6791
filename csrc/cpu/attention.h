// Block-sparse attention on the CPU (FlashAttention-style online softmax over the kept key blocks only).
//
// Semantics (see python/kernswap/ops/block_sparse_attention.py): q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), query
// head h reads kv head h / (Hq / Hkv). Query row i sits at position i + Sk - Sq; key j is attended by row i iff
// mask[b, h, i / bs, j / bs] and (!causal || j <= i + Sk - Sq). out (B, Hq, Sq, D) contiguous in the input
// dtype, lse (B, Hq, Sq) fp32 contiguous (natural log); a row with no attended key gets zeros and -inf.
//
// Layout of the computation: queries run along the vector lanes. For one kv head, a tile of query columns
// (one head's query block, or in decode every GQA head's few rows) is packed once as Q^T [D][cols] (scaled by
// scale * log2 e, converted to fp32); each kept key block gives S^T = K_blk Q^T straight from K's rows, the
// softmax statistics are per lane (no horizontal reductions), and O^T = O^T * alpha + V_blk^T P^T reads V's
// rows in place. bf16/fp16 key/value blocks are converted to fp32 one block at a time. Prefill tasks are
// (b, kv head, query block) with every GQA head of that kv head inside, taken in decreasing cost order;
// decode tasks split the kept key blocks of each (b, kv head) across threads and merge their partial
// (max, sum, out) with the log-sum-exp rule.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"

namespace kernswap {
namespace cpu {

struct AttnArgs {
  const void *q, *k, *v;  // element strides below; the last dim is contiguous
  DType dtype;            // of q, k, v and out
  int64_t B, Hq, Hkv, Sq, Sk, D;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // (batch, head, seq) strides in elements
  const uint8_t* mask;                            // bool block mask
  int64_t mask_stride[4];  // (batch, head, query block, key block) strides in elements; 0 broadcasts
  int64_t block_size;
  bool causal;
  float scale;
  void* out;   // (B, Hq, Sq, D) contiguous, dtype
  float* lse;  // (B, Hq, Sq) contiguous
  int num_threads;
};

// Entry point: the kernel of the active tier (registry in attention.cpp, see dispatch.h).
void block_sparse_attention(const AttnArgs& args);

namespace scalar { void block_sparse_attention(const AttnArgs& args); }
namespace avx2 { void block_sparse_attention(const AttnArgs& args); }
namespace avx512 { void block_sparse_attention(const AttnArgs& args); }

}  // namespace cpu
}  // namespace kernswap
