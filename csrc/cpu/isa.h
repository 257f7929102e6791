// Run-time CPU feature detection and the instruction-set tiers of the CPU kernels. The tier a kernel uses is
// chosen from what this processor and OS report (cpuid + xgetbv), never from the build machine's flags; the
// registry that maps (op, tier) to a kernel is dispatch.h.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// KS_X86: the target is x86-64. Only code under this guard (and the *_avx*.cpp files, which CMake compiles
// only for x86 targets) may use x86 intrinsics, cpuid or xgetbv: the package builds everywhere else with the
// scalar tier alone.
#if defined(__x86_64__) || defined(_M_X64)
#define KS_X86 1
#else
#define KS_X86 0
#endif

namespace kernswap {
namespace cpu {

// Tiers in increasing order. Each tier is a set of CPU features (tier_features) and a kernel namespace /
// file suffix: scalar (any CPU), avx2 (*_avx2.cpp), avx_vnni (*_avxvnni.cpp), avx512 (*_avx512.cpp),
// avx512_vnni (*_avx512vnni.cpp), amx (*_amx.cpp: avx512_vnni + AMX tiles with int8 products, Sapphire Rapids
// and later Xeons; Linux only, where the process is granted the tile state). A higher tier does not imply the lower
// ones (a Cascade Lake has avx512_vnni but not avx_vnni), so "supported" is checked per tier.
enum class Isa : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512 = 3, Avx512Vnni = 4, Amx = 5 };
constexpr int kNumIsas = 6;

// CPU features, one bit each. The OS_*_STATE bits say that the OS saves the wide registers (xgetbv).
enum Feature : uint32_t {
  kAvx2 = 1u << 0,
  kFma = 1u << 1,
  kF16c = 1u << 2,
  kOsYmmState = 1u << 3,
  kAvxVnni = 1u << 4,
  kAvx512F = 1u << 5,
  kAvx512Bw = 1u << 6,
  kAvx512Vl = 1u << 7,
  kAvx512Dq = 1u << 8,
  kOsZmmState = 1u << 9,
  kAvx512Vnni = 1u << 10,
  kAvx512Bf16 = 1u << 11,  // detected and reported; no tier requires it
  kAmxTile = 1u << 12,
  kAmxInt8 = 1u << 13,
  kOsTileState = 1u << 14,  // the OS saves the tile registers (xgetbv) and granted this process their use
};
constexpr int kNumFeatures = 15;

const char* feature_name(int bit);            // "AVX2", "AVX512_VNNI", ... for bit index 0..kNumFeatures-1
std::string feature_names(uint32_t features);  // "AVX512F, AVX512BW" (in bit order)
uint32_t cpu_features();                      // what this CPU + OS offer (0 off x86)

uint32_t tier_features(Isa isa);  // features a tier's kernels are compiled for
bool isa_supported(Isa isa);      // the CPU has every feature of the tier
Isa best_isa();                   // highest supported tier
Isa active_isa();                 // best_isa() unless forced by set_isa_override
bool isa_forced();                // set_isa_override holds a tier
// "" restores auto; otherwise the name must be a supported tier. Returns "" on success, else why not.
std::string set_isa_override(const std::string& name);
const char* isa_name(Isa isa);
std::vector<std::string> supported_isas();  // every supported tier, highest first
std::vector<std::string> all_isas();        // every tier, highest first

}  // namespace cpu
}  // namespace kernswap
