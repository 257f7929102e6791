// Binding of the block-sparse attention CPU kernel (kernswap._C.block_sparse_attention).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>

#include "bind_registry.h"
#include "cpu/attention.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using kernswap::ptr_of;

namespace {

using S3 = std::array<int64_t, 3>;
using S4 = std::array<int64_t, 4>;

void attention_py(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq,
                  int64_t Sk, int64_t D, const S3& q_stride, const S3& k_stride, const S3& v_stride, uintptr_t mask,
                  const S4& mask_stride, int64_t block_size, bool causal, double scale, uintptr_t out, uintptr_t lse,
                  int num_threads) {
  // Last line of defence only: the Python side validates every argument first.
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("block_sparse_attention: dtype code must be 0, 1 or 2");
  if (B < 0 || Hq < 0 || Hkv <= 0 || Sq < 0 || Sk < 0 || D <= 0 || Hq % Hkv != 0)
    throw std::invalid_argument("block_sparse_attention: bad sizes");
  if (block_size < 16 || block_size % 16 != 0)
    throw std::invalid_argument("block_sparse_attention: block_size must be a positive multiple of 16");
  if (causal && Sq > Sk) throw std::invalid_argument("block_sparse_attention: causal needs Sq <= Sk");
  if (B * Hq * Sq > 0 && (!q || !out || !lse || (Sk > 0 && (!k || !v || !mask))))
    throw std::invalid_argument("block_sparse_attention: null pointer");
  AttnArgs a{ptr_of<const void>(q), ptr_of<const void>(k), ptr_of<const void>(v), static_cast<DType>(dtype),
             B, Hq, Hkv, Sq, Sk, D,
             {q_stride[0], q_stride[1], q_stride[2]}, {k_stride[0], k_stride[1], k_stride[2]},
             {v_stride[0], v_stride[1], v_stride[2]}, ptr_of<const uint8_t>(mask),
             {mask_stride[0], mask_stride[1], mask_stride[2], mask_stride[3]}, block_size, causal,
             static_cast<float>(scale), ptr_of<void>(out), ptr_of<float>(lse), num_threads < 1 ? 1 : num_threads};
  py::gil_scoped_release release;
  block_sparse_attention(a);
}

void bind(py::module_& m) {
  m.def("block_sparse_attention", &attention_py, py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"),
        py::arg("q_stride"), py::arg("k_stride"), py::arg("v_stride"), py::arg("mask_ptr"), py::arg("mask_stride"),
        py::arg("block_size"), py::arg("causal"), py::arg("scale"), py::arg("out_ptr"), py::arg("lse_ptr"),
        py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
