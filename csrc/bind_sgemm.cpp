// Test-only binding of the fp32 GEMM (kernswap._C.sgemm_nn / sgemm_nt): raw addresses with their element counts,
// sizes and leading dimensions, the C++ API of csrc/cpu/sgemm.h; the operands are checked against the counts.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bind_checks.h"
#include "bind_registry.h"
#include "cpu/sgemm.h"

namespace py = pybind11;
using namespace kernswap::bind;
using kernswap::ptr_of;

namespace {

// A [M, K] (lda), B [K, N] (ldb) or Bt [N, K] (ldb), C [M, N] (ldc).
void check(const char* fn, bool bt, int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t a_numel, int64_t lda,
           uintptr_t b, int64_t b_numel, int64_t ldb, uintptr_t c, int64_t c_numel, int64_t ldc) {
  at_least(fn, "M", M, 0);
  at_least(fn, "N", N, 0);
  at_least(fn, "K", K, 0);
  if (M == 0 || N == 0) return;
  if (M > 1) at_least(fn, "ldc", ldc, N);
  const auto mnk = [&] { return dims({{"M", M}, {"N", N}, {"K", K}, {"lda", lda}, {"ldb", ldb}, {"ldc", ldc}}); };
  need(fn, "c_numel", c, c_numel, span2(fn, "c", M, N, ldc), mnk);
  need(fn, "a_numel", a, a_numel, span2(fn, "a", M, K, lda), mnk);
  need(fn, "b_numel", b, b_numel, bt ? span2(fn, "b", N, K, ldb) : span2(fn, "b", K, N, ldb), mnk);
}

void bind(py::module_& m) {
  m.def(
      "sgemm_nn",
      [](int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t a_numel, int64_t lda, uintptr_t b, int64_t b_numel,
         int64_t ldb, uintptr_t c, int64_t c_numel, int64_t ldc, bool accumulate) {
        check("sgemm_nn", false, M, N, K, a, a_numel, lda, b, b_numel, ldb, c, c_numel, ldc);
        if (M == 0 || N == 0) return;
        py::gil_scoped_release release;
        kernswap::cpu::sgemm_nn(M, N, K, ptr_of<const float>(a), lda, ptr_of<const float>(b), ldb, ptr_of<float>(c),
                                ldc, accumulate);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a_ptr"), py::arg("a_numel"), py::arg("lda"),
      py::arg("b_ptr"), py::arg("b_numel"), py::arg("ldb"), py::arg("c_ptr"), py::arg("c_numel"), py::arg("ldc"),
      py::arg("accumulate"));
  m.def(
      "sgemm_nt",
      [](int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t a_numel, int64_t lda, uintptr_t bt, int64_t bt_numel,
         int64_t ldbt, uintptr_t c, int64_t c_numel, int64_t ldc, bool accumulate) {
        check("sgemm_nt", true, M, N, K, a, a_numel, lda, bt, bt_numel, ldbt, c, c_numel, ldc);
        if (M == 0 || N == 0) return;
        py::gil_scoped_release release;
        kernswap::cpu::sgemm_nt(M, N, K, ptr_of<const float>(a), lda, ptr_of<const float>(bt), ldbt,
                                ptr_of<float>(c), ldc, accumulate);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a_ptr"), py::arg("a_numel"), py::arg("lda"),
      py::arg("bt_ptr"), py::arg("bt_numel"), py::arg("ldbt"), py::arg("c_ptr"), py::arg("c_numel"), py::arg("ldc"),
      py::arg("accumulate"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
