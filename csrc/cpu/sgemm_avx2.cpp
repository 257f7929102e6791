// AVX2 + FMA build of the portable fp32 GEMM (compiled with -mavx2 -mfma -mf16c).
#define KS_ISA_NS avx2
#include "cpu/sgemm_kernel_generic.h"
#include "cpu/sgemm_driver.h"
