// Tier avx512 (AVX512F/BW/VL/DQ without VNNI: Skylake-SP / Skylake-X) of the quantized-linear engine: the AVX-512
// engine on vpmaddubsw + vpmaddwd (qlinear_kernel_avx512.h).
#define KS_ISA_NS avx512
#define KS_QL_VNNI 0
#include "cpu/qlinear_kernel_avx512.h"
#include "cpu/qlinear_driver.h"
