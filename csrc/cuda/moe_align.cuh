// kernswap CUDA MoE alignment: torch-free host API (plain C++, no CUDA headers needed).
// Sorts the (token, slot) pairs p = t * top_k + slot by expert (stable: token order within an expert) and pads
// each expert's segment to a multiple of block_size with the sentinel num_pairs, for the grouped expert kernels.
#pragma once
#include <cstdint>

namespace kernswap {
namespace cuda {

// Pairs per CTA of the count and scatter passes; the workspace holds one int32 count per (CTA, expert).
constexpr int64_t kMoeAlignChunk = 2048;
constexpr int64_t kMoeAlignMaxExperts = 1024;

// Upper bound of the padded total (every non-empty expert adds fewer than block_size sentinel entries):
// min(P * bs, P + min(E, P) * (bs - 1)).  sorted_pair_ids must hold at least this many entries.
int64_t moe_align_max_padded(int64_t num_pairs, int64_t num_experts, int64_t block_size);

// int32 elements of workspace moe_align needs: ceil(num_pairs / kMoeAlignChunk) * num_experts.
int64_t moe_align_workspace_elems(int64_t num_pairs, int64_t num_experts);

// topk_ids: device int32 [num_pairs] (contiguous [T, top_k]).  Writes expert_offsets int32 [E + 1] (offsets into
// the padded array; offsets[E] = padded total) and sorted_pair_ids int32 [sorted_len]: expert e's pairs in token
// order at [offsets[e], offsets[e] + count_e), the sentinel num_pairs up to offsets[e + 1] and from offsets[E] to
// sorted_len.  Ids outside [0, E) belong to no expert and are left out.  block_size 1 = no padding.
// Launches on `stream` (cudaStream_t as an integer) and returns 0, a cudaError_t value (> 0) or a negative argument
// error (moe_align_error_string).  Nothing is written when an argument is rejected.
int moe_align(const int32_t* topk_ids, int64_t num_pairs, int64_t num_experts, int64_t block_size,
              int32_t* sorted_pair_ids, int64_t sorted_len, int32_t* expert_offsets, int32_t* workspace,
              int64_t workspace_elems, std::uintptr_t stream);

// Message for a moe_align return code.
const char* moe_align_error_string(int code);

}  // namespace cuda
}  // namespace kernswap
