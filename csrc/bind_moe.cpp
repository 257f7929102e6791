// Bindings of the fused-MoE CPU kernels (kernswap._C.moe_*). Raw addresses from tensor.data_ptr(); the
// Python side (python/kernswap/backends/moe_cpu.py) validates shapes, dtypes and contents before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>

#include "bind_registry.h"
#include "cpu/moe.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using kernswap::ptr_of;

namespace {

// (packed_ptr, packed_stride_bytes, scale_ptr, scale_stride_floats, zero_ptr, zero_stride_bytes, bits,
//  group_size, dynamic_act); bits == 0: float weights.
using QTuple = std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, int, int64_t, bool>;

DType dtype_of(int code, const char* what) {
  if (code < 0 || code > 2) throw std::invalid_argument(std::string(what) + ": dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

MoEQuantWeight qweight_of(const QTuple& t, const char* what) {
  MoEQuantWeight q;
  q.packed = ptr_of<const uint8_t>(std::get<0>(t));
  q.packed_stride = std::get<1>(t);
  q.scale = ptr_of<const float>(std::get<2>(t));
  q.scale_stride = std::get<3>(t);
  q.zero = ptr_of<const uint8_t>(std::get<4>(t));
  q.zero_stride = std::get<5>(t);
  q.bits = std::get<6>(t);
  q.group_size = std::get<7>(t);
  q.dynamic_act = std::get<8>(t);
  if (q.bits != 0 && q.bits != 4 && q.bits != 8)
    throw std::invalid_argument(std::string(what) + ": bits must be 0, 4 or 8");
  if (q.bits != 0 && (!q.packed || !q.scale)) throw std::invalid_argument(std::string(what) + ": null pointer");
  return q;
}

void route_py(uintptr_t logits, int64_t T, int64_t E, int64_t ld, int64_t top_k, int scoring, bool renormalize,
              uintptr_t bias, uintptr_t weights, uintptr_t ids, int num_threads) {
  if (scoring < 0 || scoring > 2) throw std::invalid_argument("moe_route: scoring must be 0, 1 or 2");
  if (T < 0 || E <= 0 || top_k <= 0 || top_k > E) throw std::invalid_argument("moe_route: bad sizes");
  if (T > 0 && (!logits || !weights || !ids)) throw std::invalid_argument("moe_route: null pointer");
  py::gil_scoped_release release;
  moe_route(ptr_of<const float>(logits), T, E, ld, top_k, static_cast<MoEScoring>(scoring), renormalize,
            ptr_of<const float>(bias), ptr_of<float>(weights), ptr_of<int32_t>(ids), num_threads < 1 ? 1 : num_threads);
}

int64_t align_py(uintptr_t ids, int64_t P, int64_t E, uintptr_t sorted, uintptr_t offsets) {
  if (P < 0 || E <= 0) throw std::invalid_argument("moe_align: bad sizes");
  if (!offsets || (P > 0 && (!ids || !sorted))) throw std::invalid_argument("moe_align: null pointer");
  py::gil_scoped_release release;
  return moe_align(ptr_of<const int32_t>(ids), P, E, ptr_of<int32_t>(sorted), ptr_of<int32_t>(offsets));
}

MoEExpertsArgs experts_args(uintptr_t x, int x_dtype, int64_t T, int64_t H, int64_t I, int64_t E, int64_t top_k,
                            int64_t x_row_stride, uintptr_t sorted, uintptr_t offsets, uintptr_t w_gate_up,
                            uintptr_t w_down, int w_dtype, const QTuple& q_gate_up, const QTuple& q_down,
                            int num_threads) {
  if (T < 0 || H <= 0 || I <= 0 || E <= 0 || top_k <= 0) throw std::invalid_argument("moe_experts: bad sizes");
  MoEExpertsArgs a{};
  a.x = ptr_of<const void>(x);
  a.x_dtype = dtype_of(x_dtype, "x");
  a.T = T;
  a.H = H;
  a.I = I;
  a.E = E;
  a.top_k = top_k;
  a.x_row_stride = x_row_stride;
  a.sorted_pair_ids = ptr_of<const int32_t>(sorted);
  a.expert_offsets = ptr_of<const int32_t>(offsets);
  a.w_gate_up = ptr_of<const void>(w_gate_up);
  a.w_down = ptr_of<const void>(w_down);
  a.w_dtype = dtype_of(w_dtype, "w");
  a.q_gate_up = qweight_of(q_gate_up, "q_gate_up");
  a.q_down = qweight_of(q_down, "q_down");
  if ((a.q_gate_up.bits == 0) != (a.q_down.bits == 0))
    throw std::invalid_argument("moe_experts: gate_up and down must both be quantized or both float");
  if (a.q_gate_up.bits == 0 && (!a.w_gate_up || !a.w_down))
    throw std::invalid_argument("moe_experts: null weights");
  if (!a.expert_offsets || (T > 0 && (!a.x || !a.sorted_pair_ids))) throw std::invalid_argument("moe_experts: null pointer");
  a.num_threads = num_threads < 1 ? 1 : num_threads;
  return a;
}

void experts_py(uintptr_t x, int x_dtype, int64_t T, int64_t H, int64_t I, int64_t E, int64_t top_k,
                int64_t x_row_stride, uintptr_t sorted, uintptr_t offsets, uintptr_t w_gate_up, uintptr_t w_down,
                int w_dtype, const QTuple& q_gate_up, const QTuple& q_down, uintptr_t sorted_out, int num_threads) {
  MoEExpertsArgs a = experts_args(x, x_dtype, T, H, I, E, top_k, x_row_stride, sorted, offsets, w_gate_up, w_down,
                                  w_dtype, q_gate_up, q_down, num_threads);
  if (T > 0 && !sorted_out) throw std::invalid_argument("moe_experts: null output");
  a.sorted_out = ptr_of<float>(sorted_out);
  py::gil_scoped_release release;
  moe_experts(a);
}

void experts_combine_py(uintptr_t x, int x_dtype, int64_t T, int64_t H, int64_t I, int64_t E, int64_t top_k,
                        int64_t x_row_stride, uintptr_t sorted, uintptr_t offsets, uintptr_t w_gate_up,
                        uintptr_t w_down, int w_dtype, const QTuple& q_gate_up, const QTuple& q_down,
                        uintptr_t weights, uintptr_t out, int out_dtype, int64_t ldo, int num_threads) {
  MoEExpertsArgs a = experts_args(x, x_dtype, T, H, I, E, top_k, x_row_stride, sorted, offsets, w_gate_up, w_down,
                                  w_dtype, q_gate_up, q_down, num_threads);
  if (T > 0 && (!weights || !out)) throw std::invalid_argument("moe_experts_combine: null pointer");
  const DType od = dtype_of(out_dtype, "out");
  py::gil_scoped_release release;
  moe_experts_combine(a, ptr_of<const float>(weights), ptr_of<void>(out), od, ldo);
}

void combine_py(uintptr_t rows, int64_t ldr, uintptr_t pos, uintptr_t weights, int64_t T, int64_t top_k, int64_t H,
                uintptr_t out, int out_dtype, int64_t ldo, int num_threads) {
  if (T < 0 || top_k <= 0 || H <= 0) throw std::invalid_argument("moe_combine: bad sizes");
  if (T > 0 && (!rows || !weights || !out)) throw std::invalid_argument("moe_combine: null pointer");
  const DType od = dtype_of(out_dtype, "out");
  py::gil_scoped_release release;
  moe_combine(ptr_of<const float>(rows), ldr, ptr_of<const int32_t>(pos), ptr_of<const float>(weights), T, top_k, H,
              ptr_of<void>(out), od, ldo, num_threads < 1 ? 1 : num_threads);
}

void bind(py::module_& m) {
  m.def("moe_route", &route_py, py::arg("logits_ptr"), py::arg("T"), py::arg("E"), py::arg("ld"), py::arg("top_k"),
        py::arg("scoring"), py::arg("renormalize"), py::arg("bias_ptr"), py::arg("weights_ptr"), py::arg("ids_ptr"),
        py::arg("num_threads"));
  m.def("moe_align", &align_py, py::arg("ids_ptr"), py::arg("P"), py::arg("E"), py::arg("sorted_ptr"),
        py::arg("offsets_ptr"));
  m.def("moe_experts", &experts_py, py::arg("x_ptr"), py::arg("x_dtype"), py::arg("T"), py::arg("H"), py::arg("I"),
        py::arg("E"), py::arg("top_k"), py::arg("x_row_stride"), py::arg("sorted_ptr"), py::arg("offsets_ptr"),
        py::arg("w_gate_up_ptr"), py::arg("w_down_ptr"), py::arg("w_dtype"), py::arg("q_gate_up"),
        py::arg("q_down"), py::arg("sorted_out_ptr"), py::arg("num_threads"));
  m.def("moe_experts_combine", &experts_combine_py, py::arg("x_ptr"), py::arg("x_dtype"), py::arg("T"), py::arg("H"),
        py::arg("I"), py::arg("E"), py::arg("top_k"), py::arg("x_row_stride"), py::arg("sorted_ptr"),
        py::arg("offsets_ptr"), py::arg("w_gate_up_ptr"), py::arg("w_down_ptr"), py::arg("w_dtype"),
        py::arg("q_gate_up"), py::arg("q_down"), py::arg("weights_ptr"), py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("ldo"), py::arg("num_threads"));
  m.def("moe_combine", &combine_py, py::arg("rows_ptr"), py::arg("ldr"), py::arg("pos_ptr"), py::arg("weights_ptr"),
        py::arg("T"), py::arg("top_k"), py::arg("H"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("ldo"),
        py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
