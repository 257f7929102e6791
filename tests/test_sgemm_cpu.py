"""The fp32 GEMM of the CPU module (kernswap._C.sgemm_nn / sgemm_nt, test-only bindings) against torch.matmul
in fp64, on odd sizes, strided operands, accumulate on/off, every ISA the module supports."""
import math

import pytest
import torch

from conftest import HAVE_C, ISAS, NO_C_REASON, use_isa
from kernswap import _ext
from kernswap.backends.cpu import extent

pytestmark = pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)

# (M, N, K): empty, tiny, micro-tile edges (6 rows x 64 columns), the dot-product path (M <= 4), the packed paths
# (M > 12; A copied when N > 128), several k blocks (K > 256), every AVX2 column tail of a 16-column slice
# (1-7, 8, 9-15 columns left: one masked, one full, one full + one masked 8-lane vector) and k tails of 8.
SHAPES = [(0, 5, 7), (5, 0, 7), (3, 5, 0), (13, 9, 0), (1, 1, 1), (4, 67, 33), (5, 7, 3), (6, 64, 16), (13, 65, 129),
          (7, 130, 257), (37, 200, 300), (100, 33, 513), (31, 129, 17), (14, 76, 40), (20, 48, 9), (3, 13, 15),
          (17, 24, 8)]


def _buf(t):
    """(address, element count, leading dimension) of a row-major operand, as the binding takes them."""
    return t.data_ptr(), extent(t), t.stride(0)


def _operands(M, N, K, transposed_b):
    # leading dimensions larger than the rows, so every ld is exercised
    a = torch.randn(M, K + 3)[:, :K]
    b = torch.randn(N, K + 5)[:, :K] if transposed_b else torch.randn(K, N + 2)[:, :N]
    c = torch.randn(M, N + 1)[:, :N]
    return a, b, c


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("transposed_b", [False, True], ids=["nn", "nt"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "acc"])
def test_sgemm_matches_matmul(isa, transposed_b, accumulate):
    C = _ext.get_C()
    fn = C.sgemm_nt if transposed_b else C.sgemm_nn
    with use_isa(isa):
        for M, N, K in SHAPES:
            a, b, c = _operands(M, N, K, transposed_b)
            bk = b.t() if transposed_b else b
            ref = a.double() @ bk.double() + (c.double() if accumulate else 0)
            # fp32 accumulation in any order: |err| <= K * eps32 * (|a| @ |b|) (+ the rounding of the C add)
            mag = a.double().abs() @ bk.double().abs() + c.double().abs()
            tol = (max(K, 1) + 1) * torch.finfo(torch.float32).eps * mag + 1e-30
            fn(M, N, K, *_buf(a), *_buf(b), *_buf(c), accumulate)
            err = (c.double() - ref).abs()
            assert not (err > tol).any(), f"{isa} {M}x{N}x{K}: max err {err.max().item():.3e}"


@pytest.mark.parametrize("isa", ISAS)
def test_sgemm_leaves_other_memory_alone(isa):
    """Writes only C[:M, :N] (masked edges), reads nothing past the operands' last element."""
    C = _ext.get_C()
    M, N, K = 9, 70, 19
    with use_isa(isa):
        for fn, transposed in ((C.sgemm_nn, False), (C.sgemm_nt, True)):
            a, b, _ = _operands(M, N, K, transposed)
            big = torch.full((M, N + 7), 123.0)
            fn(M, N, K, *_buf(a), *_buf(b), *_buf(big), False)
            assert torch.all(big[:, N:] == 123.0)
            bk = b.t() if transposed else b
            torch.testing.assert_close(big[:, :N], a @ bk, rtol=1e-5, atol=1e-4 * math.sqrt(K))
