// The kernswap._C module: CPU tier queries and the dispatch report here; each op's entry points come from its csrc/bind_<op>.cpp,
// registered through bind_registry.h. Tensors arrive as raw addresses (tensor.data_ptr()) with their element counts,
// sizes and strides; the Python side validates every argument first, and each binding checks again that the sizes
// fit the buffers before a kernel runs (bind_checks.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "bind_registry.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "cpu/parallel_host.h"

#include <atomic>
#include <vector>

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
  m.def("parallel_backend", [] { return parallel_backend(); },
        "What the CPU kernels' threads run on: torch's OpenMP team when the process has loaded one.");
  m.def(
      "parallel_selftest",
      [](int64_t n, int threads, bool nested) {
        if (n < 0 || n > (1 << 20)) throw std::invalid_argument("parallel_selftest: n must be in [0, 2^20]");
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        py::gil_scoped_release nogil;
        parallel_for(n, threads, [&](int64_t b, int64_t e) {
          if (!nested) {
            for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
            return;
          }
          parallel_for(e - b, threads, [&](int64_t b2, int64_t e2) {  // a kernel calling parallel_for again
            for (int64_t i = b + b2; i < b + e2; ++i) hits[i].fetch_add(1);
          });
        });
        int64_t once = 0;
        for (auto& h : hits) once += h.load() == 1;
        return once;
      },
      py::arg("n"), py::arg("threads"), py::arg("nested") = false,
      "Test hook: runs parallel_for over [0, n) (each part calling parallel_for again when nested) and returns "
      "how many indices ran exactly once (n when the split is right).");
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
