// Binding of the decode-step decoder layer (kernswap._C.decode_attn_in / decode_attn_out, cpu/decode_layer.h).
// A weight arrives as qlinear's weight side (python: backends.cpu.weight_args) followed by K and dynamic_act:
// (packed, packed_numel, bits, group_size, N, scale, scale_numel, zero, zero_numel, zero_is_float, bias, bias_numel,
// K, dynamic_act), checked like qlinear's; every buffer with its element count.
#include <pybind11/pybind11.h>

#include <string>

#include "bind_checks.h"
#include "bind_registry.h"
#include "cpu/decode_layer.h"

namespace py = pybind11;
using namespace kernswap::cpu;
using namespace kernswap::bind;
using kernswap::ptr_of;

namespace {

DecodeWeight weight_of(const char* fn, const char* name, const py::tuple& t, int64_t N, int64_t K) {
  if (t.size() != 14) fail(fn, std::string(name) + " must be a 14-tuple, got " + std::to_string(t.size()) + " items");
  const auto packed = t[0].cast<uintptr_t>(), scale = t[5].cast<uintptr_t>(), zero = t[7].cast<uintptr_t>(),
             bias = t[10].cast<uintptr_t>();
  const int bits = t[2].cast<int>();
  const int64_t group = t[3].cast<int64_t>(), n = t[4].cast<int64_t>(), k = t[12].cast<int64_t>();
  if (n != N || k != K)
    fail(fn, std::string(name) + " must be [N=" + std::to_string(N) + ", K=" + std::to_string(K) + "], got [" +
                 std::to_string(n) + ", " + std::to_string(k) + "]");
  check_weight(fn, packed, t[1].cast<int64_t>(), bits, group, N, K, scale, t[6].cast<int64_t>(), zero,
               t[8].cast<int64_t>());
  const bool zf = t[9].cast<bool>();
  if (bias) need(fn, "bias_numel", bias, t[11].cast<int64_t>(), N, [&] { return dims({{"N", N}}); });
  return DecodeWeight{nullptr, DType::F32, 0, K, K, ptr_of<const uint8_t>(packed), bits, group, N,
                      ptr_of<const float>(scale), zf ? nullptr : ptr_of<const uint8_t>(zero),
                      zf ? ptr_of<const float>(zero) : nullptr, ptr_of<const float>(bias), nullptr,
                      DType::F32, N, t[13].cast<bool>(), 1};
}

void check_heads(const char* fn, int64_t M, int64_t H, int64_t Hq, int64_t Hkv, int64_t D) {
  at_least(fn, "M", M, 1);
  at_least(fn, "H", H, 1);
  at_least(fn, "Hkv", Hkv, 1);
  at_least(fn, "D", D, 2);
  if (D % 2) fail(fn, "D must be even, got " + std::to_string(D));
  if (Hq < Hkv || Hq % Hkv) fail(fn, "Hq must be a multiple of Hkv=" + std::to_string(Hkv) + ", got " + std::to_string(Hq));
}

// Qwen3's per-head q / k norms: both or neither, D weights each.
template <class Why>
void check_qk_norms(const char* fn, uintptr_t q_norm, int64_t q_norm_numel, uintptr_t k_norm, int64_t k_norm_numel,
                    int64_t D, Why why) {
  if ((q_norm == 0) != (k_norm == 0))
    fail(fn, "q_norm_ptr and k_norm_ptr must be given together, got " + std::string(q_norm ? "q_norm only" : "k_norm only"));
  if (q_norm) {
    need(fn, "q_norm_numel", q_norm, q_norm_numel, D, why);
    need(fn, "k_norm_numel", k_norm, k_norm_numel, D, why);
  }
}

void attn_in_py(uintptr_t x, int64_t x_numel, int64_t M, int64_t H, uintptr_t norm_w, int64_t norm_numel, float eps,
                const py::tuple& qkv, uintptr_t cos, int64_t cos_numel, uintptr_t sin, int64_t sin_numel, int64_t Hq,
                int64_t Hkv, int64_t D, uintptr_t q_norm, int64_t q_norm_numel, uintptr_t k_norm,
                int64_t k_norm_numel, float qk_eps, uintptr_t out, int64_t out_numel, int num_threads) {
  const char* fn = "decode_attn_in";
  check_heads(fn, M, H, Hq, Hkv, D);
  const int64_t n = mul(fn, add(fn, Hq, mul(fn, 2, Hkv)), D);
  DecodeAttnInArgs a{ptr_of<const float>(x), M, H, ptr_of<const float>(norm_w), eps, weight_of(fn, "qkv", qkv, n, H),
                     ptr_of<const float>(cos), ptr_of<const float>(sin), Hq, Hkv, D, ptr_of<const float>(q_norm),
                     ptr_of<const float>(k_norm), qk_eps, ptr_of<float>(out), num_threads < 1 ? 1 : num_threads};
  const auto md = [&] { return dims({{"M", M}, {"H", H}, {"D", D}}); };
  need(fn, "x_numel", x, x_numel, mul(fn, M, H), md);
  need(fn, "norm_numel", norm_w, norm_numel, H, md);
  need(fn, "cos_numel", cos, cos_numel, mul(fn, M, D), md);
  need(fn, "sin_numel", sin, sin_numel, mul(fn, M, D), md);
  need(fn, "out_numel", out, out_numel, mul(fn, M, n), md);
  check_qk_norms(fn, q_norm, q_norm_numel, k_norm, k_norm_numel, D, md);
  py::gil_scoped_release release;
  decode_attn_in(a);
}

void attn_out_py(uintptr_t x, int64_t x_numel, uintptr_t q, int64_t q_numel, int64_t q_row_stride, uintptr_t k,
                 int64_t k_numel, int64_t ks0, int64_t ks1, int64_t ks2, uintptr_t v, int64_t v_numel, int64_t vs0,
                 int64_t vs1, int64_t vs2, int64_t L, int64_t M, int64_t H, int64_t Hq, int64_t Hkv, int64_t D,
                 float scaling, const py::tuple& o, uintptr_t post_w, int64_t post_numel, float eps,
                 const py::tuple& gate_up, const py::tuple& down, int64_t I, uintptr_t out, int64_t out_numel,
                 int num_threads) {
  const char* fn = "decode_attn_out";
  check_heads(fn, M, H, Hq, Hkv, D);
  at_least(fn, "L", L, 1);
  at_least(fn, "I", I, 1);
  const int64_t hd = mul(fn, Hq, D);
  at_least(fn, "q_row_stride", q_row_stride, hd);
  DecodeAttnOutArgs a{ptr_of<const float>(x), ptr_of<const float>(q), q_row_stride, ptr_of<const float>(k),
                      ptr_of<const float>(v), ks0, ks1, ks2, vs0, vs1, vs2, L, M, H, Hq, Hkv, D, scaling,
                      weight_of(fn, "o", o, H, hd), ptr_of<const float>(post_w), eps,
                      weight_of(fn, "gate_up", gate_up, mul(fn, 2, I), H), weight_of(fn, "down", down, H, I), I,
                      ptr_of<float>(out), num_threads < 1 ? 1 : num_threads};
  const auto md = [&] { return dims({{"M", M}, {"H", H}, {"Hq", Hq}, {"Hkv", Hkv}, {"D", D}, {"L", L}}); };
  need(fn, "x_numel", x, x_numel, mul(fn, M, H), md);
  need(fn, "q_numel", q, q_numel, span(fn, "q", {{M, q_row_stride}}, hd), md);
  need(fn, "k_numel", k, k_numel, span(fn, "k", {{M, ks0}, {Hkv, ks1}, {L, ks2}}, D), md);
  need(fn, "v_numel", v, v_numel, span(fn, "v", {{M, vs0}, {Hkv, vs1}, {L, vs2}}, D), md);
  need(fn, "post_numel", post_w, post_numel, H, md);
  need(fn, "out_numel", out, out_numel, mul(fn, M, H), md);
  py::gil_scoped_release release;
  decode_attn_out(a);
}

// One layer's decode step in one call (decode_layer_step): everything fixed for the layer (sizes, norms, weights)
// is checked once when the plan is built; step() checks what changes per call (the rows, RoPE rows, the key / value
// buffers and the position written).
class DecodeLayerPlan {
 public:
  DecodeLayerPlan(int64_t H, int64_t Hq, int64_t Hkv, int64_t D, int64_t I, uintptr_t norm1, int64_t norm1_numel,
                  float eps1, uintptr_t norm2, int64_t norm2_numel, float eps2, uintptr_t q_norm, int64_t q_norm_numel,
                  uintptr_t k_norm, int64_t k_norm_numel, float qk_eps, float scaling, const py::tuple& qkv,
                  const py::tuple& o, const py::tuple& gate_up, const py::tuple& down) {
    const char* fn = "DecodeLayerPlan";
    check_heads(fn, 1, H, Hq, Hkv, D);
    at_least(fn, "I", I, 1);
    const auto md = [&] { return dims({{"H", H}, {"D", D}, {"I", I}}); };
    need(fn, "norm1_numel", norm1, norm1_numel, H, md);
    need(fn, "norm2_numel", norm2, norm2_numel, H, md);
    check_qk_norms(fn, q_norm, q_norm_numel, k_norm, k_norm_numel, D, md);
    const int64_t nq = mul(fn, add(fn, Hq, mul(fn, 2, Hkv)), D), hd = mul(fn, Hq, D);
    in_ = DecodeAttnInArgs{nullptr, 0, H, ptr_of<const float>(norm1), eps1, weight_of(fn, "qkv", qkv, nq, H),
                           nullptr, nullptr, Hq, Hkv, D, ptr_of<const float>(q_norm), ptr_of<const float>(k_norm),
                           qk_eps, nullptr, 1};
    out_ = DecodeAttnOutArgs{nullptr, nullptr, nq, nullptr, nullptr, 0, 0, 0, 0, 0, 0, 0, 0, H, Hq, Hkv, D, scaling,
                             weight_of(fn, "o", o, H, hd), ptr_of<const float>(norm2), eps2,
                             weight_of(fn, "gate_up", gate_up, mul(fn, 2, I), H), weight_of(fn, "down", down, H, I),
                             I, nullptr, 1};
  }

