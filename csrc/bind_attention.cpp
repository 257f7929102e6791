// Binding of the block-sparse attention CPU kernel (kernswap._C.block_sparse_attention). Every buffer comes with
// its element count (bind_checks.h); shapes and strides are checked against them before the kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>

#include "bind_checks.h"
#include "bind_registry.h"
#include "cpu/attention.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using namespace kernswap::bind;
using kernswap::ptr_of;

namespace {

using S3 = std::array<int64_t, 3>;
using S4 = std::array<int64_t, 4>;

// q/k/v view (B, H, S, D) with (batch, head, seq) strides and a contiguous last dim inside `numel` elements.
void check_qkv(const char* fn, const char* name, uintptr_t p, int64_t numel, int64_t B, int64_t H, int64_t S,
               int64_t D, const S3& st) {
  const int64_t need_n = span(fn, name, {{B, st[0]}, {H, st[1]}, {S, st[2]}}, D);
  need(fn, name, p, numel, need_n, [&] {
    return dims({{"B", B}, {"H", H}, {"S", S}, {"D", D}, {"stride0", st[0]}, {"stride1", st[1]},
                 {"stride2", st[2]}});
  });
}

void attention_py(uintptr_t q, int64_t q_numel, uintptr_t k, int64_t k_numel, uintptr_t v, int64_t v_numel,
                  int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                  const S3& q_stride, const S3& k_stride, const S3& v_stride, uintptr_t mask, int64_t mask_numel,
                  const S4& mask_stride, int64_t block_size, bool causal, double scale, uintptr_t out,
                  int64_t out_numel, uintptr_t lse, int64_t lse_numel, int num_threads) {
  const char* fn = "block_sparse_attention";
  if (dtype < 0 || dtype > 2) fail(fn, "dtype code must be 0, 1 or 2, got " + std::to_string(dtype));
  at_least(fn, "B", B, 0);
  at_least(fn, "Hq", Hq, 0);
  at_least(fn, "Hkv", Hkv, 1);
  at_least(fn, "Sq", Sq, 0);
  at_least(fn, "Sk", Sk, 0);
  at_least(fn, "D", D, 1);
  if (Hq % Hkv != 0) fail(fn, "Hq=" + std::to_string(Hq) + " must be a multiple of Hkv=" + std::to_string(Hkv));
  if (block_size < 16 || block_size % 16 != 0)
    fail(fn, "block_size must be a positive multiple of 16, got " + std::to_string(block_size));
  if (causal && Sq > Sk) fail(fn, "causal needs Sq <= Sk, got Sq=" + std::to_string(Sq) + ", Sk=" + std::to_string(Sk));
  const int64_t rows = mul(fn, mul(fn, B, Hq), Sq);
  need(fn, "out_numel", out, out_numel, mul(fn, rows, D), [&] { return dims({{"B*Hq*Sq", rows}, {"D", D}}); });
  need(fn, "lse_numel", lse, lse_numel, rows, [&] { return dims({{"B*Hq*Sq", rows}}); });
  if (rows == 0) return;
  check_qkv(fn, "q_numel", q, q_numel, B, Hq, Sq, D, q_stride);
  check_qkv(fn, "k_numel", k, k_numel, B, Hkv, Sk, D, k_stride);
  check_qkv(fn, "v_numel", v, v_numel, B, Hkv, Sk, D, v_stride);
  const int64_t nqb = (Sq + block_size - 1) / block_size, nkb = (Sk + block_size - 1) / block_size;
  const S4& ms = mask_stride;
  need(fn, "mask_numel", mask, mask_numel,
       span(fn, "mask", {{B, ms[0]}, {Hq, ms[1]}, {nqb, ms[2]}, {nkb, ms[3]}}),
       [&] { return dims({{"B", B}, {"Hq", Hq}, {"query blocks", nqb}, {"key blocks", nkb}, {"stride0", ms[0]},
                          {"stride1", ms[1]}, {"stride2", ms[2]}, {"stride3", ms[3]}}); });
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
  m.def("block_sparse_attention", &attention_py, py::arg("q_ptr"), py::arg("q_numel"), py::arg("k_ptr"),
        py::arg("k_numel"), py::arg("v_ptr"), py::arg("v_numel"), py::arg("dtype"), py::arg("B"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"), py::arg("q_stride"), py::arg("k_stride"),
        py::arg("v_stride"), py::arg("mask_ptr"), py::arg("mask_numel"), py::arg("mask_stride"),
        py::arg("block_size"), py::arg("causal"), py::arg("scale"), py::arg("out_ptr"), py::arg("out_numel"),
        py::arg("lse_ptr"), py::arg("lse_numel"), py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
