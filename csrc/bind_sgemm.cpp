// Test-only binding of the fp32 GEMM (kernswap._C.sgemm_nn / sgemm_nt): raw addresses, sizes and leading
// dimensions, exactly the C++ API of csrc/cpu/sgemm.h. The caller owns the buffers' validity.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bind_registry.h"
#include "cpu/sgemm.h"

namespace py = pybind11;
using kernswap::ptr_of;

namespace {

void check(int64_t M, int64_t N, int64_t K, uintptr_t a, uintptr_t b, uintptr_t c) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("sgemm: sizes must be >= 0");
  if (M > 0 && N > 0 && (!c || (K > 0 && (!a || !b)))) throw std::invalid_argument("sgemm: null pointer");
}

void bind(py::module_& m) {
  m.def(
      "sgemm_nn",
      [](int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, uintptr_t c,
         int64_t ldc, bool accumulate) {
        check(M, N, K, a, b, c);
        py::gil_scoped_release release;
        kernswap::cpu::sgemm_nn(M, N, K, ptr_of<const float>(a), lda, ptr_of<const float>(b), ldb, ptr_of<float>(c),
                                ldc, accumulate);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a_ptr"), py::arg("lda"), py::arg("b_ptr"), py::arg("ldb"),
      py::arg("c_ptr"), py::arg("ldc"), py::arg("accumulate"));
  m.def(
      "sgemm_nt",
      [](int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t lda, uintptr_t bt, int64_t ldbt, uintptr_t c,
         int64_t ldc, bool accumulate) {
        check(M, N, K, a, bt, c);
        py::gil_scoped_release release;
        kernswap::cpu::sgemm_nt(M, N, K, ptr_of<const float>(a), lda, ptr_of<const float>(bt), ldbt,
                                ptr_of<float>(c), ldc, accumulate);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a_ptr"), py::arg("lda"), py::arg("bt_ptr"),
      py::arg("ldbt"), py::arg("c_ptr"), py::arg("ldc"), py::arg("accumulate"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
