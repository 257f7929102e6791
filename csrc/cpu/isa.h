// Run-time CPU feature detection. The ISA a kernel uses is chosen from what this processor and OS report
// (cpuid + xgetbv), never from the build machine's flags.
#pragma once
#include <string>
#include <vector>

namespace kernswap {
namespace cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

Isa best_isa();                      // highest ISA usable on this machine
Isa active_isa();                    // best_isa() unless lowered by set_isa_override
bool set_isa_override(const std::string& name);  // "" restores auto; false if name unknown/unsupported
const char* isa_name(Isa isa);
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace kernswap
