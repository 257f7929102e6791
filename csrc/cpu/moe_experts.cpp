// The experts of a mixture-of-experts layer on the CPU, one call for all experts (see moe.h).
//
//   float weights:     stage 1 tasks (expert, panel of the intermediate columns) gather the expert's token rows
//                      (fp32) and compute act = silu(g) * u for the panel; stage 2 tasks (expert, panel of H):
//                      act @ W_down^T into the sorted output. Every weight element is read once per call whatever
//                      the row count, and a decode step (one row per expert) still splits each expert over the
//                      threads. Per expert, by its row count n: n <= 4 dot products on the weight rows; 5..64
//                      weight-stationary (W times the transposed rows, no weight packing; the activations stay
//                      transposed between the stages); more rows the packed GEMM.
//   quantized weights: rows gathered once in sorted order, then tasks (expert, row block) run gate_up -> SwiGLU
//                      -> down through the quantized-linear engine with one thread each (the packed layouts
//                      cannot be cut into column panels).
// Tasks are sorted by cost and taken from a shared counter (longest first), so uneven experts balance; a stage-2
// task waits only for its own expert's stage-1 tasks (no barrier between the stages).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/half.h"
#include "cpu/moe.h"
#include "cpu/moe_gemm.h"
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
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(s[i]);
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(s[i]);
    }
  }
}

inline int64_t dsize(DType t) { return t == DType::F32 ? 4 : 2; }

struct Task {
  int64_t e, a0, a1;  // expert, range (columns or rows)
  double cost;
};

void sort_by_cost(std::vector<Task>& tasks) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

// Runs f1 on every task of t1 and f2 on every task of t2 on `threads` threads in ONE parallel region (one
// wake-up of the workers per call: on a busy machine each wake-up can cost a scheduler time slice). Tasks are
// taken longest first from one shared counter, all of t1 before any of t2; a t2 task of expert e waits only
// for the t1 tasks of the same expert (dep[e] counts them down), never for a whole phase, so a thread that is
// descheduled or wakes up late does not stall the others.
template <class F1, class F2>
void run_phases(std::vector<Task>& t1, const F1& f1, std::vector<Task>& t2, const F2& f2, int threads) {
  sort_by_cost(t1);
  sort_by_cost(t2);
  const int64_t n1 = static_cast<int64_t>(t1.size()), n2 = static_cast<int64_t>(t2.size());
  if (threads <= 1 || n1 + n2 <= 1) {
    for (auto& t : t1) f1(t);
    for (auto& t : t2) f2(t);
    return;
  }
  int64_t E = 0;  // the dependency counters cover every expert id a task names
  for (const auto* ts : {&t1, &t2})
    for (const auto& t : *ts) E = std::max<int64_t>(E, t.e + 1);
  std::unique_ptr<std::atomic<int32_t>[]> dep(new std::atomic<int32_t>[static_cast<size_t>(E)]);
  for (int64_t e = 0; e < E; ++e) dep[e].store(0, std::memory_order_relaxed);
  for (const auto& t : t1) dep[t.e].fetch_add(1, std::memory_order_relaxed);
  std::atomic<int64_t> next{0};
  parallel_for(threads, threads, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n1 + n2; i = next.fetch_add(1)) {
      if (i < n1) {
        f1(t1[i]);
        dep[t1[i].e].fetch_sub(1, std::memory_order_acq_rel);
        continue;
      }
      const Task& t = t2[i - n1];
      for (int spins = 0; dep[t.e].load(std::memory_order_acquire) > 0; ++spins) {
        if (spins < 4000) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
      }
      f2(t);
    }
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

// The shared GEMM's internal pieces for the active tier (sgemm.h).
const Dispatch<void (*)(int64_t, int64_t, const float*, int64_t, float*, int64_t)> kTranspose{"moe_transpose", {
    {Isa::Scalar, scalar::transpose},
    {Isa::Avx2, KS_X86_KERNEL(avx2::transpose)},
    {Isa::Avx512, KS_X86_KERNEL(avx512::transpose)},
}};

void transpose_f32(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  kTranspose(rows, cols, src, lds, dst, ldd);
}

// Weight-stationary product for an expert with few rows: C[M x N] = W[M x K] (rows of stride ldw) times
// Xt[K x N] (the expert's rows transposed, N = its row count), C of stride N. The weight rows are read straight
// from memory by the micro-kernel (AVX-512: one sized for N, moe_gemm.h; otherwise the shared GEMM's: on AVX2 a
// kernel sized for N (up to 3 rows x 32 columns in 12 ymm, weight prefetch) measured 5-25% slower than the
// GEMM's 6 x 16 slices, whose Xt slice traffic per FMA is half) (no
// packing: with ~5-64 rows per expert, packing the weights would cost as much as the product); k is blocked
// only beyond kWsKc (the Xt block of <= 64 x 1024 floats stays in L2).
constexpr int64_t kWsMinRows = 5;   // fewer rows: dot products on the weight rows (sgemm_nt)
constexpr int64_t kWsMaxRows = 64;  // more rows: the packed GEMM (sgemm_nt), whose weight packing then pays
constexpr int64_t kWsKc = 1024;  // (shorter k blocks cut the weight streams short: measured slower)
// A tier without a weight-stationary micro-kernel of its own runs the product on its strided GEMM (sgemm.h).
using StridedFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                           int64_t, bool, const float*);
template <StridedFn Gemm>
void ws_on_gemm(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* Xt, float* C, bool acc) {
  Gemm(M, N, K, W, ldw, 1, Xt, N, C, N, acc, nullptr);
}

