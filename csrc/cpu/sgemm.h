// Single-threaded fp32 GEMM for the CPU kernels (callers parallelise; see parallel.h). Torch-free.
//
// Public entry points run the kernel of the active tier (registry in sgemm.cpp, see dispatch.h):
//   sgemm_nn: C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N]
//             A(m,k) = A[m*lda + k], B(k,n) = B[k*ldb + n], C(m,n) = C[m*ldc + n]
//   sgemm_nt: the same with B given transposed, B(k,n) = Bt[n*ldbt + k] (e.g. a Linear weight [N, K]).
//             M <= 4 runs dot products straight on the Bt rows (memory-bound decode); larger M packs 64-column
//             panels of Bt into a thread-local buffer once per panel and reuses each panel for every row.
// Any sizes >= 0 (a zero K with accumulate=false writes zeros).
//
// Internal (for other kernels of this module, per ISA namespace, no dispatch):
//   gemm_strided: C = (accumulate ? C * col_scale : 0) + A * B on a cache-resident tile, no packing:
//                 A(m,k) = A[m*a_rs + k*a_cs] (either layout), B(k,n) = B[k*ldb + n] (rows contiguous).
//                 col_scale (length N) is optional: when given and accumulate, C(m,n) is multiplied by
//                 col_scale[n] before the product is added (the flash-attention rescale of an accumulator).
//   transpose:    dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
#pragma once
#include <cstdint>

namespace kernswap {
namespace cpu {

void sgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate);
void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C,
              int64_t ldc, bool accumulate);

#define KS_SGEMM_DECLS                                                                                            \
  void sgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,       \
                float* C, int64_t ldc, bool accumulate);                                                           \
  void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt,     \
                float* C, int64_t ldc, bool accumulate);                                                           \
  void gemm_strided(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, \
                    int64_t ldb, float* C, int64_t ldc, bool accumulate, const float* col_scale);              \
  void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd);

namespace scalar { KS_SGEMM_DECLS }
namespace avx2 { KS_SGEMM_DECLS }
namespace avx512 { KS_SGEMM_DECLS }

#undef KS_SGEMM_DECLS

}  // namespace cpu
}  // namespace kernswap
