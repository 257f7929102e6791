// Portable compute_block for the quantized-linear engine: plain loops the compiler vectorises for the
// translation unit's ISA (baseline x86-64 or AVX2). Same arithmetic as the AVX-512 kernel: exact int32
// dot products per segment, then the fp32 rescale.
#pragma once
#include "cpu/qlinear_common.h"

namespace kernswap {
namespace cpu {
namespace KS_ISA_NS {

// Unsigned weight lanes of tile t for k-quad q: w[nn*4 + kk] for row nn, k = 4q + kk.
inline void load_quad(const Plan& p, const uint8_t* tile, int64_t q, uint8_t* w) {
  if (p.bits == 8) {
    const uint8_t* src = tile + q * 64;
    for (int i = 0; i < 64; ++i) w[i] = src[i] ^ 0x80;
  } else {
    const uint8_t* src = tile + (q >> 1) * 64;
    const int shift = (q & 1) ? 4 : 0;
    for (int i = 0; i < 64; ++i) w[i] = (src[i] >> shift) & 0x0F;
  }
}

inline void compute_block(const Plan& p, const QLinearArgs& a, const Acts& acts, int64_t m0, int64_t mc, int64_t t0,
                          int64_t tc) {
  uint8_t w[64];
  for (int64_t t = t0; t < t0 + tc; ++t) {
    const uint8_t* tile = a.packed + t * p.tile_bytes;
    const int64_t n0 = t * 16;
    for (int64_t m = m0; m < m0 + mc; ++m) {
      float out[16] = {0};
      for (int64_t s = 0; s < p.nseg; ++s) {
        int32_t acc[3][16] = {{0}};
        for (int64_t q = p.seg_begin(s) / 4; q < p.seg_end(s) / 4; ++q) {
          load_quad(p, tile, q, w);
          for (int d = 0; d < p.ndig; ++d) {
            const int8_t* ad = acts.row(p, m, d) + 4 * q;
            for (int nn = 0; nn < 16; ++nn)
              for (int kk = 0; kk < 4; ++kk) acc[d][nn] += static_cast<int32_t>(w[nn * 4 + kk]) * ad[kk];
          }
        }
        const int64_t g = p.group_of(s);
        const float sx = acts.sx[m * p.nseg + s], as = acts.asum[m * p.nseg + s];
        for (int nn = 0; nn < 16; ++nn) {
          float tv = static_cast<float>(acc[p.ndig - 1][nn]);
          for (int d = p.ndig - 2; d >= 0; --d) tv = std::fma(tv, 128.f, static_cast<float>(acc[d][nn]));
          tv = std::fma(-zero_point(p, a, g, n0 + nn), as, tv);
          out[nn] = std::fma(tv * sx, a.scale[g * p.Np + n0 + nn], out[nn]);
        }
      }
      store_span(a, m, n0, std::min<int64_t>(16, p.N - n0), out);
    }
  }
}

}  // namespace KS_ISA_NS
}  // namespace cpu
}  // namespace kernswap
