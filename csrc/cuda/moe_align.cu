// kernswap: MoE pair alignment on the GPU (torch-free; see moe_align.cuh).
//
// Three launches on one stream, no host synchronisation:
//  1. count:   CTA b histograms the expert ids of pairs [b*C, (b+1)*C) in shared memory -> ws[b][e].
//  2. scan:    one CTA.  Per expert, an exclusive prefix of ws[.][e] over the CTAs (pair order) and the total
//              count; a block-wide exclusive scan of the block-padded counts gives expert_offsets; ws[b][e]
//              becomes the absolute position of CTA b's first pair of expert e.  Writes the sentinel into every
//              padding slot and into the tail [offsets[E], sorted_len).
//  3. scatter: CTA b again; each of its warps owns a contiguous run of C / kWarps pairs.  Within a warp, lanes
//              with the same expert find each other with __match_any_sync; their rank is the popcount of the
//              lower peers.  Per-warp counts in shared memory, prefixed over the warps, keep the order stable.
// Every pair position is written exactly once; ids outside [0, E) are skipped in all passes.
#include <cuda_runtime.h>

#include <cstdint>

#include "moe_align.cuh"

namespace kernswap {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kScanThreads = 1024;
constexpr int64_t kRun = kMoeAlignChunk / kWarps;  // pairs per warp in the scatter pass
static_assert(kMoeAlignChunk % (kWarps * 32) == 0, "chunk must split into whole warp steps");

__device__ __forceinline__ int expert_of(const int32_t* ids, int64_t i, int64_t P, int E) {
  if (i >= P) return -1;
  const int e = ids[i];
  return (e >= 0 && e < E) ? e : -1;
}

__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t P, int E, int32_t* __restrict__ ws) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kMoeAlignChunk;
  const int64_t end = begin + kMoeAlignChunk < P ? begin + kMoeAlignChunk : P;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int e = expert_of(ids, i, P, E);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  int32_t* row = ws + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) row[e] = hist[e];
}

__global__ void scan_kernel(int32_t* __restrict__ ws, int nblocks, int E, int bs, int32_t sentinel,
                            int32_t* __restrict__ offsets, int32_t* __restrict__ sorted, int64_t sorted_len) {
  __shared__ int32_t count[kMoeAlignMaxExperts];
  __shared__ int32_t start[kMoeAlignMaxExperts];
  __shared__ int32_t part[kScanThreads];
  const int tid = threadIdx.x;
  // per expert: exclusive prefix over the CTAs (in place) and the total
  for (int e = tid; e < E; e += blockDim.x) {
    int32_t run = 0;
    for (int b = 0; b < nblocks; ++b) {
      const int32_t c = ws[static_cast<int64_t>(b) * E + e];
      ws[static_cast<int64_t>(b) * E + e] = run;
      run += c;
    }
    count[e] = run;
  }
  __syncthreads();
  // exclusive scan of the padded counts: each thread a contiguous range of experts, then a scan of the ranges
  const int per = (E + blockDim.x - 1) / blockDim.x;
  const int e0 = tid * per < E ? tid * per : E;
  const int e1 = e0 + per < E ? e0 + per : E;
  int32_t local = 0;
  for (int e = e0; e < e1; ++e) local += (count[e] + bs - 1) / bs * bs;
  part[tid] = local;
  __syncthreads();
  for (int d = 1; d < static_cast<int>(blockDim.x); d <<= 1) {  // Hillis-Steele inclusive scan
    const int32_t v = tid >= d ? part[tid - d] : 0;
    __syncthreads();
    part[tid] += v;
    __syncthreads();
  }
  int32_t run = part[tid] - local;
  for (int e = e0; e < e1; ++e) {
    start[e] = run;
    offsets[e] = run;
    run += (count[e] + bs - 1) / bs * bs;
  }
  const int32_t total = part[blockDim.x - 1];
  if (tid == 0) offsets[E] = total;
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) {
    const int32_t s = start[e];
    for (int b = 0; b < nblocks; ++b) ws[static_cast<int64_t>(b) * E + e] += s;
    const int32_t pad_end = s + (count[e] + bs - 1) / bs * bs;
    for (int32_t p = s + count[e]; p < pad_end; ++p) sorted[p] = sentinel;
  }
  for (int64_t p = total + tid; p < sorted_len; p += blockDim.x) sorted[p] = sentinel;
}

