// 16-bit float conversions shared by every tier, defined once.
//   bf16: round to nearest even by integer arithmetic, NaN kept a quiet NaN.
//   fp16: on x86 the compiler's _Float16 (GCC >= 12: one vcvtph2ps / vcvtps2ph per element in F16C builds, a
//   libgcc call in the scalar build); elsewhere (aarch64 g++ 12 defines __FLT16_MAX__ but has no _Float16 in
//   C++) bit manipulation with the same results: round to nearest even, subnormals, +-inf, quiet NaN
//   (tests/test_half_portable.py checks every half, and floats at every rounding boundary, against _Float16).
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

#if KS_X86 && defined(__FLT16_MAX__) && !defined(KS_PORTABLE_HALF)
#define KS_HAVE_FLOAT16 1
#else
#define KS_HAVE_FLOAT16 0
#endif

namespace kernswap {
namespace cpu {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if KS_HAVE_FLOAT16

inline float f16_to_f32(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}

inline uint16_t f32_to_f16(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

#else

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);  // inf, or a quiet NaN keeping its payload
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);  // rebias 15 -> 127
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: man * 2^-24, exact in fp32
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // quiet NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf (and inf)
  if (a < 0x38800000u) {  // below 2^-14: subnormal half (or zero); round man * 2^(e-126) to a multiple of 2^-24
    if (a < 0x33000000u) return sign;  // <= 2^-25 rounds to zero (2^-25 itself: tie to even 0)
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24: m * 2^(e-150) / 2^-24 = m >> (126 - e)
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return static_cast<uint16_t>(sign | (q + (rem > half || (rem == half && (q & 1u)))));
  }
  // normal: rebias 127 -> 15 and round the 13 dropped bits to nearest even (a carry into the exponent is right)
  const uint32_t r = a - 0x38000000u;
  return static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}

#endif

}  // namespace cpu
}  // namespace kernswap
