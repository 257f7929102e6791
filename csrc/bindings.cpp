// The kernswap._C module: CPU tier queries and the dispatch report here; each op's entry points come from its csrc/bind_<op>.cpp,
// registered through bind_registry.h. Tensors arrive as raw addresses (tensor.data_ptr()) plus sizes and
// strides; the Python side validates every argument before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "bind_registry.h"
#include "cpu/dispatch.h"

namespace py = pybind11;
using namespace kernswap::cpu;

namespace kernswap {
std::vector<BindFn>& binding_registry() {
  static std::vector<BindFn> fns;
  return fns;
}
}  // namespace kernswap

PYBIND11_MODULE(_C, m) {
  m.doc() = "kernswap CPU kernels (torch-free; raw pointers)";
  for (auto fn : kernswap::binding_registry()) fn(m);
  m.def("cpu_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); });
  m.def("supported_isas", &supported_isas);
  m.def("all_isas", &all_isas, "Every CPU tier this module knows, highest first (supported or not).");
  m.def(
      "set_isa",
      [](const std::string& name) {
        const std::string err = set_isa_override(name);
        if (!err.empty()) {
          std::string ok;
          for (const auto& s : supported_isas()) ok += "'" + s + "', ";
          throw std::invalid_argument("set_isa: " + err + "; expected one of " + ok + "or '' (auto)");
        }
      },
      py::arg("name"), "Force the CPU tier (a supported one, for tests); '' restores the automatic choice.");
  m.def(
      "cpu_features",
      [] {
        py::dict d;
        const uint32_t f = cpu_features();
        for (int i = 0; i < kNumFeatures; ++i) d[feature_name(i)] = bool(f & (1u << i));
        return d;
      },
      "CPU features detected at run time (cpuid/xgetbv; all False off x86): name -> present.");
  m.def(
      "op_isa",
      [](const std::string& op) {
        for (const OpTable* t : op_tables())
          if (op == t->name()) return std::string(isa_name(t->chosen(active_isa())));
        throw std::invalid_argument("op_isa: no CPU op named '" + op + "'");
      },
      py::arg("op"), "The tier a call of CPU op `op` runs now (the registry's choice for the active tier).");
  m.def(
      "dispatch_report",
      [] {
        py::dict out;
        for (const OpReport& r : dispatch_report()) {
          py::dict why;
          for (const auto& nt : r.not_taken) why[py::str(nt.first)] = nt.second;
          py::dict op;
          op["tier"] = r.tier;
          op["compiled"] = r.compiled;
          op["not_taken"] = why;
          out[py::str(r.op)] = op;
        }
        return out;
      },
      "Per CPU op: the tier a call runs now, the tiers with a kernel (highest first), and why each higher tier "
      "is not taken.");
}
