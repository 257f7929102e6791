// Tier amx (avx512_vnni + AMX-TILE/AMX-INT8: Sapphire Rapids and later Xeons) of the quantized-linear engine: the
// formats with dynamic int8 activations (W8A8, W4A8 with groups of 64 or more) from kAmxFromRows rows on, as tile
// products; everything else (weight-only formats, decode-sized calls, int4 groups of 32, K that no tile step
// divides) is the avx512_vnni tier's.
//
// The activations are the engine's (qlinear_common.h: one signed digit per element, a scale per row), the
// segments too (a weight group for int4, 1024 k for int8), and each segment is flushed into fp32 with the engine's
// formula: out += scale_w * scale_x * (acc - zero * sum(a)). Only the int32 products change hands:
//   * int8 weights: the packed 16-row x 4-k tiles are already the B-tile layout (one 64-byte row per 4 k), read in
//     place as signed bytes (tdpbssd, zero-point 0);
//   * int4 weights: each 16-row tile's nibbles are unpacked once per task into the same layout as unsigned bytes
//     (tdpbsud, zero-point the group's).
// A task is two 16-column weight tiles over a block of rows; 32 rows x 32 columns of int32 sums live in four tile
// registers (2 A tiles x 2 B tiles per k step).
#define KS_ISA_NS amx
#define KS_QL_VNNI 1
#include "cpu/qlinear_kernel_avx512.h"  // the engine's pieces at this tier's flags (store16: the vector row store)

namespace kernswap {
namespace cpu {
namespace amx {
namespace {

constexpr int64_t kAmxFromRows = 32;  // fewer rows: the vpdpbusd engine (W8A8 at 16 rows: 0.88-1.1x there)
constexpr int64_t kRowsPerTask = 128;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// k per tile step: the largest of 64 / 32 that divides both the segment and the padded row (0: none does, or an
// int4 group under 64: each group's flush then costs more than its tile products, and the tiles measured at
// 0.9x the vpdpbusd engine for W4A8 g32 at 512 x 1536 x 576, 1.07x at g64, 1.3-1.5x at g128; Xeon, 2 threads).
int64_t k_step(const Plan& p) {
  if (p.bits == 4 && p.seg_k < 64) return 0;
  for (int64_t s : {64, 32})
    if (p.seg_k % s == 0 && p.kpad % s == 0) return s;
  return 0;
}

void load_config(int64_t kstep) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(t < 6 ? 16 : kstep / 4);        // C, A: 16 rows; B: one per 4 k
    c.colsb[t] = static_cast<uint16_t>(t < 4 || t >= 6 ? 64 : kstep);  // C: 16 int32; A: kstep bytes; B: 64 bytes
  }
  // ldtilecfg reads all 64 bytes, but GCC does not count the intrinsic as a reader of the stores before it (some
  // were dropped: a zero width with 16 rows, which faults): make them happen.
  __asm__ volatile("" : : "m"(c) : "memory");
  _tile_loadconfig(&c);
}

// Weight tile t as B-tile rows (16 columns x 4 k per 64-byte row): int8 in place; int4 unpacked into `buf`.
const uint8_t* b_panel(const Plan& p, const QLinearArgs& a, int64_t t, std::vector<uint8_t>& buf) {
  const uint8_t* src = a.packed + t * p.tile_bytes;
  if (p.bits == 8) return src;
  buf.resize(static_cast<size_t>(p.kpad * 16));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t k = 0; k < p.kpad; k += 8) {  // 64 bytes: n-major 4-byte lanes, low nibble k + i, high k + 4 + i
    const __m512i raw = _mm512_loadu_si512(src + k * 8);
    _mm512_storeu_si512(buf.data() + k * 16, _mm512_and_si512(raw, low4));
    _mm512_storeu_si512(buf.data() + k * 16 + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
  }
  return buf.data();
}

// Segment s's flush of the int32 sums in `sums` [2][2][16][16] (rows m0.., columns of tiles t0, t0 + 1) into the
// fp32 partial results out[r][c]: the first segment writes them, later ones add, and the last one stores the rows.
void flush(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t t0, int nt, int64_t s,
           const int32_t (*sums)[16][16], float (*out)[32]) {
  const bool first = s == 0, last = s == p.nseg - 1;
  const int64_t g = p.group_of(s);
  for (int j = 0; j < nt; ++j) {
    const int64_t n0 = (t0 + j) * 16;
    const __m512 sw = _mm512_loadu_ps(a.scale + g * p.Np + n0);
    // int8: signed weights times signed digits, no zero-point term
    const __m512 zf = p.bits == 8 ? _mm512_setzero_ps() : int4_zero16(p, a, g, n0);
    for (int i = 0; i < 2; ++i)
      for (int r = 0; r < 16 && m0 + 16 * i + r < p.M; ++r) {
        const int64_t at = (m0 + 16 * i + r) * p.nseg + s;
        __m512 tv = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums[2 * i + j][r]));
        tv = _mm512_fnmadd_ps(zf, _mm512_set1_ps(acts.asum[at]), tv);
        float* o = out[16 * i + r] + 16 * j;
        const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(tv, _mm512_set1_ps(acts.sx[at])), sw,
                                         first ? _mm512_setzero_ps() : _mm512_loadu_ps(o));
        if (last) {
          store16(a, m0 + 16 * i + r, n0, v);
        } else {
          _mm512_storeu_ps(o, v);
        }
      }
  }
}

