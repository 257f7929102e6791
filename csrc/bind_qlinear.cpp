// Binding of the quantized-linear CPU kernel (kernswap._C.qlinear, kernswap._C.qdequant). Every buffer comes
// with its element count (bind_checks.h); the sizes are checked against them before the kernel runs.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bind_checks.h"
#include "bind_registry.h"
#include "cpu/qlinear.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using namespace kernswap::bind;
using kernswap::ptr_of;

namespace {

DType dtype_of(int code, const char* what) {
  if (code < 0 || code > 2) throw std::invalid_argument(std::string(what) + ": dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

void qlinear_py(uintptr_t x, int64_t x_numel, int x_dtype, int64_t M, int64_t K, int64_t x_row_stride,
                uintptr_t packed, int64_t packed_numel, int bits, int64_t group_size, int64_t N, uintptr_t scale,
                int64_t scale_numel, uintptr_t zero, int64_t zero_numel, bool zero_is_float, uintptr_t bias,
                int64_t bias_numel,
                uintptr_t y, int64_t y_numel, int y_dtype, int64_t y_row_stride, bool dynamic_act,
                int num_threads) {
  const char* fn = "qlinear";
  at_least(fn, "M", M, 0);
  at_least(fn, "K", K, 1);
  at_least(fn, "N", N, 1);
  check_weight(fn, packed, packed_numel, bits, group_size, N, K, scale, scale_numel, zero, zero_numel);
  if (bias) need(fn, "bias_numel", bias, bias_numel, N, [&] { return dims({{"N", N}}); });
  if (M > 1) at_least(fn, "y_row_stride", y_row_stride, N);  // rows must not overlap: threads write them
  need(fn, "x_numel", x, x_numel, span2(fn, "x", M, K, x_row_stride),
       [&] { return dims({{"M", M}, {"K", K}, {"x_row_stride", x_row_stride}}); });
  need(fn, "y_numel", y, y_numel, span2(fn, "y", M, N, y_row_stride),
       [&] { return dims({{"M", M}, {"N", N}, {"y_row_stride", y_row_stride}}); });
  QLinearArgs a{ptr_of<const void>(x), dtype_of(x_dtype, "x"), M, K, x_row_stride,
                ptr_of<const uint8_t>(packed), bits, group_size, N, ptr_of<const float>(scale),
                zero_is_float ? nullptr : ptr_of<const uint8_t>(zero), zero_is_float ? ptr_of<const float>(zero) : nullptr,
                ptr_of<const float>(bias), ptr_of<void>(y), dtype_of(y_dtype, "y"),
                y_row_stride, dynamic_act, num_threads < 1 ? 1 : num_threads};
  if (M == 0) return;
  py::gil_scoped_release release;
  qlinear(a);
}

void qdequant_py(uintptr_t packed, int64_t packed_numel, int bits, int64_t group_size, int64_t N, int64_t K,
                 uintptr_t scale, int64_t scale_numel, uintptr_t zero, int64_t zero_numel, bool zero_is_float,
                 int64_t n0, int64_t n1,
                 uintptr_t out, int64_t out_numel, int64_t ld, int num_threads) {
  const char* fn = "qdequant";
  at_least(fn, "K", K, 1);
  at_least(fn, "N", N, 1);
  at_least(fn, "ld", ld, K);
  if (n0 < 0 || n1 > N || n0 > n1)
    fail(fn, "rows must satisfy 0 <= n0 <= n1 <= N=" + std::to_string(N) + ", got n0=" + std::to_string(n0) +
                 ", n1=" + std::to_string(n1));
  check_weight(fn, packed, packed_numel, bits, group_size, N, K, scale, scale_numel, zero, zero_numel);
  need(fn, "out_numel", out, out_numel, span2(fn, "out", n1 - n0, K, ld),
       [&] { return dims({{"rows", n1 - n0}, {"K", K}, {"ld", ld}}); });
  QDequantArgs a{ptr_of<const uint8_t>(packed), bits, group_size, N, K, ptr_of<const float>(scale),
                 zero_is_float ? nullptr : ptr_of<const uint8_t>(zero), zero_is_float ? ptr_of<const float>(zero) : nullptr,
                 n0, n1, ptr_of<float>(out), ld, num_threads < 1 ? 1 : num_threads};
  if (n0 == n1) return;
  py::gil_scoped_release release;
  qdequant(a);
}

void bind(py::module_& m) {
  m.def("qdequant", &qdequant_py, py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("bits"),
        py::arg("group_size"), py::arg("N"), py::arg("K"), py::arg("scale_ptr"), py::arg("scale_numel"),
        py::arg("zero_ptr"), py::arg("zero_numel"), py::arg("zero_is_float"), py::arg("n0"), py::arg("n1"), py::arg("out_ptr"),
        py::arg("out_numel"), py::arg("ld"), py::arg("num_threads"));
  m.def("qlinear", &qlinear_py, py::arg("x_ptr"), py::arg("x_numel"), py::arg("x_dtype"), py::arg("M"),
        py::arg("K"), py::arg("x_row_stride"), py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("bits"),
        py::arg("group_size"), py::arg("N"), py::arg("scale_ptr"), py::arg("scale_numel"), py::arg("zero_ptr"),
        py::arg("zero_numel"), py::arg("zero_is_float"), py::arg("bias_ptr"), py::arg("bias_numel"), py::arg("y_ptr"), py::arg("y_numel"),
        py::arg("y_dtype"), py::arg("y_row_stride"), py::arg("dynamic_act"), py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
