#include "cpu/sgemm.h"

#include "cpu/dispatch.h"

namespace kernswap {
namespace cpu {
namespace {

using SgemmFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                         bool);

const Dispatch<SgemmFn> kSgemmNN{"sgemm_nn", {
    {Isa::Scalar, scalar::sgemm_nn},
    {Isa::Avx2, KS_X86_KERNEL(avx2::sgemm_nn)},
    {Isa::Avx512, KS_X86_KERNEL(avx512::sgemm_nn)},
}};

const Dispatch<SgemmFn> kSgemmNT{"sgemm_nt", {
    {Isa::Scalar, scalar::sgemm_nt},
    {Isa::Avx2, KS_X86_KERNEL(avx2::sgemm_nt)},
    {Isa::Avx512, KS_X86_KERNEL(avx512::sgemm_nt)},
}};

}  // namespace

void sgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  kSgemmNN(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldbt, float* C,
              int64_t ldc, bool accumulate) {
  kSgemmNT(M, N, K, A, lda, Bt, ldbt, C, ldc, accumulate);
}

}  // namespace cpu
}  // namespace kernswap