// Rows [m0, m1) x weight tiles t0 (and t0 + 1 when nt == 2), in 32-row blocks.
void task(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t kstep, int64_t m0, int64_t m1, int64_t t0,
          int nt, std::vector<uint8_t>& buf0, std::vector<uint8_t>& buf1) {
  const uint8_t* b0 = b_panel(p, a, t0, buf0);
  const uint8_t* b1 = nt == 2 ? b_panel(p, a, t0 + 1, buf1) : b0;
  alignas(64) int32_t sums[4][16][16];
  alignas(64) float out[32][32];
  const int64_t lda = p.kpad;
  for (int64_t m = m0; m < m1; m += 32) {
    const int8_t* a0 = acts.digits.data() + m * lda;
    const int8_t* a1 = a0 + 16 * lda;  // rows past M are zero digits (padded by the caller)
    for (int64_t s = 0; s < p.nseg; ++s) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = p.seg_begin(s); k < p.seg_end(s); k += kstep) {
        _tile_loadd(4, a0 + k, lda);
        _tile_loadd(5, a1 + k, lda);
        _tile_loadd(6, b0 + k * 16, 64);
        _tile_loadd(7, b1 + k * 16, 64);
        if (p.bits == 8) {
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        } else {
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
      }
      _tile_stored(0, sums[0], 64);
      _tile_stored(1, sums[1], 64);
      _tile_stored(2, sums[2], 64);
      _tile_stored(3, sums[3], 64);
      flush(p, a, acts, m, t0, nt, s, sums, out);
    }
  }
}

}  // namespace

void qlinear(const QLinearArgs& a) {
  const Plan p = make_plan(a);
  const int64_t kstep = a.dynamic_act ? k_step(p) : 0;
  if (a.M < kAmxFromRows || kstep == 0 || p.N <= 0) return avx512_vnni::qlinear(a);
  static thread_local Acts scratch;
  Acts& acts = scratch;
  prepare_acts(p, a, acts);
  const int64_t rows = (p.M + 31) / 32 * 32;
  acts.digits.resize(static_cast<size_t>(rows * p.kpad));  // the padding rows: zero digits
  std::fill(acts.digits.begin() + p.M * p.kpad, acts.digits.end(), int8_t{0});
  const int64_t pairs = (p.ntiles + 1) / 2, mtasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  const double work = static_cast<double>(p.M) * p.Np * p.kpad;
  const int threads = static_cast<int>(std::max<double>(1, std::min<double>(a.num_threads, work / (1 << 20))));
  parallel_for(pairs * mtasks, threads, [&](int64_t b, int64_t e) {
    load_config(kstep);
    static thread_local std::vector<uint8_t> buf0, buf1;  // int4 panels: the pool's threads keep them across calls
    for (int64_t id = b; id < e; ++id) {
      const int64_t pair = id / mtasks, mt = id % mtasks;
      const int64_t t0 = 2 * pair;
      const int nt = t0 + 1 < p.ntiles ? 2 : 1;
      task(p, a, acts, kstep, mt * kRowsPerTask, std::min(rows, (mt + 1) * kRowsPerTask), t0, nt, buf0, buf1);
    }
    _tile_release();
  });
}

}  // namespace amx
}  // namespace cpu
}  // namespace kernswap
