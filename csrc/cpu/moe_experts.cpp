// The experts of a mixture-of-experts layer on the CPU, one call for all experts (see moe.h).
//
// Rows of the pairs are gathered once in sorted (expert-major) order into fp32, so each expert's rows are
// one contiguous [n_e, H] block. Then:
//   float weights:     stage 1 tasks (expert, panel of the intermediate columns): g and u panels by the
//                      fp32 GEMM, act = silu(g) * u; stage 2 tasks (expert, panel of H): act @ W_down^T into
//                      the sorted output. Every weight element is read once per call whatever the row count,
//                      and a decode step (one row per expert) still splits each expert over the threads.
//   quantized weights: tasks (expert, row block) run gate_up -> SwiGLU -> down through the quantized-linear
//                      engine with one thread each (the packed layouts cannot be cut into column panels).
// Tasks are sorted by cost and taken from a shared counter (longest first), so uneven experts balance.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "cpu/isa.h"
#include "cpu/moe.h"
#include "cpu/parallel.h"
#include "cpu/sgemm.h"

namespace kernswap {
namespace cpu {
namespace {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void to_f32(const void* src, DType t, int64_t n, float* out) {
  switch (t) {
    case DType::F32: std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float)); break;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
        std::memcpy(out + i, &bits, 4);
      }
      break;
    }
    default: {
      const _Float16* s = static_cast<const _Float16*>(src);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(s[i]);
    }
  }
}

inline int64_t dsize(DType t) { return t == DType::F32 ? 4 : 2; }

