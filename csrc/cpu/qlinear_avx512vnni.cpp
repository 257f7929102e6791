// Tier avx512_vnni (AVX512F/BW/VL/DQ + AVX512_VNNI: Cascade Lake, Ice Lake, Sapphire Rapids and later Xeons; Zen 4)
// of the quantized-linear engine: vpdpbusd (qlinear_kernel_avx512.h).
#define KS_ISA_NS avx512_vnni
#define KS_QL_VNNI 1
#define KS_QL_NO_QDEQUANT  // the avx2 tier's vectorised tiles (the registry picks them)
#include "cpu/qlinear_kernel_avx512.h"
// No fp32 FMA route: vpdpbusd makes the engine's three digit products cheaper than the 512-bit FMA kernel at every
// M measured (Xeon, 2 threads, 4096 x 4096 and 576/1536-wide shapes, M = 1-256: the FMA kernel at 0.15-0.9x of the
// engine, 1.2x at one shape and M = 16).
#include "cpu/qlinear_driver.h"