  void step(uintptr_t x, int64_t x_numel, int64_t M, uintptr_t cos, int64_t cos_numel, uintptr_t sin,
            int64_t sin_numel, uintptr_t k, int64_t k_numel, int64_t ks0, int64_t ks1, int64_t ks2, uintptr_t v,
            int64_t v_numel, int64_t vs0, int64_t vs1, int64_t vs2, int64_t pos, int64_t capacity, uintptr_t out,
            int64_t out_numel, int num_threads) const {
    const char* fn = "DecodeLayerPlan.step";
    const int64_t H = in_.H, D = in_.D, Hkv = in_.Hkv;
    at_least(fn, "M", M, 1);
    at_least(fn, "pos", pos, 0);
    at_least(fn, "capacity", capacity, pos + 1);
    const auto md = [&] { return dims({{"M", M}, {"H", H}, {"Hkv", Hkv}, {"D", D}, {"capacity", capacity}}); };
    need(fn, "x_numel", x, x_numel, mul(fn, M, H), md);
    need(fn, "cos_numel", cos, cos_numel, mul(fn, M, D), md);
    need(fn, "sin_numel", sin, sin_numel, mul(fn, M, D), md);
    need(fn, "out_numel", out, out_numel, mul(fn, M, H), md);
    need(fn, "k_numel", k, k_numel, span(fn, "k", {{M, ks0}, {Hkv, ks1}, {capacity, ks2}}, D), md);
    need(fn, "v_numel", v, v_numel, span(fn, "v", {{M, vs0}, {Hkv, vs1}, {capacity, vs2}}, D), md);
    DecodeAttnInArgs in = in_;
    DecodeAttnOutArgs o = out_;
    const int nt = num_threads < 1 ? 1 : num_threads;
    in.x = o.x = ptr_of<const float>(x);
    in.M = o.M = M;
    in.cos = ptr_of<const float>(cos);
    in.sin = ptr_of<const float>(sin);
    in.num_threads = o.num_threads = nt;
    o.k = ptr_of<const float>(k);
    o.v = ptr_of<const float>(v);
    o.ks0 = ks0, o.ks1 = ks1, o.ks2 = ks2, o.vs0 = vs0, o.vs1 = vs1, o.vs2 = vs2;
    o.out = ptr_of<float>(out);
    py::gil_scoped_release release;
    decode_layer_step(in, o, pos);
  }

