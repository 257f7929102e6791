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

}  // namespace cpu
}  // namespace kernswap
