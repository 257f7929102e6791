// Tier avx512_vnni (AVX512F/BW/VL/DQ + AVX512_VNNI: Cascade Lake, Ice Lake, Sapphire Rapids and later Xeons; Zen 4)
// of the quantized-linear engine: vpdpbusd (qlinear_kernel_avx512.h).
#define KS_ISA_NS avx512_vnni
#define KS_QL_VNNI 1
#define KS_QL_NO_QDEQUANT  // the avx512 tier's (no VNNI in it)
#include "cpu/qlinear_kernel_avx512.h"
#include "cpu/qlinear_driver.h"
