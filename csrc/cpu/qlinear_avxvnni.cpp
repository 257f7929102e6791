// Tier avx_vnni (AVX2 + FMA + AVX-VNNI, VEX vpdpbusd on ymm: Alder Lake and later clients, Sierra Forest) of the
// quantized-linear engine (qlinear_kernel_avx2.h). Weight-only calls from KS_QL_FMA_FROM_ROWS rows run the avx2
// tier's fp32 FMA kernel (no VNNI in it), and qdequant is the avx2 tier's (the registry picks it).
#define KS_ISA_NS avx_vnni
#define KS_QL_VNNI 1
#include "cpu/qlinear_kernel_avx2.h"

namespace kernswap {
namespace cpu {
namespace avx_vnni {
inline void qlinear_fma(const QLinearArgs& a) { avx2::qlinear_fma(a); }
}  // namespace avx_vnni
}  // namespace cpu
}  // namespace kernswap

#define KS_QL_BLOCK_BYTES (256 << 10)  // the weight block of a task: these clients have 1.25-2 MiB of L2 per P-core
// The avx2 tier's row counts: measured on a Xeon forced to this tier (2 threads), the vpdpbusd engine and the fp32
// FMA kernel are within 10% of each other at 8-16 rows on 4096 x 4096, and the FMA kernel is 1.5-2x faster there
// on the 576-wide shapes.
#define KS_QL_FMA_FROM_ROWS (a.bits == 8 ? 8 : 16)
#define KS_QL_NO_QDEQUANT
#include "cpu/qlinear_driver.h"
