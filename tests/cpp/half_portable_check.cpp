// Checks the portable fp16 conversions of csrc/cpu/half.h (built with -DKS_PORTABLE_HALF, as on targets without
// _Float16) against the compiler's _Float16: every half, and floats at every fp16 rounding boundary.
// Run by tests/test_half_portable.py.
#include <cstdio>
#include <initializer_list>
#include "cpu/half.h"
#if KS_HAVE_FLOAT16
#error "compile with -DKS_PORTABLE_HALF"
#endif
int main() {
  using namespace kernswap::cpu;
  long bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 x; const uint16_t hh = static_cast<uint16_t>(h); std::memcpy(&x, &hh, 2);
    const float ref = static_cast<float>(x), got = f16_to_f32(hh);
    uint32_t a, b; std::memcpy(&a, &ref, 4); std::memcpy(&b, &got, 4);
    if (a != b && !(ref != ref && got != got) && bad++ < 5) std::printf("f16->f32 %04x: %08x vs %08x\n", h, a, b);
  }
  for (uint64_t u = 0; u < (1ull << 32); u += 4093) {  // stride < 2^13: every value of the upper 19 bits
    for (uint32_t d : {0u, 1u, 0xfffu, 0x1000u, 0x1001u}) {  // low 13 bits at the normal rounding boundaries
      const uint32_t v = (static_cast<uint32_t>(u) & ~0x1fffu) + d;
      float f; std::memcpy(&f, &v, 4);
      const _Float16 x = static_cast<_Float16>(f);
      uint16_t ref; std::memcpy(&ref, &x, 2);
      const uint16_t got = f32_to_f16(f);
      const bool nan = (ref & 0x7c00) == 0x7c00 && (ref & 0x3ff) && (got & 0x7c00) == 0x7c00 && (got & 0x3ff);
      if (ref != got && !nan && bad++ < 10) std::printf("f32->f16 %08x: %04x vs %04x\n", v, ref, got);
    }
  }
  std::printf("%ld mismatches\n", bad);
  return bad != 0;
}