 private:
  DecodeAttnInArgs in_{};
  DecodeAttnOutArgs out_{};
};

void bind(py::module_& m) {
  py::class_<DecodeLayerPlan>(m, "DecodeLayerPlan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, uintptr_t, int64_t, float, uintptr_t, int64_t, float,
                    uintptr_t, int64_t, uintptr_t, int64_t, float, float, const py::tuple&, const py::tuple&,
                    const py::tuple&, const py::tuple&>(),
           py::arg("H"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("I"), py::arg("norm1_ptr"),
           py::arg("norm1_numel"), py::arg("eps1"), py::arg("norm2_ptr"), py::arg("norm2_numel"), py::arg("eps2"),
           py::arg("q_norm_ptr"), py::arg("q_norm_numel"), py::arg("k_norm_ptr"), py::arg("k_norm_numel"),
           py::arg("qk_eps"), py::arg("scaling"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"))
      .def("step", &DecodeLayerPlan::step, py::arg("x_ptr"), py::arg("x_numel"), py::arg("M"), py::arg("cos_ptr"),
           py::arg("cos_numel"), py::arg("sin_ptr"), py::arg("sin_numel"), py::arg("k_ptr"), py::arg("k_numel"),
           py::arg("ks0"), py::arg("ks1"), py::arg("ks2"), py::arg("v_ptr"), py::arg("v_numel"), py::arg("vs0"),
           py::arg("vs1"), py::arg("vs2"), py::arg("pos"), py::arg("capacity"), py::arg("out_ptr"),
           py::arg("out_numel"), py::arg("num_threads"));
  m.def("decode_attn_in", &attn_in_py, py::arg("x_ptr"), py::arg("x_numel"), py::arg("M"), py::arg("H"),
        py::arg("norm_ptr"), py::arg("norm_numel"), py::arg("eps"), py::arg("qkv"), py::arg("cos_ptr"),
        py::arg("cos_numel"), py::arg("sin_ptr"), py::arg("sin_numel"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"),
        py::arg("q_norm_ptr"), py::arg("q_norm_numel"), py::arg("k_norm_ptr"), py::arg("k_norm_numel"),
        py::arg("qk_eps"), py::arg("out_ptr"), py::arg("out_numel"), py::arg("num_threads"));
  m.def("decode_attn_out", &attn_out_py, py::arg("x_ptr"), py::arg("x_numel"), py::arg("q_ptr"), py::arg("q_numel"),
        py::arg("q_row_stride"), py::arg("k_ptr"), py::arg("k_numel"), py::arg("ks0"), py::arg("ks1"), py::arg("ks2"),
        py::arg("v_ptr"), py::arg("v_numel"), py::arg("vs0"), py::arg("vs1"), py::arg("vs2"), py::arg("L"),
        py::arg("M"), py::arg("H"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("scaling"), py::arg("o"),
        py::arg("post_ptr"), py::arg("post_numel"), py::arg("eps"), py::arg("gate_up"), py::arg("down"),
        py::arg("I"), py::arg("out_ptr"), py::arg("out_numel"), py::arg("num_threads"));
}

KS_REGISTER_BINDING(bind);

}  // namespace
