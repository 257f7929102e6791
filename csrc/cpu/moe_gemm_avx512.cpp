// AVX-512 weight-stationary product for the MoE experts (moe_gemm.h).
//
// Micro-kernel: MR weight rows x NV vectors of 16 columns (all of Xt's row: N <= 64). Per k it loads NV
// vectors of Xt (the last one masked to N) and broadcasts MR weight elements straight from the weight rows,
// MR * NV fused multiply-adds into MR * NV accumulators. The tile shape follows NV so that the accumulators
// fill ~24 of the 32 zmm registers: NV = 1 -> 14 rows, 2 -> 12, 3 -> 8, 4 -> 6. Remaining rows use the same
// kernel with fewer rows (instantiated for every row count). k runs in steps of 16 (one cache line of each
// weight row), each step prefetching the rows kPrefetch floats ahead: the weights stream from memory once per
// call, and the hardware prefetchers alone keep up poorly with MR rows of a large stride (measured).
// The loops over rows and vectors are unrolled explicitly so that the accumulators stay in registers.
#include <immintrin.h>

#include "cpu/moe_gemm.h"

namespace kernswap {
namespace cpu {
namespace avx512 {
namespace {

constexpr int64_t kPrefetch = 64;  // floats ahead in each weight row (measured: 32 and 96+ slower)

template <int MR, int NV>
void tile(int64_t K, const float* W, int64_t ldw, const float* Xt, int64_t N, float* C, __mmask16 last, bool acc) {
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    const float* x = Xt + k * N;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) b[v] = _mm512_loadu_ps(x + 16 * v);
    b[NV - 1] = _mm512_maskz_loadu_ps(last, x + 16 * (NV - 1));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(W[r * ldw + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(W + r * ldw + k + kPrefetch), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int kk = 0; kk < 16; ++kk) step(k + kk);
  }
  for (; k < K; ++k) step(k);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * N;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v + 1 < NV ? static_cast<__mmask16>(0xffff) : last;
      __m512 o = c[r][v];
      if (acc) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, cr + 16 * v));
      _mm512_mask_storeu_ps(cr + 16 * v, m, o);
    }
  }
}

// Tile of mr <= MR rows (the kernel instantiated for mr).
template <int MR, int NV>
void tile_rows(int mr, int64_t K, const float* W, int64_t ldw, const float* Xt, int64_t N, float* C, __mmask16 last,
               bool acc) {
  if constexpr (MR > 1) {
    if (mr < MR) return tile_rows<MR - 1, NV>(mr, K, W, ldw, Xt, N, C, last, acc);
  }
  tile<MR, NV>(K, W, ldw, Xt, N, C, last, acc);
}

template <int MR, int NV>
void run(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* Xt, float* C, bool acc) {
  const int rem = static_cast<int>(N - 16 * (NV - 1));
  const __mmask16 last = static_cast<__mmask16>(rem >= 16 ? 0xffffu : (1u << rem) - 1u);
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int mr = static_cast<int>(M - m0 < MR ? M - m0 : MR);
    tile_rows<MR, NV>(mr, K, W + m0 * ldw, ldw, Xt, N, C + m0 * N, last, acc);
  }
}

}  // namespace

void moe_ws_gemm(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* Xt, float* C, bool acc) {
  if (M <= 0 || N <= 0) return;
  switch ((N + 15) / 16) {
    case 1: return run<14, 1>(M, N, K, W, ldw, Xt, C, acc);
    case 2: return run<12, 2>(M, N, K, W, ldw, Xt, C, acc);
    case 3: return run<8, 3>(M, N, K, W, ldw, Xt, C, acc);
    default: return run<6, 4>(M, N, K, W, ldw, Xt, C, acc);
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace kernswap
