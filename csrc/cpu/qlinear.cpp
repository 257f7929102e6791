#include "cpu/qlinear.h"

#include "cpu/dispatch.h"

namespace kernswap {
namespace cpu {
namespace {

// One engine per tier: vpmaddubsw at 256 (avx2) and 512 bits (avx512), vpdpbusd at 256 (avx_vnni) and 512 bits
// (avx512_vnni), AMX tiles for the dynamic-activation formats (amx).
const Dispatch<void (*)(const QLinearArgs&)> kQLinear{"qlinear", {
    {Isa::Scalar, scalar::qlinear},
    {Isa::Avx2, KS_X86_KERNEL(avx2::qlinear)},
    {Isa::AvxVnni, KS_X86_KERNEL(avx_vnni::qlinear)},
    {Isa::Avx512, KS_X86_KERNEL(avx512::qlinear)},
    {Isa::Avx512Vnni, KS_X86_KERNEL(avx512_vnni::qlinear)},
    {Isa::Amx, KS_AMX_KERNEL(amx::qlinear)},
}};

// Weight panels to fp32 (the weight-only runner's dense path); every build has one, vectorised per tier.
const Dispatch<void (*)(const QDequantArgs&)> kQDequant{"qdequant", {
    {Isa::Scalar, scalar::qdequant},
    {Isa::Avx2, KS_X86_KERNEL(avx2::qdequant)},

}};

}  // namespace

void qlinear(const QLinearArgs& args) { kQLinear(args); }
void qdequant(const QDequantArgs& args) { kQDequant(args); }

}  // namespace cpu
}  // namespace kernswap
