#include "cpu/dispatch.h"

#include <cstdio>
#include <cstdlib>

namespace kernswap {
namespace cpu {
namespace {

std::vector<const OpTable*>& tables() {
  static std::vector<const OpTable*> t;  // function-local: filled during other files' static initialisation
  return t;
}

}  // namespace

const std::vector<const OpTable*>& op_tables() { return tables(); }

void OpTable::add(Isa t, bool present, uint32_t extra) {
  has_[static_cast<int>(t)] = present;
  extra_[static_cast<int>(t)] = extra;
}

void OpTable::finish() {
  if (!has_[0]) {  // a programming error in a table, caught by any import of the module
    std::fprintf(stderr, "kernswap: op table '%s' has no scalar kernel\n", name_);
    std::abort();
  }
  const uint32_t cpu = cpu_features();
  for (int a = 0; a < kNumIsas; ++a) {
    int t = a;
    while (t > 0 && !(has_[t] && (needs(static_cast<Isa>(t)) & ~cpu) == 0)) --t;
    pick_[a] = t;
  }
  tables().push_back(this);
}

std::vector<OpReport> dispatch_report() {
  const Isa active = active_isa();
  const uint32_t cpu = cpu_features();
  std::vector<OpReport> out;
  for (const OpTable* t : op_tables()) {
    OpReport r;
    r.op = t->name();
    const Isa chosen = t->chosen(active);
    r.tier = isa_name(chosen);
    for (int i = kNumIsas - 1; i >= 0; --i) {
      const Isa tier = static_cast<Isa>(i);
      if (t->has(tier)) r.compiled.push_back(isa_name(tier));
      if (i <= static_cast<int>(chosen)) continue;
      // The first condition that rules the tier out, in the order a developer would fix them.
      const uint32_t missing = t->needs(tier) & ~cpu;
      std::string why;
      if (!t->has(tier)) {
        why = std::string("no kernel for this tier (uses ") + r.tier + ")";
      } else if (missing) {
        why = "CPU lacks " + feature_names(missing);
      } else {  // runnable and registered, so above the active tier: set_isa lowered it
        why = std::string("forced by set_isa('") + isa_name(active) + "')";
      }
      r.not_taken.emplace_back(isa_name(tier), why);
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace cpu
}  // namespace kernswap
