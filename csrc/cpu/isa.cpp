#include "cpu/isa.h"

#include <atomic>
#include <iterator>

#if KS_X86
#include <cpuid.h>
#endif
#if KS_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kernswap {
namespace cpu {
namespace {

constexpr const char* kFeatureNames[kNumFeatures] = {
    "AVX2", "FMA", "F16C", "OS_YMM_STATE", "AVX_VNNI", "AVX512F",
    "AVX512BW", "AVX512VL", "AVX512DQ", "OS_ZMM_STATE", "AVX512_VNNI", "AVX512_BF16",
    "AMX_TILE", "AMX_INT8", "OS_TILE_STATE"};

constexpr const char* kIsaNames[kNumIsas] = {"scalar", "avx2", "avx_vnni", "avx512", "avx512_vnni", "amx"};

// What each tier's translation units are compiled for (CMakeLists.txt gives the matching -m flags).
constexpr uint32_t kAvx2Tier = kAvx2 | kFma | kF16c | kOsYmmState;
constexpr uint32_t kAvx512Tier = kAvx2Tier | kAvx512F | kAvx512Bw | kAvx512Vl | kAvx512Dq | kOsZmmState;
constexpr uint32_t kTierFeatures[kNumIsas] = {0, kAvx2Tier, kAvx2Tier | kAvxVnni, kAvx512Tier,
                                              kAvx512Tier | kAvx512Vnni,
                                              kAvx512Tier | kAvx512Vnni | kAmxTile | kAmxInt8 | kOsTileState};

#if KS_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux hands out the AMX tile data state per process, on request (arch_prctl ARCH_REQ_XCOMP_PERM); without the
// grant the first tile instruction faults. Elsewhere the tier stays off.
bool tile_state_granted() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

uint32_t detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  uint32_t f = 0;
  bool tile_regs = false;
  if (c & (1u << 12)) f |= kFma;
  if (c & (1u << 29)) f |= kF16c;
  if (c & (1u << 27)) {  // OSXSAVE: xgetbv is available and says which register states the OS saves
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) == 0x6) f |= kOsYmmState;     // xmm + ymm
    if ((xcr0 & 0xe6) == 0xe6) f |= kOsZmmState;   // + opmask, zmm0-15 upper halves, zmm16-31
    tile_regs = (xcr0 & 0x60000) == 0x60000;       // XTILECFG + XTILEDATA
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    if (b & (1u << 5)) f |= kAvx2;
    if (b & (1u << 16)) f |= kAvx512F;
    if (b & (1u << 17)) f |= kAvx512Dq;
    if (b & (1u << 30)) f |= kAvx512Bw;
    if (b & (1u << 31)) f |= kAvx512Vl;
    if (c & (1u << 11)) f |= kAvx512Vnni;
    if (d & (1u << 24)) f |= kAmxTile;
    if (d & (1u << 25)) f |= kAmxInt8;
    const unsigned max_sub = a;
    if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) {
      if (a & (1u << 4)) f |= kAvxVnni;
      if (a & (1u << 5)) f |= kAvx512Bf16;
    }
  }
  if (tile_regs && (f & kAmxTile) && tile_state_granted()) f |= kOsTileState;
  return f;
}
#else
uint32_t detect() { return 0; }  // no x86 tiers to enable: scalar only
#endif

std::atomic<int> g_override{-1};

}  // namespace

const char* feature_name(int bit) { return bit >= 0 && bit < kNumFeatures ? kFeatureNames[bit] : "?"; }

std::string feature_names(uint32_t features) {
  std::string out;
  for (int i = 0; i < kNumFeatures; ++i) {
    if (!(features & (1u << i))) continue;
    if (!out.empty()) out += ", ";
    out += kFeatureNames[i];
  }
  return out;
}

uint32_t cpu_features() {
  static const uint32_t f = detect();
  return f;
}

uint32_t tier_features(Isa isa) { return kTierFeatures[static_cast<int>(isa)]; }

bool isa_supported(Isa isa) {
  const uint32_t need = tier_features(isa);
  return (cpu_features() & need) == need;
}

Isa best_isa() {
  for (int i = kNumIsas - 1; i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::Scalar;
}

Isa active_isa() {
  const int o = g_override.load(std::memory_order_relaxed);
  return o < 0 ? best_isa() : static_cast<Isa>(o);
}

bool isa_forced() { return g_override.load(std::memory_order_relaxed) >= 0; }

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = kNumIsas - 1; i >= 0; --i)
    if (isa_supported(static_cast<Isa>(i))) out.push_back(kIsaNames[i]);
  return out;
}

std::vector<std::string> all_isas() { return {std::rbegin(kIsaNames), std::rend(kIsaNames)}; }

std::string set_isa_override(const std::string& name) {
  if (name.empty()) {
    g_override.store(-1);
    return "";
  }
  std::string known;
  for (int i = 0; i < kNumIsas; ++i) {
    if (name == kIsaNames[i]) {
      const Isa isa = static_cast<Isa>(i);
      if (!isa_supported(isa))
        return "this CPU cannot run tier '" + name + "' (lacks " +
               feature_names(tier_features(isa) & ~cpu_features()) + ")";
      g_override.store(i);
      return "";
    }
    known += std::string(i ? ", " : "") + kIsaNames[i];
  }
  return "unknown tier '" + name + "' (tiers: " + known + ")";
}

}  // namespace cpu
}  // namespace kernswap
