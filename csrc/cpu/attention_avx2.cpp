// AVX2 + FMA build of the portable block-sparse attention (compiled with -mavx2 -mfma -mf16c).
#define KS_ISA_NS avx2
#include "cpu/attention_kernel_generic.h"
#include "cpu/attention_driver.h"
