// The block-sparse attention driver shared by every ISA (see attention.h), compiled once per ISA translation
// unit inside `namespace KS_ISA_NS`. Each TU defines in `attn_detail`, before including this file:
//   void to_f32(const void* src, DType t, int64_t n, float* dst);             // n elements to fp32
//   void from_f32(const float* src, float mul, DType t, int64_t n, void* dst); // src * mul to dtype t
// ncols is a multiple of 16 for the two below (the column buffers are padded; padding columns hold finite junk).
//   void apply_limits(float* st, int64_t ld, int64_t nk, int64_t ncols, const int32_t* lim);
//        st[r * ld + c] = -inf wherever r > lim[c] (key row r of the block not visible to query column c)
//   void softmax_update(float* st, int64_t ld, int64_t nk, int64_t ncols, float* m, float* l, float* alpha);
//        per column c, over the nk rows (base-2 logits): m' = max(m, max_r st), mu = (m' == -inf ? 0 : m'),
//        alpha = 2^(m - mu), st = 2^(st - mu), l = l * alpha + sum_r st, m = m'
// and the fp32 GEMM of the same ISA (gemm_strided, sgemm.h).
//
// Non-finite inputs (the README's NaN / Inf policy): a query row whose q row, or whose visible keys' k or v
// rows, hold a NaN or an Inf is "poisoned": its output row and lse are NaN. No other row is touched, and a key
// that a row cannot see never reaches it, not even as 0 x NaN in P V. A non-finite q row runs as zeros and
// poisons its own column. Key blocks:
//   - scanned (prefill, and any block some column sees only in part): the first visit of each (b, kv head, key
//     block) scans its K and V rows (the state is kept for the call: prefill scans each block once); a block
//     with a non-finite row runs on a converted copy with those rows zeroed, and poisons the columns that see
//     them;
//   - not scanned (a decode tile's blocks that every column sees whole: scanning them would read each block
//     twice): a non-finite k row makes that row of S^T non-finite (checked, 1/D of the scan's reads), a
//     non-finite v row makes the output row non-finite (checked when the row is written).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "cpu/attention.h"
#include "cpu/parallel.h"
#include "cpu/sgemm.h"

