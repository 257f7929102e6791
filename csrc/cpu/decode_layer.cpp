// Decode-step decoder layer (decode_layer.h): the elementwise parts in plain loops (vectorised by the compiler;
// they are a few thousand elements a token), the matmuls through qlinear().
#include "cpu/decode_layer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/parallel.h"

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

// Attention of one query head over L cached positions of its kv head, into out[D]; p: L floats of scratch.
void attend(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t L, int64_t D,
            float scaling, float* p, float* out) {
  float mx = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    const float* kl = k + l * ks;
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * kl[d];
    p[l] = s * scaling;
    mx = std::max(mx, p[l]);
  }
  float sum = 0.f;
  for (int64_t l = 0; l < L; ++l) sum += (p[l] = std::exp(p[l] - mx));
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t l = 0; l < L; ++l) {
    const float* vl = v + l * vs;
    const float w = p[l] * inv;
    for (int64_t d = 0; d < D; ++d) out[d] += w * vl[d];
  }
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
  // attention: (sequence, q head) pairs over the threads when the cache is long enough to pay for them
  const int64_t pairs = M * a.Hq;
  const int nt = a.L * a.D * pairs >= (1 << 18) ? a.num_threads : 1;
  float* p_all = scratch(p_buf, pairs * a.L);
  auto heads = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / a.Hq, h = i % a.Hq, j = h / group;
      attend(a.q + m * a.q_row_stride + h * a.D, a.k + m * a.ks0 + j * a.ks1, a.ks2, a.v + m * a.vs0 + j * a.vs1,
             a.vs2, a.L, a.D, a.scaling, p_all + i * a.L, att + m * HD + h * a.D);
    }
  };
  if (nt > 1) parallel_for(pairs, nt, heads); else heads(0, pairs);
  float* h = scratch(h_buf, M * H);
  matmul(a.o, att, M, h, a.num_threads);
  for (int64_t i = 0; i < M * H; ++i) h[i] += a.x[i];
  float* hn = scratch(hn_buf, M * H);
  rmsnorm(h, M, H, a.post_w, a.eps, hn);
  float* gu = scratch(gu_buf, M * 2 * a.I);
  matmul(a.gate_up, hn, M, gu, a.num_threads);
  float* act = scratch(act_buf, M * a.I);
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gu + m * 2 * a.I;
    const float* u = g + a.I;
    float* o = act + m * a.I;
    for (int64_t i = 0; i < a.I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
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
