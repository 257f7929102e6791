#include "cpu/sgemm.h"

#include "cpu/isa.h"

namespace kernswap {
namespace cpu {

void sgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  switch (active_isa()) {
    case Isa::Avx512Vnni: return avx512::sgemm_nn(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    case Isa::Avx2: return avx2::sgemm_nn(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    default: return scalar::sgemm_nn(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C,
              int64_t ldc, bool accumulate) {
  switch (active_isa()) {
    case Isa::Avx512Vnni: return avx512::sgemm_nt(M, N, K, A, lda, Bt, ldbt, C, ldc, accumulate);
    case Isa::Avx2: return avx2::sgemm_nt(M, N, K, A, lda, Bt, ldbt, C, ldc, accumulate);
    default: return scalar::sgemm_nt(M, N, K, A, lda, Bt, ldbt, C, ldc, accumulate);
  }
}

}  // namespace cpu
}  // namespace kernswap
