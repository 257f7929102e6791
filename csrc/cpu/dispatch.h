// The one registry of CPU kernels: each op declares ONE table, one line per (op, tier), e.g.
//
//   const Dispatch<QLinearFn> kQLinear{"qlinear", {
//       {Isa::Scalar, scalar::qlinear},
//       {Isa::Avx2, KS_X86_KERNEL(avx2::qlinear)},
//       {Isa::Avx512Vnni, KS_X86_KERNEL(avx512_vnni::qlinear)},
//   }};
//   kQLinear(args);  // calls the kernel of the highest registered tier <= active_isa() the CPU can run
//
// Adding a tier to an op: its kernel file (*_<tier>.cpp) and one line here. An entry may name features its
// kernel needs beyond its tier's ({Isa::Avx512, fn, kAvx512Bf16}); the CPU must have those too. Every table has
// a scalar entry: the portable reference, always runnable. Tables register themselves (op_tables()) so that
// dispatch_report() can say, per op, which tier runs and why each higher tier does not.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "cpu/isa.h"

// KS_X86_KERNEL(f): the x86 kernel f on x86 targets; nullptr (no kernel) elsewhere, where the x86 kernel files
// are not compiled and f does not exist.
#if KS_X86
#define KS_X86_KERNEL(f) f
#else
#define KS_X86_KERNEL(f) nullptr
#endif
// A kernel of the amx tier: present when CMake built the *_amx.cpp files (a compiler with the tile instructions).
#if KS_X86 && defined(KS_HAVE_AMX)
#define KS_AMX_KERNEL(f) f
#else
#define KS_AMX_KERNEL(f) nullptr
#endif

namespace kernswap {
namespace cpu {

// The type-independent part of a table: what the choice and the diagnostics need.
class OpTable {
 public:
  const char* name() const { return name_; }
  bool has(Isa t) const { return has_[static_cast<int>(t)]; }
  // Features the tier's kernel needs: its tier's plus those its entry names.
  uint32_t needs(Isa t) const { return tier_features(t) | extra_[static_cast<int>(t)]; }
  // The tier a call runs when `active` is the active tier: the highest registered tier <= active whose
  // needs the CPU meets.
  Isa chosen(Isa active) const { return static_cast<Isa>(pick_[static_cast<int>(active)]); }

 protected:
  explicit OpTable(const char* name) : name_(name) {}
  void add(Isa t, bool present, uint32_t extra);
  void finish();  // computes pick_ and registers the table (aborts if the scalar entry is missing)

 private:
  const char* name_;
  bool has_[kNumIsas] = {};
  uint32_t extra_[kNumIsas] = {};
  int pick_[kNumIsas] = {};
};

// Every table, in registration order (static initialisation of the kernel library).
const std::vector<const OpTable*>& op_tables();

template <class Fn>
class Dispatch : public OpTable {
 public:
  struct Entry {
    Isa tier;
    Fn fn;               // nullptr: no kernel (KS_X86_KERNEL off x86)
    uint32_t extra = 0;  // features needed beyond the tier's
  };

  Dispatch(const char* name, std::initializer_list<Entry> entries) : OpTable(name) {
    for (const Entry& e : entries) {
      fns_[static_cast<int>(e.tier)] = e.fn;
      add(e.tier, e.fn != nullptr, e.extra);
    }
    finish();
  }

  Fn kernel() const { return fns_[static_cast<int>(chosen(active_isa()))]; }

  template <class... A>
  auto operator()(A&&... args) const {
    return kernel()(std::forward<A>(args)...);
  }

 private:
  Fn fns_[kNumIsas] = {};
};

// Per op, for the diagnostics: the tier a call runs now, the tiers with a kernel (highest first), and for each
// tier above the chosen one why it is not taken (no kernel; else the CPU features it lacks; else set_isa).
struct OpReport {
  std::string op, tier;
  std::vector<std::string> compiled;
  std::vector<std::pair<std::string, std::string>> not_taken;  // (tier, reason), highest first
};
std::vector<OpReport> dispatch_report();

}  // namespace cpu
}  // namespace kernswap
