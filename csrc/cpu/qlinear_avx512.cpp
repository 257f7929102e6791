// Tier avx512 (AVX512F/BW/VL/DQ without VNNI: Skylake-SP / Skylake-X) of the quantized-linear engine: the AVX-512
// engine on vpmaddubsw + vpmaddwd (qlinear_kernel_avx512.h).
#define KS_ISA_NS avx512
#define KS_QL_VNNI 0
#define KS_QL_NO_QDEQUANT  // the avx2 tier's vectorised tiles (the registry picks them)
#include "cpu/qlinear_kernel_avx512.h"
// Weight-only calls from 2 (int8) / 4 (int4) rows run the 512-bit fp32 FMA kernel (qlinear_fma_avx512.cpp): without
// VNNI the engine's three digit products per weight cost more than one FMA. Measured on a Xeon forced to this tier
// (2 threads, 4096 x 4096 and SmolLM2's 576/1536-wide shapes): the FMA kernel is 1.0-1.6x the engine at M = 2 for
// int8, 0.98-1.6x at M = 4 for int4, 1.5-4x from M = 16.
#define KS_QL_FMA_FROM_ROWS (a.bits == 8 ? 2 : 4)
#include "cpu/qlinear_driver.h"
