#include "cpu/qlinear.h"

#include "cpu/isa.h"

namespace kernswap {
namespace cpu {

void qlinear(const QLinearArgs& args) {
  switch (active_isa()) {
    case Isa::Avx512Vnni: return avx512::qlinear(args);
    case Isa::Avx2: return avx2::qlinear(args);
    default: return scalar::qlinear(args);
  }
}

void qdequant(const QDequantArgs& args) {
  switch (active_isa()) {
    case Isa::Avx512Vnni: return avx512::qdequant(args);
    case Isa::Avx2: return avx2::qdequant(args);
    default: return scalar::qdequant(args);
  }
}

}  // namespace cpu
}  // namespace kernswap
