// Portable build of the fp32 GEMM (any x86-64).
#define KS_ISA_NS scalar
#include "cpu/sgemm_kernel_generic.h"
#include "cpu/sgemm_driver.h"
