#include "cpu/qlinear.h"

#include "cpu/dispatch.h"

namespace kernswap {
namespace cpu {
namespace {

// The AVX-512 engine multiplies with vpdpbusd (AVX512_VNNI); the avx2 build is the portable engine.
const Dispatch<void (*)(const QLinearArgs&)> kQLinear{"qlinear", {
    {Isa::Scalar, scalar::qlinear},
    {Isa::Avx2, KS_X86_KERNEL(avx2::qlinear)},
    {Isa::Avx512Vnni, KS_X86_KERNEL(avx512_vnni::qlinear)},
}};

}  // namespace

void qlinear(const QLinearArgs& args) { kQLinear(args); }

}  // namespace cpu
}  // namespace kernswap
