#include "cpu/isa.h"

#include <atomic>
#include <cpuid.h>
#include <cstdint>

namespace kernswap {
namespace cpu {
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::Scalar;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return Isa::Scalar;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::Scalar;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31), avx512vnni = c & (1u << 11);
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool avx512bf16 = a1 & (1u << 5);
  if (zmm_os && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni && avx512bf16 && fma && f16c)
    return Isa::Avx512Vnni;
  if (ymm_os && avx2 && fma && f16c) return Isa::Avx2;
  return Isa::Scalar;
}

std::atomic<int> g_override{-1};

}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  const int o = g_override.load(std::memory_order_relaxed);
  return o < 0 ? best_isa() : static_cast<Isa>(o);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return "avx512_vnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = static_cast<int>(best_isa()); i >= 0; --i) out.push_back(isa_name(static_cast<Isa>(i)));
  return out;
}

bool set_isa_override(const std::string& name) {
  if (name.empty()) {
    g_override.store(-1);
    return true;
  }
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i) {
    if (name == isa_name(static_cast<Isa>(i))) {
      g_override.store(i);
      return true;
    }
  }
  return false;
}

}  // namespace cpu
}  // namespace kernswap