#ifndef KS_ISA_NS
#error "define KS_ISA_NS before including attention_driver.h"
#endif

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {
namespace attn_detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kDecodeCols = 64;  // decode: every GQA head's rows in one tile of at most this many columns

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t elem_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Whether nk rows of n elements (row r at first + r * stride_bytes) are all finite: per-lane maxima carried
// across the rows (one vector register), reduced once at the end.
template <typename U, int L>
inline U max_magnitude(const char* first, int64_t stride_bytes, int64_t nk, int64_t n, U abs_mask) {
  U acc[L] = {};
  U tail = 0;
  const int64_t nv = n / L * L;
  for (int64_t r = 0; r < nk; ++r) {
    const U* s = reinterpret_cast<const U*>(first + r * stride_bytes);
    for (int64_t i = 0; i < nv; i += L)
      for (int l = 0; l < L; ++l) acc[l] = std::max<U>(acc[l], s[i + l] & abs_mask);
    for (int64_t i = nv; i < n; ++i) tail = std::max<U>(tail, s[i] & abs_mask);
  }
  for (int l = 0; l < L; ++l) tail = std::max(tail, acc[l]);
  return tail;
}

inline bool finite_rows(const char* first, int64_t stride_bytes, int64_t nk, DType t, int64_t n) {
  if (t == DType::F32) return max_magnitude<uint32_t, 16>(first, stride_bytes, nk, n, 0x7fffffffu) < 0x7f800000u;
  return max_magnitude<uint16_t, 32>(first, stride_bytes, nk, n, 0x7fffu) < (t == DType::BF16 ? 0x7f80u : 0x7c00u);
}

inline bool finite_row(const void* src, DType t, int64_t n) {
  return finite_rows(static_cast<const char*>(src), 0, 1, t, n);
}

// A poisoned row: NaN in every element of the output dtype.
inline void nan_row(void* dst, DType t, int64_t n) {
  if (t == DType::F32) {
    std::fill_n(static_cast<float*>(dst), n, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  std::fill_n(static_cast<uint16_t*>(dst), n, static_cast<uint16_t>(t == DType::BF16 ? 0x7fc0u : 0x7e00u));
}

struct Problem {
  const AttnArgs& a;
  int64_t G, nqb, nkb, off, esz;
  float qscale;
  std::atomic<uint8_t>* kv_state;  // per (b, kv head, key block): 0 not scanned, 1 finite, 2 has non-finite rows
  bool keep(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return a.mask[b * a.mask_stride[0] + h * a.mask_stride[1] + qb * a.mask_stride[2] + kb * a.mask_stride[3]] != 0;
  }
  const char* qrow(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const char*>(a.q) + (b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]) * esz;
  }
  const char* krow(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const char*>(a.k) + (b * a.k_stride[0] + hk * a.k_stride[1] + j * a.k_stride[2]) * esz;
  }
  const char* vrow(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const char*>(a.v) + (b * a.v_stride[0] + hk * a.v_stride[1] + j * a.v_stride[2]) * esz;
  }
  // whether key block kb (rows k0 .. k0+nk-1) of (b, hk) has a non-finite K or V row; scanned on first use
  // (two threads may both scan a block: they store the same state)
  bool dirty(int64_t b, int64_t hk, int64_t kb, int64_t k0, int64_t nk) const {
    std::atomic<uint8_t>& st = kv_state[(b * a.Hkv + hk) * nkb + kb];
    uint8_t s = st.load(std::memory_order_relaxed);
    if (s == 0) {
      const bool ok = finite_rows(krow(b, hk, k0), a.k_stride[2] * esz, nk, a.dtype, a.D) &&
                      finite_rows(vrow(b, hk, k0), a.v_stride[2] * esz, nk, a.dtype, a.D);
      s = ok ? 1 : 2;
      st.store(s, std::memory_order_relaxed);
    }
    return s == 2;
  }
};

// One tile of query columns: heads h0 .. h0+ng-1 of one kv head, rows i0 .. i0+nr-1, all inside query block
// i0 / bs. The columns form groups, each padded to a multiple of 16 and run as one GEMM column range:
//   merged (decode): one group, column g * nr + r; a key block runs when any head keeps it and the columns of
//                    heads that do not keep it are hidden (few rows per head share the vector lanes);
//   per head (prefill): group g holds head g's rows; a key block runs only for the heads that keep it.
// Each group's buffers are contiguous with leading dimension ldg (Q^T, O^T: [D][ldg], S^T: [bs][ldg]);
// m, l, alpha, lim are [ngroups * ldg]. A merged tile has few columns: its output accumulates as O [gcols][D]
// instead (rows of P^T broadcast against V's rows: every lane useful), rescaled by alpha row by row.
// Key blocks are the outer loop either way, so each K/V block is read (and converted) once for all the heads.
// Per-thread buffers, reused across tasks and calls.
struct Tile {
  std::vector<float> qt, st, ot, m, l, alpha, kbuf, vbuf, row;
  std::vector<int32_t> lim;
  std::vector<char> any;     // per group: some block ran (O^T written)
  std::vector<char> bad;     // per column [ngroups * ldg]: poisoned (see the NaN / Inf policy above)
  std::vector<char> rowbad;  // per key row of the current block: its K or V row is non-finite
  int64_t ngroups = 0, gcols = 0, ldg = 0;
  bool merged = false;
  // head (relative to h0) and row (relative to i0) of column c of group gi
  int64_t head_of(int64_t gi, int64_t c, int64_t nr) const { return merged ? c / nr : gi; }
  int64_t row_of(int64_t c, int64_t nr) const { return merged ? c % nr : c; }
};

inline Tile& tile_scratch() {
  static thread_local Tile t;
  return t;
}

// The block's fp32 rows: in place for fp32 inputs, else converted into buf. Returns the row stride via ld.
inline const float* block_rows(const Problem& p, const char* first, int64_t stride, int64_t nk, std::vector<float>& buf,
                               int64_t& ld) {
  const int64_t D = p.a.D;
  if (p.a.dtype == DType::F32) {
    ld = stride;
    return reinterpret_cast<const float*>(first);
  }
  buf.resize(static_cast<size_t>(nk * D));
  for (int64_t r = 0; r < nk; ++r) to_f32(first + r * stride * p.esz, p.a.dtype, D, buf.data() + r * D);
  ld = D;
  return buf.data();
}

// A dirty block's fp32 rows, always copied into buf, with every non-finite row zeroed and flagged in bad
// (bad[r] |= the row was non-finite).
inline const float* clean_rows(const Problem& p, const char* first, int64_t stride, int64_t nk,
                               std::vector<float>& buf, std::vector<char>& bad) {
  const int64_t D = p.a.D;
  buf.resize(static_cast<size_t>(nk * D));
  for (int64_t r = 0; r < nk; ++r) {
    float* dst = buf.data() + r * D;
    to_f32(first + r * stride * p.esz, p.a.dtype, D, dst);
    if (!finite_row(dst, DType::F32, D)) {
      std::fill_n(dst, D, 0.f);
      bad[r] = 1;
    }
  }
  return buf.data();
}

// Runs the tile's columns against the listed key blocks; leaves m, l (base 2) and O^T in t
// (a group's O^T columns are not written when no block ran for it: t.any).
inline void run_tile(const Problem& p, Tile& t, int64_t b, int64_t hk, int64_t h0, int64_t ng, int64_t i0, int64_t nr,
                     bool merged, const int32_t* blocks, int64_t nblocks) {
  const AttnArgs& a = p.a;
  const int64_t D = a.D, bs = a.block_size, qb = i0 / bs;
  t.merged = merged;
  t.ngroups = merged ? 1 : ng;
  t.gcols = merged ? ng * nr : nr;
  t.ldg = round16(t.gcols);
  const int64_t ldg = t.ldg, ldc = t.ngroups * ldg;  // ldc: all groups' columns
  t.qt.resize(static_cast<size_t>(D * ldc));
  t.st.resize(static_cast<size_t>(bs * ldc));
  t.ot.resize(static_cast<size_t>(D * ldc));
  t.m.assign(static_cast<size_t>(ldc), -std::numeric_limits<float>::infinity());
  t.l.assign(static_cast<size_t>(ldc), 0.f);
  t.alpha.resize(static_cast<size_t>(ldc));
  t.lim.assign(static_cast<size_t>(ldc), static_cast<int32_t>(bs));  // padding columns: nothing hidden
  t.any.assign(static_cast<size_t>(t.ngroups), 0);
  t.bad.assign(static_cast<size_t>(ldc), 0);
  // Q^T: the tile's rows converted and scaled as [ldc][D] (padding rows zero), then each group transposed
  t.row.assign(static_cast<size_t>(ldc * D), 0.f);
  for (int64_t gi = 0; gi < t.ngroups; ++gi)
    for (int64_t c = 0; c < t.gcols; ++c) {
      float* dst = t.row.data() + (gi * ldg + c) * D;
      to_f32(p.qrow(b, h0 + t.head_of(gi, c, nr), i0 + t.row_of(c, nr)), a.dtype, D, dst);
      if (!finite_row(dst, DType::F32, D)) {  // poisoned: runs as a zero query
        t.bad[gi * ldg + c] = 1;
        std::fill_n(dst, D, 0.f);
      }
      for (int64_t d = 0; d < D; ++d) dst[d] *= p.qscale;
    }
  for (int64_t gi = 0; gi < t.ngroups; ++gi)
    transpose(ldg, D, t.row.data() + gi * ldg * D, D, t.qt.data() + gi * D * ldg, ldg);
  const int64_t ks = a.k_stride[2], vs = a.v_stride[2], row_bytes = D * p.esz;
  for (int64_t bi = 0; bi < nblocks; ++bi) {
    const int64_t kb = blocks[bi], k0 = kb * bs, nk = std::min(bs, a.Sk - k0);
    const float *kf = nullptr, *vf = nullptr;
    int64_t ldk = 0, ldv = 0;
    int dirty = -1;  // the block has a non-finite K or V row (-1: not asked yet)
    // a later block's K/V rows towards L2 while this one computes, a share before each group that runs (one
    // line per 128 bytes: the L2 fetches line pairs). Decode tiles compute little per block: fetch further ahead.
    const int64_t ahead = bi + (merged ? 2 : 1);
    const int64_t nkb_next = ahead < nblocks ? std::min(bs, a.Sk - blocks[ahead] * bs) : 0;
    const int64_t next0 = ahead < nblocks ? blocks[ahead] * bs : 0;
    int64_t nrun = 0;
    for (int64_t gi = 0; gi < t.ngroups; ++gi) nrun += merged || p.keep(b, h0 + gi, qb, kb);
    int64_t ran = 0;
    for (int64_t gi = 0; gi < t.ngroups; ++gi) {
      if (!merged && !p.keep(b, h0 + gi, qb, kb)) continue;
      for (int64_t r = ran * nkb_next / nrun; r < (ran + 1) * nkb_next / nrun; ++r) {
        const char* kr = p.krow(b, hk, next0 + r);
        const char* vr = p.vrow(b, hk, next0 + r);
        for (int64_t o = 0; o < row_bytes; o += 128) {
          __builtin_prefetch(kr + o, 0, 2);
          __builtin_prefetch(vr + o, 0, 2);
        }
      }
      ++ran;
      // lim[c]: last visible key row of this block for column c (-1: none)
      bool full = true, visible = false;
      int32_t* lim = t.lim.data() + gi * ldg;
      for (int64_t c = 0; c < t.gcols; ++c) {
        const int64_t g = t.head_of(gi, c, nr);
        int64_t last = (!merged || p.keep(b, h0 + g, qb, kb)) ? nk - 1 : -1;
        if (last >= 0 && a.causal) last = std::max<int64_t>(-1, std::min(last, i0 + t.row_of(c, nr) + p.off - k0));
        lim[c] = static_cast<int32_t>(last);
        full = full && last == nk - 1;
        visible = visible || last >= 0;
      }
      if (!visible) continue;
      const bool scan = !merged || !full;
      if (scan && dirty < 0 && (dirty = p.dirty(b, hk, kb, k0, nk))) {
        t.rowbad.assign(static_cast<size_t>(nk), 0);
        kf = clean_rows(p, p.krow(b, hk, k0), ks, nk, t.kbuf, t.rowbad);
        vf = clean_rows(p, p.vrow(b, hk, k0), vs, nk, t.vbuf, t.rowbad);
        ldk = ldv = D;
      }
      if (dirty == 1)  // a column that sees a non-finite key row is poisoned
        for (int64_t c = 0; c < t.gcols; ++c)
          for (int64_t r = 0; r <= lim[c]; ++r)
            if (t.rowbad[r]) {
              t.bad[gi * ldg + c] = 1;
              break;
            }
      if (!kf) kf = block_rows(p, p.krow(b, hk, k0), ks, nk, t.kbuf, ldk);
      // the group's whole padded column range runs (padding columns are zero queries: finite junk, never read)
      const int64_t c0 = gi * ldg;
      float* st = t.st.data() + gi * bs * ldg;
      gemm_strided(nk, ldg, D, kf, ldk, 1, t.qt.data() + gi * D * ldg, ldg, st, ldg, false, nullptr);
      if (dirty < 0 && !finite_rows(reinterpret_cast<const char*>(st), ldg * 4, nk, DType::F32, ldg))
        std::fill_n(t.bad.begin() + c0, t.gcols, 1);  // unscanned, seen whole by every column: a bad k row
      if (!full) apply_limits(st, ldg, nk, ldg, lim);
      softmax_update(st, ldg, nk, ldg, t.m.data() + c0, t.l.data() + c0, t.alpha.data() + c0);
      if (!vf) vf = block_rows(p, p.vrow(b, hk, k0), vs, nk, t.vbuf, ldv);
      if (merged) {
        float* o = t.ot.data();
        if (t.any[0])
          for (int64_t c = 0; c < t.gcols; ++c)
            for (int64_t d = 0; d < D; ++d) o[c * D + d] *= t.alpha[c];
        gemm_strided(t.gcols, D, nk, st, 1, ldg, vf, ldv, o, D, t.any[0] != 0, nullptr);
      } else {
        gemm_strided(D, ldg, nk, vf, 1, ldv, st, ldg, t.ot.data() + gi * D * ldg, ldg, t.any[gi] != 0,
                     t.alpha.data() + c0);
      }
      t.any[gi] = 1;
    }
  }
}

// Writes one output row and its lse from the unnormalised fp32 row o (poisoned: NaN row and lse; l == 0: zero
// row, lse -inf).
inline void write_row(const Problem& p, int64_t b, int64_t h, int64_t i, const float* o, float m, float l,
                      bool poisoned) {
  const AttnArgs& a = p.a;
  const int64_t D = a.D, idx = (b * a.Hq + h) * a.Sq + i;
  void* dst = static_cast<char*>(a.out) + idx * D * p.esz;
  if (poisoned || (l > 0.f && !finite_row(o, DType::F32, D))) {  // (a non-finite v row of an unscanned block)
    nan_row(dst, a.dtype, D);
    a.lse[idx] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (!(l > 0.f)) {
    std::memset(dst, 0, static_cast<size_t>(D * p.esz));  // +0.0 in every dtype
    a.lse[idx] = -std::numeric_limits<float>::infinity();
    return;
  }
  from_f32(o, 1.f / l, a.dtype, D, dst);
  a.lse[idx] = (m + std::log2(l)) * kLn2;
}

// Writes the tile's rows of a per-head tile: each group's O^T transposed back to [ldg][D] (in t.row), then
// each row normalised.
inline void write_tile(const Problem& p, Tile& t, int64_t b, int64_t h0, int64_t i0, int64_t nr) {
  const int64_t D = p.a.D;
  for (int64_t gi = 0; gi < t.ngroups; ++gi) {
    if (!t.any[gi]) continue;
    transpose(D, t.ldg, t.ot.data() + gi * D * t.ldg, t.ldg, t.row.data() + gi * t.ldg * D, D);
  }
  for (int64_t gi = 0; gi < t.ngroups; ++gi)
    for (int64_t c = 0; c < t.gcols; ++c) {
      const int64_t col = gi * t.ldg + c;
      write_row(p, b, h0 + t.head_of(gi, c, nr), i0 + t.row_of(c, nr), t.row.data() + col * D, t.m[col],
                t.any[gi] ? t.l[col] : 0.f, t.bad[col] != 0);
    }
}

inline int threads_for(const AttnArgs& a, double macs) {
  // a worker is woken only for >= ~4M multiply-adds of its own
  return static_cast<int>(std::max(1.0, std::min<double>(a.num_threads, macs / (1 << 22))));
}

// ---- prefill: tasks (b, kv head, query block, run of GQA heads), largest first ------------------------------
// A task's heads share each K/V block; their state (Q^T, S^T, O^T: (2 D + bs) x 64 floats a head for 64-row
// blocks) is kept under ~768 KiB so that it stays in L2 with the blocks.
inline void run_prefill(const Problem& p) {
  const AttnArgs& a = p.a;
  const int64_t bs = a.block_size, head_bytes = (2 * a.D + bs) * round16(bs) * 4;
  const int64_t hc = std::max<int64_t>(1, std::min<int64_t>(p.G, (int64_t{768} << 10) / head_bytes));
  const int64_t nhc = (p.G + hc - 1) / hc, ntask = a.B * a.Hkv * p.nqb * nhc;
  struct Task {
    int64_t b, hk, qb, h0, ng;
  };
  auto task = [&](int64_t id) {
    const int64_t ci = id % nhc, rest = id / nhc, qb = rest % p.nqb, bh = rest / p.nqb;
    return Task{bh / a.Hkv, bh % a.Hkv, qb, (bh % a.Hkv) * p.G + ci * hc, std::min(hc, p.G - ci * hc)};
  };
  auto kb_end = [&](int64_t qb) {
    const int64_t i0 = qb * bs, nq = std::min(bs, a.Sq - i0);
    return a.causal ? std::min(p.nkb, (i0 + nq - 1 + p.off) / bs + 1) : p.nkb;
  };
  std::vector<int64_t> cost(static_cast<size_t>(ntask), 0);
  double total = 0;
  for (int64_t id = 0; id < ntask; ++id) {
    const Task tk = task(id);
    const int64_t end = kb_end(tk.qb);
    int64_t c = 0;
    for (int64_t g = 0; g < tk.ng; ++g)
      for (int64_t kb = 0; kb < end; ++kb) c += p.keep(tk.b, tk.h0 + g, tk.qb, kb);
    cost[id] = c + 1;
    total += static_cast<double>(c) * bs * std::min(bs, a.Sq - tk.qb * bs) * a.D * 2;
  }
  std::vector<int64_t> order(static_cast<size_t>(ntask));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  std::atomic<int64_t> next{0};
  const int threads = threads_for(a, total);
  parallel_for(threads, threads, [&](int64_t, int64_t) {
    Tile& t = tile_scratch();
    std::vector<int32_t> blocks;
    for (int64_t n; (n = next.fetch_add(1)) < ntask;) {
      const Task tk = task(order[n]);
      const int64_t i0 = tk.qb * bs, nq = std::min(bs, a.Sq - i0), end = kb_end(tk.qb);
      blocks.clear();  // blocks kept by any head of the task, not entirely in the future
      for (int64_t kb = 0; kb < end; ++kb) {
        bool used = false;
        for (int64_t g = 0; g < tk.ng && !used; ++g) used = p.keep(tk.b, tk.h0 + g, tk.qb, kb);
        if (used) blocks.push_back(static_cast<int32_t>(kb));
      }
      run_tile(p, t, tk.b, tk.hk, tk.h0, tk.ng, i0, nq, false, blocks.data(), static_cast<int64_t>(blocks.size()));
      write_tile(p, t, tk.b, tk.h0, i0, nq);
    }
  });
}

// ---- decode: one tile per (b, kv head) holding every GQA head's rows; its kept key blocks are split into
// chunks run by different threads, then merged (log-sum-exp rule) ------------------------------------------
inline void run_decode(const Problem& p) {
  const AttnArgs& a = p.a;
  const int64_t bs = a.block_size, nbh = a.B * a.Hkv, ncols = p.G * a.Sq, ldc = round16(ncols), D = a.D;
  std::vector<std::vector<int32_t>> lists(static_cast<size_t>(nbh));
  int64_t total = 0;
  for (int64_t bh = 0; bh < nbh; ++bh) {
    const int64_t b = bh / a.Hkv, hk = bh % a.Hkv;
    for (int64_t kb = 0; kb < p.nkb; ++kb) {
      bool used = false;
      for (int64_t g = 0; g < p.G && !used; ++g) used = p.keep(b, hk * p.G + g, 0, kb);
      // causal: a block is entirely in the future when its first key is past the last row's position
      if (used && !(a.causal && kb * bs > a.Sq - 1 + p.off)) lists[bh].push_back(static_cast<int32_t>(kb));
    }
    total += static_cast<int64_t>(lists[bh].size());
  }
  const int threads = threads_for(a, static_cast<double>(total) * bs * ncols * D * 2);
  const int64_t chunk = std::max<int64_t>(2, (total + 4 * threads - 1) / (4 * threads));
  struct Task {
    int64_t bh, begin, end;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(static_cast<size_t>(nbh + 1));
  for (int64_t bh = 0; bh < nbh; ++bh) {
    first_task[bh] = static_cast<int64_t>(tasks.size());
    const int64_t n = static_cast<int64_t>(lists[bh].size());
    for (int64_t s = 0; s < std::max<int64_t>(n, 1); s += chunk) tasks.push_back({bh, s, std::min(n, s + chunk)});
  }
  first_task[nbh] = static_cast<int64_t>(tasks.size());
  const int64_t ntask = static_cast<int64_t>(tasks.size()), part = 3 * ldc + ncols * D;
  // per task: m[ldc], l[ldc], poisoned[ldc] (0 / 1), O[ncols][D]
  std::vector<float> partial(static_cast<size_t>(ntask * part));
  std::vector<int64_t> order(static_cast<size_t>(ntask));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return tasks[x].end - tasks[x].begin > tasks[y].end - tasks[y].begin;
  });
  std::atomic<int64_t> next{0};
  parallel_for(threads, threads, [&](int64_t, int64_t) {
    Tile& t = tile_scratch();
    for (int64_t n; (n = next.fetch_add(1)) < ntask;) {
      const Task& tk = tasks[order[n]];
      const int64_t b = tk.bh / a.Hkv, hk = tk.bh % a.Hkv;
      run_tile(p, t, b, hk, hk * p.G, p.G, 0, a.Sq, true, lists[tk.bh].data() + tk.begin, tk.end - tk.begin);
      float* out = partial.data() + order[n] * part;
      std::copy(t.m.begin(), t.m.begin() + ldc, out);
      for (int64_t c = 0; c < ldc; ++c) out[2 * ldc + c] = t.bad[c] ? 1.f : 0.f;
      if (t.any[0]) {
        std::copy(t.l.begin(), t.l.begin() + ldc, out + ldc);
        std::copy(t.ot.begin(), t.ot.begin() + ncols * D, out + 3 * ldc);
      } else {
        std::fill(out + ldc, out + 2 * ldc, 0.f);
        std::fill(out + 3 * ldc, out + part, 0.f);
      }
    }
  });
  // merge the chunks of each (b, kv head) and write the rows
  std::vector<float> o(static_cast<size_t>(D));
  for (int64_t bh = 0; bh < nbh; ++bh) {
    const int64_t b = bh / a.Hkv, hk = bh % a.Hkv;
    for (int64_t c = 0; c < ncols; ++c) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t ti = first_task[bh]; ti < first_task[bh + 1]; ++ti) {
        const float* pt = partial.data() + ti * part;
        if (pt[ldc + c] > 0.f) mx = std::max(mx, pt[c]);
      }
      float l = 0.f;
      bool poisoned = false;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t ti = first_task[bh]; ti < first_task[bh + 1]; ++ti) {
        const float* pt = partial.data() + ti * part;
        poisoned = poisoned || pt[2 * ldc + c] != 0.f;
        if (!(pt[ldc + c] > 0.f)) continue;
        const float w = std::exp2(pt[c] - mx);
        l += w * pt[ldc + c];
        const float* oc = pt + 3 * ldc + c * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * oc[d];
      }
      write_row(p, b, hk * p.G + c / a.Sq, c % a.Sq, o.data(), mx, l, poisoned);
    }
  }
}

}  // namespace attn_detail

void block_sparse_attention(const AttnArgs& a) {
  using namespace attn_detail;
  if (a.B <= 0 || a.Hq <= 0 || a.Sq <= 0 || a.D <= 0) return;
  const int64_t bs = a.block_size;
  const int64_t nkb = (a.Sk + bs - 1) / bs;
  std::unique_ptr<std::atomic<uint8_t>[]> kv_state(new std::atomic<uint8_t>[std::max<int64_t>(1, a.B * a.Hkv * nkb)]());
  const Problem p{a, a.Hq / a.Hkv, (a.Sq + bs - 1) / bs, nkb, a.Sk - a.Sq, elem_size(a.dtype), a.scale * kLog2e,
                  kv_state.get()};
  if (a.Sk <= 0) {  // nothing to attend: zero rows, lse -inf (NaN for a non-finite q row)
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t h = 0; h < a.Hq; ++h)
        for (int64_t i = 0; i < a.Sq; ++i)
          write_row(p, b, h, i, nullptr, 0.f, 0.f, !finite_row(p.qrow(b, h, i), a.dtype, a.D));
    return;
  }
  if (p.nqb == 1 && p.G * a.Sq <= kDecodeCols)
    run_decode(p);
  else
    run_prefill(p);
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
