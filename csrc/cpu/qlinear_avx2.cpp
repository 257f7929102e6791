// AVX2 + FMA build of the portable quantized-linear engine (compiled with -mavx2 -mfma -mf16c).
#define KS_ISA_NS avx2
#include "cpu/qlinear_kernel_generic.h"
#include "cpu/qlinear_driver.h"
