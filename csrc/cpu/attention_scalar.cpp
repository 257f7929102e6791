// Portable build of the block-sparse attention (any x86-64).
#define KS_ISA_NS scalar
#include "cpu/attention_kernel_generic.h"
#include "cpu/attention_driver.h"