void swiglu_portable(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

inline void swiglu(const float* g, const float* u, float* out, int64_t n) {
  if (active_isa() == Isa::Avx512Vnni) return avx512::moe_swiglu(g, u, out, n);
  swiglu_portable(g, u, out, n);
}

struct Task {
  int64_t e, a0, a1;  // expert, range (columns or rows)
  double cost;
};

void sort_by_cost(std::vector<Task>& tasks) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

// Runs f1 on every task of t1, then (after all of them finished) f2 on every task of t2, on `threads` threads
// in ONE parallel region: longest task first, taken from shared counters, a yielding barrier between the
// phases (one wake-up of the workers per call instead of one per phase; on a busy machine each wake-up can
// cost a scheduler time slice).
template <class F1, class F2>
void run_phases(std::vector<Task>& t1, const F1& f1, std::vector<Task>& t2, const F2& f2, int threads) {
  sort_by_cost(t1);
  sort_by_cost(t2);
  const int64_t n1 = static_cast<int64_t>(t1.size()), n2 = static_cast<int64_t>(t2.size());
  if (threads <= 1 || std::max(n1, n2) <= 1) {
    for (auto& t : t1) f1(t);
    for (auto& t : t2) f2(t);
    return;
  }
  std::atomic<int64_t> next1{0}, next2{0};
  std::atomic<int> arrived{0};
  parallel_for(threads, threads, [&](int64_t, int64_t) {
    for (int64_t i = next1.fetch_add(1); i < n1; i = next1.fetch_add(1)) f1(t1[i]);
    if (n2 == 0) return;
    arrived.fetch_add(1);
    for (int spins = 0; arrived.load(std::memory_order_acquire) < threads; ++spins) {
      if (spins < 2000) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    for (int64_t i = next2.fetch_add(1); i < n2; i = next2.fetch_add(1)) f2(t2[i]);
  });
}

template <class F>
void run_tasks(std::vector<Task>& tasks, int threads, const F& fn) {
  std::vector<Task> none;
  run_phases(tasks, fn, none, fn, threads);
}

// Growing per-calling-thread scratch (workers use the caller's buffers through pointers).
struct Scratch {
  std::vector<float> xs, act, out;
};

// Column panels for float weights: enough tasks for the threads, panels aligned to the GEMM's 16/64 columns.
int64_t panel_width(int64_t width, int64_t experts_hit, int64_t avg_rows, int threads) {
  if (threads <= 1) return width;
  const int64_t per_expert = cdiv(8 * threads, std::max<int64_t>(1, experts_hit));
  int64_t w = round_up(cdiv(width, per_expert), 16);
  if (avg_rows > 4) w = std::max<int64_t>(w, 64);
  return std::min(w, width);
}

void float_experts(const MoEExpertsArgs& a, const float* xs, float* act) {
  const int64_t H = a.H, I = a.I, E = a.E;
  const int32_t* off = a.expert_offsets;
  int64_t hit = 0;
  for (int64_t e = 0; e < E; ++e) hit += off[e + 1] > off[e];
  if (hit == 0) return;
  const int64_t avg_rows = off[E] / hit;
  const int threads = a.num_threads;
  const int64_t wsz = dsize(a.w_dtype);
  const char* wgu = static_cast<const char*>(a.w_gate_up);
  const char* wd = static_cast<const char*>(a.w_down);
  const bool f32 = a.w_dtype == DType::F32;
  constexpr int64_t kRowChunk = 1024;  // rows per GEMM call (bounds the per-thread scratch)

  // Stage 1: act[rows of e, j0:j1] = silu(x W_g[j0:j1]^T) * (x W_u[j0:j1]^T)
  std::vector<Task> tasks, tasks2;
  const int64_t jw = panel_width(I, hit, avg_rows, threads);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    for (int64_t j0 = 0; j0 < I; j0 += jw)
      tasks.push_back({e, j0, std::min(I, j0 + jw), static_cast<double>(std::min(I, j0 + jw) - j0) * (n + 4)});
  }
  auto stage1 = [&](const Task& t) {
    thread_local std::vector<float> wbuf, gu;
    const int64_t e = t.e, j0 = t.a0, nj = t.a1 - t.a0, row0 = off[e], n = off[e + 1] - off[e];
    const char* gsrc = wgu + (e * 2 * I + j0) * H * wsz;
    const char* usrc = wgu + (e * 2 * I + I + j0) * H * wsz;
    const float *bg, *bu;
    if (f32) {
      bg = reinterpret_cast<const float*>(gsrc);
      bu = reinterpret_cast<const float*>(usrc);
    } else {
      wbuf.resize(static_cast<size_t>(2 * nj * H));
      to_f32(gsrc, a.w_dtype, nj * H, wbuf.data());
      to_f32(usrc, a.w_dtype, nj * H, wbuf.data() + nj * H);
      bg = wbuf.data();
      bu = wbuf.data() + nj * H;
    }
    gu.resize(static_cast<size_t>(std::min(n, kRowChunk) * 2 * nj));
    for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
      const int64_t rc = std::min(kRowChunk, n - r0);
      const float* x = xs + (row0 + r0) * H;
      sgemm_nt(rc, nj, H, x, H, bg, H, gu.data(), 2 * nj, false);
      sgemm_nt(rc, nj, H, x, H, bu, H, gu.data() + nj, 2 * nj, false);
      for (int64_t r = 0; r < rc; ++r)
        swiglu(gu.data() + r * 2 * nj, gu.data() + r * 2 * nj + nj, act + (row0 + r0 + r) * I + j0, nj);
    }
  };

  // Stage 2: out[rows of e, h0:h1] = act W_d[h0:h1]^T
  const int64_t hw = panel_width(H, hit, avg_rows, threads);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    for (int64_t h0 = 0; h0 < H; h0 += hw)
      tasks2.push_back({e, h0, std::min(H, h0 + hw), static_cast<double>(std::min(H, h0 + hw) - h0) * (n + 4)});
  }
  auto stage2 = [&](const Task& t) {
    thread_local std::vector<float> wbuf;
    const int64_t e = t.e, h0 = t.a0, nh = t.a1 - t.a0, row0 = off[e], n = off[e + 1] - off[e];
    const char* src = wd + (e * H + h0) * I * wsz;
    const float* b;
    if (f32) {
      b = reinterpret_cast<const float*>(src);
    } else {
      wbuf.resize(static_cast<size_t>(nh * I));
      to_f32(src, a.w_dtype, nh * I, wbuf.data());
      b = wbuf.data();
    }
    for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
      const int64_t rc = std::min(kRowChunk, n - r0);
      sgemm_nt(rc, nh, I, act + (row0 + r0) * I, I, b, I, a.sorted_out + (row0 + r0) * H + h0, H, false);
    }
  };
  run_phases(tasks, stage1, tasks2, stage2, threads);
}

QLinearArgs qargs(const MoEQuantWeight& q, int64_t e, const float* x, int64_t M, int64_t K, int64_t N, float* y,
                  int64_t ldy, int threads) {
  QLinearArgs l{};
  l.x = x;
  l.x_dtype = DType::F32;
  l.M = M;
  l.K = K;
  l.x_row_stride = K;
  l.packed = q.packed + e * q.packed_stride;
  l.bits = q.bits;
  l.group_size = q.group_size;
  l.N = N;
  l.scale = q.scale + e * q.scale_stride;
  l.zero = q.zero ? q.zero + e * q.zero_stride : nullptr;
  l.bias = nullptr;
  l.y = y;
  l.y_dtype = DType::F32;
  l.y_row_stride = ldy;
  l.dynamic_act = q.dynamic_act;
  l.num_threads = threads;
  return l;
}

