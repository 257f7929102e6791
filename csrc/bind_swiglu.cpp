// Binding of SwiGLU's elementwise half over rows (kernswap._C.swiglu_rows): out[m, :I] = silu(gu[m, :I]) *
// gu[m, I:2I], the fused gate/up output of an MLP read in place (row stride ld_gu), rows split over threads;
// raw addresses with their element counts, checked before any byte is read (bind_checks.h).
#include <pybind11/pybind11.h>

#include "bind_checks.h"
#include "bind_registry.h"
#include "cpu/moe.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using namespace kernswap::bind;
using kernswap::ptr_of;

namespace {

constexpr const char* kFn = "swiglu_rows";

void bind(py::module_& m) {
  m.def(
      kFn,
      [](int64_t M, int64_t I, uintptr_t gu, int64_t gu_numel, int64_t ld_gu, uintptr_t out, int64_t out_numel,
         int64_t ld_out, int num_threads) {
        at_least(kFn, "M", M, 0);
        at_least(kFn, "I", I, 0);
        if (M == 0 || I == 0) return;
        at_least(kFn, "ld_gu", ld_gu, mul(kFn, 2, I));
        if (M > 1) at_least(kFn, "ld_out", ld_out, I);  // rows must not overlap: threads write them
        const auto why = [&] { return dims({{"M", M}, {"I", I}, {"ld_gu", ld_gu}, {"ld_out", ld_out}}); };
        need(kFn, "gu_numel", gu, gu_numel, span2(kFn, "gu", M, mul(kFn, 2, I), ld_gu), why);
        need(kFn, "out_numel", out, out_numel, span2(kFn, "out", M, I, ld_out), why);
        const float* g = ptr_of<const float>(gu);
        float* o = ptr_of<float>(out);
        py::gil_scoped_release release;
        // one thread below ~64K elements: the pool's hand-off costs more than the rows take
        const int nt = mul(kFn, M, I) < (int64_t{1} << 16) || num_threads < 1 ? 1 : num_threads;
        kernswap::cpu::parallel_for(M, nt, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) kernswap::cpu::swiglu(g + r * ld_gu, g + r * ld_gu + I, o + r * ld_out, I);
        });
      },
      py::arg("M"), py::arg("I"), py::arg("gu_ptr"), py::arg("gu_numel"), py::arg("ld_gu"), py::arg("out_ptr"),
      py::arg("out_numel"), py::arg("ld_out"), py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
