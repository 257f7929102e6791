// The kernswap._C module: ISA queries here; each op's entry points come from its csrc/bind_<op>.cpp,
// registered through bind_registry.h. Tensors arrive as raw addresses (tensor.data_ptr()) plus sizes and
// strides; the Python side validates every argument before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "bind_registry.h"
#include "cpu/isa.h"

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
  m.def("set_isa", [](const std::string& name) {
    if (!set_isa_override(name))
      throw std::invalid_argument("set_isa: expected one of the supported ISAs or '', got '" + name + "'");
  });
}
