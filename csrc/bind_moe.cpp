// Bindings of the fused-MoE CPU kernels (kernswap._C.moe_*). Raw addresses from tensor.data_ptr(), each with its
// element count (bind_checks.h): sizes, strides and the contents that index memory (expert offsets, sorted pair
// ids, combine positions) are checked against them before any kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>

#include "bind_checks.h"
#include "bind_registry.h"
#include "cpu/moe.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using namespace kernswap::bind;
using kernswap::ptr_of;

namespace {

// (packed_ptr, packed_numel, packed_stride_bytes, scale_ptr, scale_numel, scale_stride_floats, zero_ptr,
//  zero_numel, zero_stride_bytes, bits, group_size, dynamic_act); bits == 0: float weights.
using QTuple = std::tuple<uintptr_t, int64_t, int64_t, uintptr_t, int64_t, int64_t, uintptr_t, int64_t, int64_t, int,
                          int64_t, bool>;

DType dtype_of(int code, const char* what) {
  if (code < 0 || code > 2) throw std::invalid_argument(std::string(what) + ": dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

// E stacked [N, K] quantized weights: expert e's tensors at e * stride, each holding one packed weight.
MoEQuantWeight qweight_of(const char* fn, const char* what, const QTuple& t, int64_t E, int64_t N, int64_t K) {
  MoEQuantWeight q;
  const int64_t packed_numel = std::get<1>(t), scale_numel = std::get<4>(t), zero_numel = std::get<7>(t);
  q.packed = ptr_of<const uint8_t>(std::get<0>(t));
  q.packed_stride = std::get<2>(t);
  q.scale = ptr_of<const float>(std::get<3>(t));
  q.scale_stride = std::get<5>(t);
  q.zero = ptr_of<const uint8_t>(std::get<6>(t));
  q.zero_stride = std::get<8>(t);
  q.bits = std::get<9>(t);
  q.group_size = std::get<10>(t);
  q.dynamic_act = std::get<11>(t);
  if (q.bits == 0) return q;
  const std::string w(what);
  check_qformat(fn, q.bits, q.group_size, K);
  const auto why = [&] { return dims({{"E", E}, {"N", N}, {"K", K}, {"bits", q.bits}}); };
  need(fn, (w + ".packed_numel").c_str(), std::get<0>(t), packed_numel,
       span(fn, what, {{E, q.packed_stride}}, qpacked_bytes(fn, q.bits, N, K)), why);
  const int64_t ns = qscale_count(fn, q.bits, q.group_size, N, K);
  need(fn, (w + ".scale_numel").c_str(), std::get<3>(t), scale_numel, span(fn, what, {{E, q.scale_stride}}, ns), why);
  if (q.zero) {
    if (q.bits != 4) fail(fn, w + ": zero points are for int4 only, got a zero buffer with bits=8");
    need(fn, (w + ".zero_numel").c_str(), std::get<6>(t), zero_numel, span(fn, what, {{E, q.zero_stride}}, ns), why);
  }
  return q;
}

void route_py(uintptr_t logits, int64_t logits_numel, int64_t T, int64_t E, int64_t ld, int64_t top_k, int scoring,
              bool renormalize, uintptr_t bias, int64_t bias_numel, uintptr_t weights, int64_t weights_numel,
              uintptr_t ids, int64_t ids_numel, int num_threads) {
  const char* fn = "moe_route";
  if (scoring < 0 || scoring > 2) fail(fn, "scoring must be 0, 1 or 2, got " + std::to_string(scoring));
  at_least(fn, "T", T, 0);
  at_least(fn, "E", E, 1);
  if (top_k <= 0 || top_k > E)
    fail(fn, "top_k must be in [1, E=" + std::to_string(E) + "], got " + std::to_string(top_k));
  need(fn, "logits_numel", logits, logits_numel, span2(fn, "logits", T, E, ld),
       [&] { return dims({{"T", T}, {"E", E}, {"ld", ld}}); });
  if (bias) need(fn, "bias_numel", bias, bias_numel, E, [&] { return dims({{"E", E}}); });
  const int64_t P = mul(fn, T, top_k);
  const auto tk = [&] { return dims({{"T", T}, {"top_k", top_k}}); };
  need(fn, "weights_numel", weights, weights_numel, P, tk);
  need(fn, "ids_numel", ids, ids_numel, P, tk);
  if (T == 0) return;
  py::gil_scoped_release release;
  moe_route(ptr_of<const float>(logits), T, E, ld, top_k, static_cast<MoEScoring>(scoring), renormalize,
            ptr_of<const float>(bias), ptr_of<float>(weights), ptr_of<int32_t>(ids), num_threads < 1 ? 1 : num_threads);
}

int64_t align_py(uintptr_t ids, int64_t ids_numel, int64_t P, int64_t E, uintptr_t sorted, int64_t sorted_numel,
                 uintptr_t offsets, int64_t offsets_numel) {
  const char* fn = "moe_align";
  at_least(fn, "P", P, 0);
  at_least(fn, "E", E, 1);
  need(fn, "ids_numel", ids, ids_numel, P, [&] { return dims({{"P", P}}); });
  need(fn, "sorted_numel", sorted, sorted_numel, P, [&] { return dims({{"P", P}}); });
  need(fn, "offsets_numel", offsets, offsets_numel, E + 1, [&] { return dims({{"E + 1", E + 1}}); });
  py::gil_scoped_release release;
  return moe_align(ptr_of<const int32_t>(ids), P, E, ptr_of<int32_t>(sorted), ptr_of<int32_t>(offsets));
}

struct Buf {
  uintptr_t ptr;
  int64_t numel;
};

// Sizes, weights, the token rows, and the alignment's contents: offsets [E + 1] from 0, non-decreasing, ending
// inside the sorted ids; every listed pair id in [0, T * top_k).
MoEExpertsArgs experts_args(const char* fn, Buf x, int x_dtype, int64_t T, int64_t H, int64_t I, int64_t E,
                            int64_t top_k, int64_t x_row_stride, Buf sorted, Buf offsets, Buf w_gate_up, Buf w_down,
                            int w_dtype, const QTuple& q_gate_up, const QTuple& q_down, int num_threads) {
  at_least(fn, "T", T, 0);
  at_least(fn, "H", H, 1);
  at_least(fn, "I", I, 1);
  at_least(fn, "E", E, 1);
  at_least(fn, "top_k", top_k, 1);
  MoEExpertsArgs a{};
  a.x = ptr_of<const void>(x.ptr);
  a.x_dtype = dtype_of(x_dtype, "x");
  a.T = T;
  a.H = H;
  a.I = I;
  a.E = E;
  a.top_k = top_k;
  a.x_row_stride = x_row_stride;
  a.w_gate_up = ptr_of<const void>(w_gate_up.ptr);
  a.w_down = ptr_of<const void>(w_down.ptr);
  a.w_dtype = dtype_of(w_dtype, "w");
  const int64_t I2 = mul(fn, 2, I);
  a.q_gate_up = qweight_of(fn, "q_gate_up", q_gate_up, E, I2, H);
  a.q_down = qweight_of(fn, "q_down", q_down, E, H, I);
  if ((a.q_gate_up.bits == 0) != (a.q_down.bits == 0))
    fail(fn, "gate_up and down must both be quantized or both float");
  if (a.q_gate_up.bits == 0) {
    const auto why = [&] { return dims({{"E", E}, {"H", H}, {"I", I}}); };
    need(fn, "w_gate_up_numel", w_gate_up.ptr, w_gate_up.numel, mul(fn, mul(fn, E, I2), H), why);
    need(fn, "w_down_numel", w_down.ptr, w_down.numel, mul(fn, mul(fn, E, H), I), why);
  }
  need(fn, "x_numel", x.ptr, x.numel, span2(fn, "x", T, H, x_row_stride),
       [&] { return dims({{"T", T}, {"H", H}, {"x_row_stride", x_row_stride}}); });
  need(fn, "offsets_numel", offsets.ptr, offsets.numel, E + 1, [&] { return dims({{"E + 1", E + 1}}); });
  const int32_t* off = ptr_of<const int32_t>(offsets.ptr);
  if (off[0] != 0) fail(fn, "expert_offsets[0] must be 0, got " + std::to_string(off[0]));
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] < off[e])
      fail(fn, "expert_offsets must not decrease, got expert_offsets[" + std::to_string(e + 1) + "]=" +
                   std::to_string(off[e + 1]) + " < expert_offsets[" + std::to_string(e) + "]=" + std::to_string(off[e]));
  const int64_t rows = off[E], P = mul(fn, T, top_k);
  need(fn, "sorted_numel", sorted.ptr, sorted.numel, rows, [&] { return dims({{"expert_offsets[E]", rows}}); });
  const int32_t* ids = ptr_of<const int32_t>(sorted.ptr);
  for (int64_t i = 0; i < rows; ++i)
    if (ids[i] < 0 || ids[i] >= P)
      fail(fn, "sorted_pair_ids[" + std::to_string(i) + "] must be in [0, T * top_k = " + std::to_string(P) +
                   "), got " + std::to_string(ids[i]));
  a.sorted_pair_ids = ids;
  a.expert_offsets = off;
  a.num_threads = num_threads < 1 ? 1 : num_threads;
  return a;
}

void experts_py(uintptr_t x, int64_t x_numel, int x_dtype, int64_t T, int64_t H, int64_t I, int64_t E, int64_t top_k,
                int64_t x_row_stride, uintptr_t sorted, int64_t sorted_numel, uintptr_t offsets,
                int64_t offsets_numel, uintptr_t w_gate_up, int64_t w_gate_up_numel, uintptr_t w_down,
                int64_t w_down_numel, int w_dtype, const QTuple& q_gate_up, const QTuple& q_down,
                uintptr_t sorted_out, int64_t sorted_out_numel, int num_threads) {
  const char* fn = "moe_experts";
  MoEExpertsArgs a = experts_args(fn, {x, x_numel}, x_dtype, T, H, I, E, top_k, x_row_stride,
                                  {sorted, sorted_numel}, {offsets, offsets_numel}, {w_gate_up, w_gate_up_numel},
                                  {w_down, w_down_numel}, w_dtype, q_gate_up, q_down, num_threads);
  const int64_t rows = a.expert_offsets[E];
  need(fn, "sorted_out_numel", sorted_out, sorted_out_numel, mul(fn, rows, H),
       [&] { return dims({{"expert_offsets[E]", rows}, {"H", H}}); });
  a.sorted_out = ptr_of<float>(sorted_out);
  if (rows == 0) return;
  py::gil_scoped_release release;
  moe_experts(a);
}

void experts_combine_py(uintptr_t x, int64_t x_numel, int x_dtype, int64_t T, int64_t H, int64_t I, int64_t E,
                        int64_t top_k, int64_t x_row_stride, uintptr_t sorted, int64_t sorted_numel,
                        uintptr_t offsets, int64_t offsets_numel, uintptr_t w_gate_up, int64_t w_gate_up_numel,
                        uintptr_t w_down, int64_t w_down_numel, int w_dtype, const QTuple& q_gate_up,
                        const QTuple& q_down, uintptr_t weights, int64_t weights_numel, uintptr_t out,
                        int64_t out_numel, int out_dtype, int64_t ldo, int num_threads) {
  const char* fn = "moe_experts_combine";
  MoEExpertsArgs a = experts_args(fn, {x, x_numel}, x_dtype, T, H, I, E, top_k, x_row_stride,
                                  {sorted, sorted_numel}, {offsets, offsets_numel}, {w_gate_up, w_gate_up_numel},
                                  {w_down, w_down_numel}, w_dtype, q_gate_up, q_down, num_threads);
  need(fn, "weights_numel", weights, weights_numel, mul(fn, T, top_k),
       [&] { return dims({{"T", T}, {"top_k", top_k}}); });
  if (T > 1) at_least(fn, "ldo", ldo, H);
  need(fn, "out_numel", out, out_numel, span2(fn, "out", T, H, ldo),
       [&] { return dims({{"T", T}, {"H", H}, {"ldo", ldo}}); });
  const DType od = dtype_of(out_dtype, "out");
  if (T == 0) return;
  py::gil_scoped_release release;
  moe_experts_combine(a, ptr_of<const float>(weights), ptr_of<void>(out), od, ldo);
}

void combine_py(uintptr_t rows, int64_t rows_numel, int64_t ldr, uintptr_t pos, int64_t pos_numel, uintptr_t weights,
                int64_t weights_numel, int64_t T, int64_t top_k, int64_t H, uintptr_t out, int64_t out_numel,
                int out_dtype, int64_t ldo, int num_threads) {
  const char* fn = "moe_combine";
  at_least(fn, "T", T, 0);
  at_least(fn, "top_k", top_k, 1);
  at_least(fn, "H", H, 1);
  const DType od = dtype_of(out_dtype, "out");
  const int64_t P = mul(fn, T, top_k);
  const auto tk = [&] { return dims({{"T", T}, {"top_k", top_k}}); };
  need(fn, "weights_numel", weights, weights_numel, P, tk);
  if (T > 1) at_least(fn, "ldo", ldo, H);
  need(fn, "out_numel", out, out_numel, span2(fn, "out", T, H, ldo),
       [&] { return dims({{"T", T}, {"H", H}, {"ldo", ldo}}); });
  if (!pos) {
    need(fn, "rows_numel", rows, rows_numel, span2(fn, "rows", P, H, ldr),
         [&] { return dims({{"T * top_k", P}, {"H", H}, {"ldr", ldr}}); });
  } else {
    need(fn, "pos_numel", pos, pos_numel, P, tk);
    at_least(fn, "ldr", ldr, 0);
    const int32_t* r = ptr_of<const int32_t>(pos);
    for (int64_t p = 0; p < P; ++p)
      if (r[p] >= 0 && span2(fn, "rows", int64_t{r[p]} + 1, H, ldr) > rows_numel)
        fail(fn, "pos[" + std::to_string(p) + "]=" + std::to_string(r[p]) + " addresses a row past rows_numel=" +
                     std::to_string(rows_numel) + " (" + dims({{"H", H}, {"ldr", ldr}}) + ")");
    if (P > 0 && !rows) fail(fn, "rows_numel: null address");
  }
  if (T == 0) return;
  py::gil_scoped_release release;
  moe_combine(ptr_of<const float>(rows), ldr, ptr_of<const int32_t>(pos), ptr_of<const float>(weights), T, top_k, H,
              ptr_of<void>(out), od, ldo, num_threads < 1 ? 1 : num_threads);
}

void bind(py::module_& m) {
  m.def("moe_route", &route_py, py::arg("logits_ptr"), py::arg("logits_numel"), py::arg("T"), py::arg("E"),
        py::arg("ld"), py::arg("top_k"), py::arg("scoring"), py::arg("renormalize"), py::arg("bias_ptr"),
        py::arg("bias_numel"), py::arg("weights_ptr"), py::arg("weights_numel"), py::arg("ids_ptr"),
        py::arg("ids_numel"), py::arg("num_threads"));
  m.def("moe_align", &align_py, py::arg("ids_ptr"), py::arg("ids_numel"), py::arg("P"), py::arg("E"),
        py::arg("sorted_ptr"), py::arg("sorted_numel"), py::arg("offsets_ptr"), py::arg("offsets_numel"));
  m.def("moe_experts", &experts_py, py::arg("x_ptr"), py::arg("x_numel"), py::arg("x_dtype"), py::arg("T"),
        py::arg("H"), py::arg("I"), py::arg("E"), py::arg("top_k"), py::arg("x_row_stride"), py::arg("sorted_ptr"),
        py::arg("sorted_numel"), py::arg("offsets_ptr"), py::arg("offsets_numel"), py::arg("w_gate_up_ptr"),
        py::arg("w_gate_up_numel"), py::arg("w_down_ptr"), py::arg("w_down_numel"), py::arg("w_dtype"),
        py::arg("q_gate_up"), py::arg("q_down"), py::arg("sorted_out_ptr"), py::arg("sorted_out_numel"),
        py::arg("num_threads"));
  m.def("moe_experts_combine", &experts_combine_py, py::arg("x_ptr"), py::arg("x_numel"), py::arg("x_dtype"),
        py::arg("T"), py::arg("H"), py::arg("I"), py::arg("E"), py::arg("top_k"), py::arg("x_row_stride"),
        py::arg("sorted_ptr"), py::arg("sorted_numel"), py::arg("offsets_ptr"), py::arg("offsets_numel"),
        py::arg("w_gate_up_ptr"), py::arg("w_gate_up_numel"), py::arg("w_down_ptr"), py::arg("w_down_numel"),
        py::arg("w_dtype"), py::arg("q_gate_up"), py::arg("q_down"), py::arg("weights_ptr"),
        py::arg("weights_numel"), py::arg("out_ptr"), py::arg("out_numel"), py::arg("out_dtype"), py::arg("ldo"),
        py::arg("num_threads"));
  m.def("moe_combine", &combine_py, py::arg("rows_ptr"), py::arg("rows_numel"), py::arg("ldr"), py::arg("pos_ptr"),
        py::arg("pos_numel"), py::arg("weights_ptr"), py::arg("weights_numel"), py::arg("T"), py::arg("top_k"),
        py::arg("H"), py::arg("out_ptr"), py::arg("out_numel"), py::arg("out_dtype"), py::arg("ldo"),
        py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
