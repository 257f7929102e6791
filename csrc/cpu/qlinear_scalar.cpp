// Portable build of the quantized-linear engine (any x86-64).
#define KS_ISA_NS scalar
#include "cpu/qlinear_kernel_generic.h"
#include "cpu/qlinear_driver.h"