const Dispatch<void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, bool)> kWsGemm{
    "moe_ws_gemm", {
        {Isa::Scalar, ws_on_gemm<scalar::gemm_strided>},
        {Isa::Avx2, KS_X86_KERNEL(ws_on_gemm<avx2::gemm_strided>)},
        {Isa::Avx512, KS_X86_KERNEL(avx512::moe_ws_gemm)},
    }};

void ws_gemm(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* Xt, float* C) {
  const auto kernel = kWsGemm.kernel();
  for (int64_t k0 = 0; k0 < K; k0 += kWsKc) {
    const int64_t kc = std::min(kWsKc, K - k0);
    kernel(M, N, kc, W + k0, ldw, Xt + k0 * N, C, k0 > 0);
  }
}
inline bool ws_rows(int64_t n) { return n >= kWsMinRows && n <= kWsMaxRows; }

// Rows [row0, row0 + n) of the sorted pairs' tokens, as fp32 rows of H.
void gather_rows(const MoEExpertsArgs& a, int64_t row0, int64_t n, float* dst) {
  const int64_t xsz = dsize(a.x_dtype);
  const char* x = static_cast<const char*>(a.x);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = a.sorted_pair_ids[row0 + i] / a.top_k;
    to_f32(x + t * a.x_row_stride * xsz, a.x_dtype, a.H, dst + i * a.H);
  }
}

template <class T>
T* grown(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Float weights. Each stage-1 task gathers its expert's rows itself (no separate gather pass: one parallel
// region per call). Experts with kWsMinRows..kWsMaxRows rows keep their intermediate activations transposed
// ([I, n] at act + row0 * I) between the stages; the others row-major ([n, I]).
void float_experts(const MoEExpertsArgs& a, float* act) {
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

  // Weight rows [r0, r0 + nr) of a [*, K] matrix starting at src, as fp32 (converted into buf if needed).
  auto weight_rows = [&](const char* src, int64_t nr, int64_t K, std::vector<float>& buf) -> const float* {
    if (f32) return reinterpret_cast<const float*>(src);
    float* b = grown(buf, nr * K);
    to_f32(src, a.w_dtype, nr * K, b);
    return b;
  };

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
    thread_local std::vector<float> wg, wu, gu, xb, xt;
    const int64_t e = t.e, j0 = t.a0, nj = t.a1 - t.a0, row0 = off[e], n = off[e + 1] - off[e];
    const float* bg = weight_rows(wgu + (e * 2 * I + j0) * H * wsz, nj, H, wg);
    const float* bu = weight_rows(wgu + (e * 2 * I + I + j0) * H * wsz, nj, H, wu);
    if (ws_rows(n)) {
      gather_rows(a, row0, n, grown(xb, n * H));
      transpose_f32(n, H, xb.data(), H, grown(xt, H * n), n);
      float* g = grown(gu, 2 * nj * n);
      ws_gemm(nj, n, H, bg, H, xt.data(), g);
      ws_gemm(nj, n, H, bu, H, xt.data(), g + nj * n);
      swiglu(g, g + nj * n, act + row0 * I + j0 * n, nj * n);
      return;
    }
    float* g = grown(gu, std::min(n, kRowChunk) * 2 * nj);
    for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
      const int64_t rc = std::min(kRowChunk, n - r0);
      float* x = grown(xb, rc * H);
      gather_rows(a, row0 + r0, rc, x);
      sgemm_nt(rc, nj, H, x, H, bg, H, g, 2 * nj, false);
      sgemm_nt(rc, nj, H, x, H, bu, H, g + nj, 2 * nj, false);
      for (int64_t r = 0; r < rc; ++r)
        swiglu(g + r * 2 * nj, g + r * 2 * nj + nj, act + (row0 + r0 + r) * I + j0, nj);
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
    thread_local std::vector<float> wbuf, ot;
    const int64_t e = t.e, h0 = t.a0, nh = t.a1 - t.a0, row0 = off[e], n = off[e + 1] - off[e];
    const float* b = weight_rows(wd + (e * H + h0) * I * wsz, nh, I, wbuf);
    if (ws_rows(n)) {
      float* o = grown(ot, nh * n);
      ws_gemm(nh, n, I, b, I, act + row0 * I, o);
      transpose_f32(nh, n, o, n, a.sorted_out + row0 * H + h0, H);
      return;
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
  l.zero_f = nullptr;  // stacked experts store integer zero-points only
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
// about 2M multiply-adds, counting a decode step's weight streaming as one row per expert hit. (A higher
// threshold was tried: on a quiet machine a 9M-MAC decode step with L3-resident weights ran 0.8 ms on two
// threads and 1.4 ms on one; with the other core busy, 2.0-2.5 ms on two.)
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
  if (a.q_gate_up.bits == 0) {
    grow(s.act, rows * a.I);
    float_experts(a, s.act.data());
    return;
  }
  // Quantized: gather the pairs' token rows in sorted order (fp32) for the quantized-linear engine.
  grow(s.xs, rows * a.H);
  float* xs = s.xs.data();
  const int gthreads = rows * a.H >= (1 << 16) ? a.num_threads : 1;
  parallel_for(rows, gthreads, [&](int64_t b, int64_t e) { gather_rows(a, b, e - b, xs + b * a.H); });
  quant_experts(a, xs);
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
