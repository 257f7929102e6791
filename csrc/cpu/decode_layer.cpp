// Decode-step decoder layer (decode_layer.h): the matmuls through qlinear(), attention through the tier's fp32
// GEMMs, SiLU-mul through the tier's swiglu; norms, RoPE and residuals in plain loops (a few thousand elements a
// token).
#include "cpu/decode_layer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#define KS_ISA_NS scalar  // the portable attention primitives' exp2_neg (inline, the scalar tier's own)
#include "cpu/attention_kernel_generic.h"
#undef KS_ISA_NS
#include "cpu/moe.h"
#include "cpu/parallel.h"
#include "cpu/sgemm.h"

namespace kernswap {
namespace cpu {
namespace {

// Scratch reused across calls and layers (one decode step needs a few rows of H / I floats).
float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, as LlamaRMSNorm computes it in fp32.
void rmsnorm(const float* x, int64_t M, int64_t H, const float* w, float eps, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * H;
    double ss = 0.;
    for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(r[i]) * r[i];
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(H)) + eps);
    float* o = out + m * H;
    for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (r[i] * inv);
  }
}

void matmul(const DecodeWeight& w, const float* x, int64_t M, float* y, int nthreads) {
  QLinearArgs q = w;
  q.x = x, q.x_dtype = DType::F32, q.M = M, q.x_row_stride = w.K;
  q.y = y, q.y_dtype = DType::F32, q.y_row_stride = w.N, q.num_threads = nthreads;
  qlinear(q);
}

// RoPE of one head (rotate-half convention): h' = h * cos + rotate_half(h) * sin.
void rope(float* h, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = h[i], b = h[i + half];
    h[i] = a * cos[i] - b * sin[i];
    h[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Attention of the G query heads of one kv head (rows q, q + D, ...: contiguous) over L cached positions, into
// out (G rows of D, contiguous): S = q K^T and O = P V through the tier's fp32 GEMMs straight on the cache rows
// (sgemm.h: a few rows run as dot products / a register-tiled strided GEMM), the softmax per row in between with
// the attention kernels' base-2 exponential; p: G * L floats of scratch.
void attend(const float* q, int64_t G, const float* k, int64_t ks, const float* v, int64_t vs, int64_t L, int64_t D,
            float scaling, float* p, float* out) {
  sgemm_nt(G, L, D, q, D, k, ks, p, L, false);
  const float c = scaling * 1.44269504088896341f;  // scores in base-2 units
  for (int64_t g = 0; g < G; ++g) {
    float* s = p + g * L;
    float mx8[8], sum8[8] = {};  // eight independent lanes so the reductions do not run as one dependent chain
    std::fill(mx8, mx8 + 8, -INFINITY);
    for (int64_t l = 0; l < L; ++l) mx8[l & 7] = std::max(mx8[l & 7], s[l]);
    const float mc = *std::max_element(mx8, mx8 + 8) * c;
    for (int64_t l = 0; l < L; ++l) {
      const float x = s[l] * c - mc, e = scalar::attn_detail::exp2_neg(x);
      s[l] = x == x ? e : x;  // a NaN score stays NaN (exp2_neg maps it to 0)
    }
    for (int64_t l = 0; l < L; ++l) sum8[l & 7] += s[l];
    float sum = 0.f;
    for (float v8 : sum8) sum += v8;
    const float inv = 1.f / sum;
    for (int64_t l = 0; l < L; ++l) s[l] *= inv;
  }
  sgemm_nn(G, D, L, p, L, v, vs, out, D, false);
}

}  // namespace

void decode_attn_in(const DecodeAttnInArgs& a) {
  static thread_local std::vector<float> xn_buf;
  float* xn = scratch(xn_buf, a.M * a.H);
  rmsnorm(a.x, a.M, a.H, a.norm_w, a.eps, xn);
  matmul(a.qkv, xn, a.M, a.qkv_out, a.num_threads);
  const int64_t n = a.qkv.N;
  for (int64_t m = 0; m < a.M; ++m) {
    float* row = a.qkv_out + m * n;
    for (int64_t h = 0; h < a.Hq + a.Hkv; ++h) {
      float* head = row + h * a.D;
      const float* w = h < a.Hq ? a.q_norm : a.k_norm;
      if (w) rmsnorm(head, 1, a.D, w, a.qk_eps, head);  // in place: each element is read before it is written
      rope(head, a.cos + m * a.D, a.sin + m * a.D, a.D);
    }
  }
}

void decode_attn_out(const DecodeAttnOutArgs& a) {
  static thread_local std::vector<float> att_buf, h_buf, hn_buf, gu_buf, act_buf, p_buf;
  const int64_t M = a.M, H = a.H, HD = a.Hq * a.D, group = a.Hq / a.Hkv;
  float* att = scratch(att_buf, M * HD);
  // attention: (sequence, kv head) pairs over the threads when the cache is long enough to pay for them
  const int64_t pairs = M * a.Hkv;
  const int nt = a.L * a.D * M * a.Hq >= (1 << 18) ? a.num_threads : 1;
  float* p_all = scratch(p_buf, M * a.Hq * a.L);
  auto groups = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / a.Hkv, j = i % a.Hkv, h = j * group;
      attend(a.q + m * a.q_row_stride + h * a.D, group, a.k + m * a.ks0 + j * a.ks1, a.ks2,
             a.v + m * a.vs0 + j * a.vs1, a.vs2, a.L, a.D, a.scaling, p_all + (m * a.Hq + h) * a.L,
             att + m * HD + h * a.D);
    }
  };
  if (nt > 1) parallel_for(pairs, nt, groups); else groups(0, pairs);
  float* h = scratch(h_buf, M * H);
  matmul(a.o, att, M, h, a.num_threads);
  for (int64_t i = 0; i < M * H; ++i) h[i] += a.x[i];
  float* hn = scratch(hn_buf, M * H);
  rmsnorm(h, M, H, a.post_w, a.eps, hn);
  float* gu = scratch(gu_buf, M * 2 * a.I);
  matmul(a.gate_up, hn, M, gu, a.num_threads);
  float* act = scratch(act_buf, M * a.I);
  for (int64_t m = 0; m < M; ++m) swiglu(gu + m * 2 * a.I, gu + m * 2 * a.I + a.I, act + m * a.I, a.I);
  matmul(a.down, act, M, a.out, a.num_threads);
  for (int64_t i = 0; i < M * H; ++i) a.out[i] += h[i];
}

void decode_layer_step(DecodeAttnInArgs in, DecodeAttnOutArgs out, int64_t pos) {
  static thread_local std::vector<float> qkv_buf;
  const int64_t n = in.qkv.N, D = in.D;
  in.qkv_out = scratch(qkv_buf, in.M * n);
  decode_attn_in(in);
  for (int64_t m = 0; m < in.M; ++m) {
    const float* row = in.qkv_out + m * n;
    for (int64_t j = 0; j < in.Hkv; ++j) {
      const float* k = row + (in.Hq + j) * D;
      const float* v = row + (in.Hq + in.Hkv + j) * D;
      float* kd = const_cast<float*>(out.k) + m * out.ks0 + j * out.ks1 + pos * out.ks2;
      float* vd = const_cast<float*>(out.v) + m * out.vs0 + j * out.vs1 + pos * out.vs2;
      std::copy(k, k + D, kd);
      std::copy(v, v + D, vd);
    }
  }
  out.q = in.qkv_out;
  out.q_row_stride = n;
  out.L = pos + 1;
  decode_attn_out(out);
}

}  // namespace cpu
}  // namespace kernswap