__global__ void scatter_kernel(const int32_t* __restrict__ ids, int64_t P, int E, const int32_t* __restrict__ ws,
                               int32_t* __restrict__ sorted) {
  extern __shared__ int32_t warp_pos[];  // [kWarps][E]: per-warp count, then its next position per expert
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const unsigned lower = (1u << lane) - 1u;
  for (int i = threadIdx.x; i < kWarps * E; i += blockDim.x) warp_pos[i] = 0;
  __syncthreads();
  int32_t* mine = warp_pos + warp * E;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kMoeAlignChunk + warp * kRun;
  for (int64_t s = 0; s < kRun; s += 32) {
    const int e = expert_of(ids, begin + s + lane, P, E);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();
  const int32_t* base = ws + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t run = base[e];
    for (int w = 0; w < kWarps; ++w) {
      const int32_t c = warp_pos[w * E + e];
      warp_pos[w * E + e] = run;
      run += c;
    }
  }
  __syncthreads();
  for (int64_t s = 0; s < kRun; s += 32) {
    const int64_t i = begin + s + lane;
    const int e = expert_of(ids, i, P, E);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) sorted[mine[e] + __popc(peers & lower)] = static_cast<int32_t>(i);
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

int64_t moe_align_max_padded(int64_t num_pairs, int64_t num_experts, int64_t block_size) {
  if (num_pairs <= 0) return 0;
  const int64_t nonempty = num_experts < num_pairs ? num_experts : num_pairs;
  const int64_t a = num_pairs * block_size;
  const int64_t b = num_pairs + nonempty * (block_size - 1);
  return a < b ? a : b;
}

int64_t moe_align_workspace_elems(int64_t num_pairs, int64_t num_experts) {
  return (num_pairs + kMoeAlignChunk - 1) / kMoeAlignChunk * num_experts;
}

const char* moe_align_error_string(int code) {
  switch (code) {
    case 0: return "success";
    case -1: return "moe_align: num_experts must be in [1, 1024]";
    case -2: return "moe_align: block_size must be in [1, 4096]";
    case -3: return "moe_align: num_pairs must be in [0, 2**30] and the padded total must fit in int32";
    case -4: return "moe_align: sorted_len is smaller than moe_align_max_padded(num_pairs, num_experts, block_size)";
    case -5: return "moe_align: workspace_elems is smaller than moe_align_workspace_elems(num_pairs, num_experts)";
    case -6: return "moe_align: a required pointer is null";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "moe_align: unknown error";
  }
}

int moe_align(const int32_t* topk_ids, int64_t num_pairs, int64_t num_experts, int64_t block_size,
              int32_t* sorted_pair_ids, int64_t sorted_len, int32_t* expert_offsets, int32_t* workspace,
              int64_t workspace_elems, std::uintptr_t stream) {
  if (num_experts < 1 || num_experts > kMoeAlignMaxExperts) return -1;
  if (block_size < 1 || block_size > 4096) return -2;
  if (num_pairs < 0 || num_pairs > (int64_t(1) << 30)) return -3;
  const int64_t need = moe_align_max_padded(num_pairs, num_experts, block_size);
  if (need > INT32_MAX) return -3;
  if (sorted_len < need || sorted_len > INT32_MAX) return -4;
  if (workspace_elems < moe_align_workspace_elems(num_pairs, num_experts)) return -5;
  if (!expert_offsets || (sorted_len > 0 && !sorted_pair_ids) || (num_pairs > 0 && (!topk_ids || !workspace)))
    return -6;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int E = static_cast<int>(num_experts);
  const int nblocks = static_cast<int>((num_pairs + kMoeAlignChunk - 1) / kMoeAlignChunk);
  if (nblocks > 0) {
    count_kernel<<<nblocks, kThreads, E * sizeof(int32_t), st>>>(topk_ids, num_pairs, E, workspace);
  }
  scan_kernel<<<1, kScanThreads, 0, st>>>(workspace, nblocks, E, static_cast<int>(block_size),
                                          static_cast<int32_t>(num_pairs), expert_offsets, sorted_pair_ids,
                                          sorted_len);
  if (nblocks > 0) {
    scatter_kernel<<<nblocks, kThreads, kWarps * E * sizeof(int32_t), st>>>(topk_ids, num_pairs, E, workspace,
                                                                             sorted_pair_ids);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace kernswap
