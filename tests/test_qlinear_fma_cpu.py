"""The fp32 FMA kernels for weight-only formats (csrc/cpu/qlinear_fma_avx2.cpp: 6 x 16, one tile per task, 256-k
chunks; qlinear_fma_avx512.cpp: 6 x 64, four tiles per task, 64-k chunks; driver qlinear_fma_driver.h) at their
boundaries.

The avx2 / avx_vnni qlinear route weight-only calls with M >= 8 (int8) / 16 (int4) to the AVX2 kernel, the avx512
tier from M >= 2 / 4 to the AVX-512 one; the backend sends M >= DENSE_FROM_ROWS rows to the torch-GEMM panels
instead, so these tests pin the threshold off (the kernel runs at every M) and also run the routing as shipped.
Boundaries: the tiers' row thresholds (M = 2..5, 7, 8), row tails of the 6-row micro-kernels (M = 9..11, 13, 16..21),
row blocks of 120 (M = 121, 241), N not a multiple of 16 or of a 4-tile group (N = 1, 15, 17, 33, 65, 130), K not
a multiple of 4 (int8) or of a chunk, int4 groups spanning chunks, K = 4096 with asymmetric int4 g32/g64, bias,
bf16/fp16 inputs and outputs, strided rows. Every ISA of the build runs the same cases.
"""
import math

import pytest
import torch

from conftest import HAVE_C, ISAS, NO_C_REASON, assert_within, quant_tolerance, use_isa
from kernswap.backends import cpu as cpu_backend
from kernswap.formats import quantize
from kernswap.config import QuantConfig
from kernswap.ops import quantized_linear
from kernswap.reference import reference_linear

pytestmark = pytest.mark.skipif(not HAVE_C, reason=f"cpu backend: {NO_C_REASON}")

WO_FORMATS = {
    "int8": QuantConfig(8),
    "int4-g32-asym": QuantConfig(4, 32, symmetric=False),
    "int4-g64-asym": QuantConfig(4, 64, symmetric=False),
    "int4-g128": QuantConfig(4, 128),
}


class kernel_at_every_m:
    """Routes every weight-only call to the compiled kernel (no torch-GEMM panels), for every tier."""

    def __enter__(self):
        self.saved = {k: dict(v) for k, v in cpu_backend.DENSE_FROM_ROWS.items()}
        for v in cpu_backend.DENSE_FROM_ROWS.values():
            v.update({8: None, 4: None})

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            cpu_backend.DENSE_FROM_ROWS[k].update(v)


def _check(fmt, m, n, k, dtype=torch.float32, bias=True, seed=0, x=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    qw = quantize(w, WO_FORMATS[fmt])
    if x is None:
        x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    ref = reference_linear(x, qw, b)
    tol = quant_tolerance(x, qw, ref, b)
    for isa in ISAS:
        with use_isa(isa):
            out = quantized_linear(x, qw, b, backend="cpu")
        assert_within(out, ref, tol, f"{fmt} cpu:{isa} {m}x{n}x{k} {dtype} bias={bias}")


@pytest.mark.parametrize("fmt", list(WO_FORMATS))
@pytest.mark.parametrize("m", [2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 16, 17, 19, 20, 21, 121, 241])
def test_row_tails_and_blocks(fmt, m):
    with kernel_at_every_m():
        _check(fmt, m, 40, 384, bias=m % 2 == 1)


@pytest.mark.parametrize("fmt", list(WO_FORMATS))
@pytest.mark.parametrize("n", [1, 15, 17, 33, 65, 130])
def test_n_not_multiple_of_16(fmt, n):
    with kernel_at_every_m():
        _check(fmt, 17, n, 256)


@pytest.mark.parametrize("k", [4, 5, 7, 66, 258, 261, 515])
def test_int8_odd_k(k):
    """K % 4 != 0 (zero-padded quads) and K just past a 64- or 256-k chunk."""
    with kernel_at_every_m():
        _check("int8", 9, 24, k)


@pytest.mark.parametrize("fmt", ["int4-g32-asym", "int4-g64-asym", "int8"])
def test_k4096(fmt):
    with kernel_at_every_m():
        _check(fmt, 19, 40, 4096)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4-g64-asym"])
def test_half_inputs_and_outputs(fmt, dtype):
    with kernel_at_every_m():
        _check(fmt, 11, 50, 320, dtype=dtype)
        _check(fmt, 16, 16, 128, dtype=dtype, bias=False)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32-asym"])
def test_strided_rows(fmt):
    """Rows with a stride larger than K (a column slice of a wider tensor)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 300, generator=g)[:, :256]
    with kernel_at_every_m():
        _check(fmt, 20, 24, 256, x=x)


@pytest.mark.parametrize("fmt", list(WO_FORMATS))
@pytest.mark.parametrize("m", [1, 2, 16, 40, 200])
def test_as_shipped(fmt, m):
    """The routing as shipped (kernel, engine or torch-GEMM panels by M) on a 4096-wide layer."""
    _check(fmt, m, 72, 4096)