void quant_experts(const MoEExpertsArgs& a, const float* xs) {
  const int64_t H = a.H, I = a.I, E = a.E;
  const int32_t* off = a.expert_offsets;
  const int64_t rows = off[E];
  const int threads = a.num_threads;
  // Row blocks: at most 64 rows (the engine's row block), small enough that the threads get >= 2 tasks each.
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(64, cdiv(rows, 2 * threads)));
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    for (int64_t r0 = 0; r0 < n; r0 += rb)
      tasks.push_back({e, r0, std::min(n, r0 + rb), static_cast<double>(std::min(n, r0 + rb) - r0 + 4)});
  }
  // Fewer tasks than threads (e.g. one token, one expert): each call uses all threads instead.
  const bool inner = static_cast<int64_t>(tasks.size()) < threads;
  const int outer_threads = inner ? 1 : threads, call_threads = inner ? threads : 1;
  run_tasks(tasks, outer_threads, [&](const Task& t) {
    thread_local std::vector<float> gu, act;
    const int64_t e = t.e, m = t.a1 - t.a0, row0 = off[e] + t.a0;
    gu.resize(static_cast<size_t>(m * 2 * I));
    act.resize(static_cast<size_t>(m * I));
    qlinear(qargs(a.q_gate_up, e, xs + row0 * H, m, H, 2 * I, gu.data(), 2 * I, call_threads));
    for (int64_t r = 0; r < m; ++r) swiglu(gu.data() + r * 2 * I, gu.data() + r * 2 * I + I, act.data() + r * I, I);
    qlinear(qargs(a.q_down, e, act.data(), m, I, H, a.sorted_out + row0 * H, H, call_threads));
  });
}

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// Grows to n; gives memory back when a large buffer is mostly unused (after a long prefill, decode steps
// need a few rows).
void grow(std::vector<float>& v, int64_t n) {
  const int64_t have = static_cast<int64_t>(v.size());
  if (have < n) {
    v.resize(static_cast<size_t>(n));
  } else if (have > (int64_t{1} << 22) && have > 8 * n) {
    std::vector<float>(static_cast<size_t>(n)).swap(v);
  }
}

}  // namespace

// Threads only where the call has enough work to pay for waking them (a tiny layer stays on the caller):
// about 2M multiply-adds, counting a decode step's weight streaming as one row per expert hit.
int effective_threads(const MoEExpertsArgs& a) {
  const int32_t* off = a.expert_offsets;
  int64_t hit = 0;
  for (int64_t e = 0; e < a.E; ++e) hit += off[e + 1] > off[e];
  const double work = static_cast<double>(std::max<int64_t>(off[a.E], hit)) * 3.0 * a.H * a.I;
  return work >= static_cast<double>(1 << 21) ? a.num_threads : 1;
}

void moe_experts(const MoEExpertsArgs& args) {
  const int64_t rows = args.expert_offsets[args.E];
  if (rows <= 0) return;
  MoEExpertsArgs a = args;
  a.num_threads = effective_threads(args);
  Scratch& s = scratch();
  grow(s.xs, rows * a.H);
  float* xs = s.xs.data();
  // Gather the pairs' token rows in sorted order (fp32).
  const int64_t xsz = dsize(a.x_dtype);
  const char* x = static_cast<const char*>(a.x);
  const int gthreads = rows * a.H >= (1 << 16) ? a.num_threads : 1;
  parallel_for(rows, gthreads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = a.sorted_pair_ids[i] / a.top_k;
      to_f32(x + t * a.x_row_stride * xsz, a.x_dtype, a.H, xs + i * a.H);
    }
  });
  if (a.q_gate_up.bits != 0) {
    quant_experts(a, xs);
  } else {
    grow(s.act, rows * a.I);
    float_experts(a, xs, s.act.data());
  }
}

// Experts into the calling thread's scratch, then combine (see moe.h).
void moe_experts_combine(MoEExpertsArgs a, const float* weights, void* out, DType out_dtype, int64_t ldo) {
  const int64_t P = a.T * a.top_k, rows = a.expert_offsets[a.E];
  Scratch& s = scratch();
  grow(s.out, std::max<int64_t>(rows, 1) * a.H);
  a.sorted_out = s.out.data();
  moe_experts(a);
  std::vector<int32_t> pos(static_cast<size_t>(P), -1);
  for (int64_t i = 0; i < rows; ++i) pos[a.sorted_pair_ids[i]] = static_cast<int32_t>(i);
  moe_combine(a.sorted_out, a.H, pos.data(), weights, a.T, a.top_k, a.H, out, out_dtype, ldo,
              effective_threads(a));
}

}  // namespace cpu
}  // namespace kernswap
