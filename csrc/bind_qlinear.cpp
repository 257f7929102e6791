// Binding of the quantized-linear CPU kernel (kernswap._C.qlinear).
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bind_registry.h"
#include "cpu/qlinear.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using kernswap::ptr_of;

namespace {

DType dtype_of(int code, const char* what) {
  if (code < 0 || code > 2) throw std::invalid_argument(std::string(what) + ": dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

void qlinear_py(uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t x_row_stride, uintptr_t packed, int bits,
                int64_t group_size, int64_t N, uintptr_t scale, uintptr_t zero, uintptr_t bias, uintptr_t y,
                int y_dtype, int64_t y_row_stride, bool dynamic_act, int num_threads) {
  // Last line of defence only: the Python wrapper raises precise errors before we get here.
  if (bits != 8 && bits != 4) throw std::invalid_argument("qlinear: bits must be 8 or 4");
  if (M < 0 || K <= 0 || N <= 0) throw std::invalid_argument("qlinear: sizes must be positive");
  if (bits == 4 && (group_size <= 0 || group_size % 32 != 0 || K % group_size != 0))
    throw std::invalid_argument("qlinear: int4 needs group_size % 32 == 0 and K % group_size == 0");
  if (!x || !packed || !scale || !y) throw std::invalid_argument("qlinear: null pointer");
  QLinearArgs a{ptr_of<const void>(x), dtype_of(x_dtype, "x"), M, K, x_row_stride,
                ptr_of<const uint8_t>(packed), bits, group_size, N, ptr_of<const float>(scale),
                ptr_of<const uint8_t>(zero), ptr_of<const float>(bias), ptr_of<void>(y), dtype_of(y_dtype, "y"),
                y_row_stride, dynamic_act, num_threads < 1 ? 1 : num_threads};
  py::gil_scoped_release release;
  qlinear(a);
}

void qdequant_py(uintptr_t packed, int bits, int64_t group_size, int64_t N, int64_t K, uintptr_t scale, uintptr_t zero,
                 int64_t n0, int64_t n1, uintptr_t out, int64_t ld, int num_threads) {
  if (bits != 8 && bits != 4) throw std::invalid_argument("qdequant: bits must be 8 or 4");
  if (K <= 0 || N <= 0 || ld < K) throw std::invalid_argument("qdequant: sizes must be positive and ld >= K");
  if (n0 < 0 || n1 > N || n0 > n1) throw std::invalid_argument("qdequant: rows must satisfy 0 <= n0 <= n1 <= N");
  if (bits == 4 && (group_size <= 0 || group_size % 32 != 0 || K % group_size != 0))
    throw std::invalid_argument("qdequant: int4 needs group_size % 32 == 0 and K % group_size == 0");
  if (!packed || !scale || !out) throw std::invalid_argument("qdequant: null pointer");
  QDequantArgs a{ptr_of<const uint8_t>(packed), bits, group_size, N, K, ptr_of<const float>(scale),
                 ptr_of<const uint8_t>(zero), n0, n1, ptr_of<float>(out), ld, num_threads < 1 ? 1 : num_threads};
  py::gil_scoped_release release;
  qdequant(a);
}

void bind(py::module_& m) {
  m.def("qdequant", &qdequant_py, py::arg("packed_ptr"), py::arg("bits"), py::arg("group_size"), py::arg("N"),
        py::arg("K"), py::arg("scale_ptr"), py::arg("zero_ptr"), py::arg("n0"), py::arg("n1"), py::arg("out_ptr"),
        py::arg("ld"), py::arg("num_threads"));
  m.def("qlinear", &qlinear_py, py::arg("x_ptr"), py::arg("x_dtype"), py::arg("M"), py::arg("K"),
        py::arg("x_row_stride"), py::arg("packed_ptr"), py::arg("bits"), py::arg("group_size"), py::arg("N"),
        py::arg("scale_ptr"), py::arg("zero_ptr"), py::arg("bias_ptr"), py::arg("y_ptr"), py::arg("y_dtype"),
        py::arg("y_row_stride"), py::arg("dynamic_act"), py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
