#include "cpu/attention.h"

#include "cpu/isa.h"

namespace kernswap {
namespace cpu {

void block_sparse_attention(const AttnArgs& args) {
  switch (active_isa()) {
    case Isa::Avx512Vnni: return avx512::block_sparse_attention(args);
    case Isa::Avx2: return avx2::block_sparse_attention(args);
    default: return scalar::block_sparse_attention(args);
  }
}

}  // namespace cpu
}  // namespace kernswap
