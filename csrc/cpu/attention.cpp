#include "cpu/attention.h"

#include "cpu/dispatch.h"

namespace kernswap {
namespace cpu {
namespace {

const Dispatch<void (*)(const AttnArgs&)> kAttention{"block_sparse_attention", {
    {Isa::Scalar, scalar::block_sparse_attention},
    {Isa::Avx2, KS_X86_KERNEL(avx2::block_sparse_attention)},
    {Isa::Avx512, KS_X86_KERNEL(avx512::block_sparse_attention)},
}};

}  // namespace

void block_sparse_attention(const AttnArgs& args) { kAttention(args); }

}  // namespace cpu
}  // namespace kernswap
