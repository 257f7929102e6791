"""The amx tier of the quantized-linear op (csrc/cpu/qlinear_amx.cpp): the dynamic-activation formats on AMX tiles
from 32 rows, everything else handed to avx512_vnni. Checked against the same-format reference at the edges of
its blocking (the 32-row threshold, 32-row blocks with padding rows, odd weight tiles, k steps of 64 and 32,
several segments, K that no step divides) and against the avx512_vnni tier on the same inputs. Skipped where the
CPU (or the OS) does not offer AMX; tests/test_quantized_linear.py runs every tier, this one included, on its own
shapes."""
import math

import pytest
import torch

from conftest import FORMATS, ISAS, assert_within, quant_tolerance, use_isa
from kernswap.formats import quantize
from kernswap.ops import quantized_linear
from kernswap.reference import reference_linear

pytestmark = pytest.mark.skipif("amx" not in ISAS, reason="the CPU or OS offers no AMX tier here")

# w4a8-g32-asym: handed to avx512_vnni (groups under 64). (M, N, K): the row threshold (31 stays on vpdpbusd,
# 32 takes tiles), a partial 32-row block, one weight tile (N <= 16) and an odd count of them, k steps of 32
# (K = 96 for int8), K = 100 (no step divides it: the fallback), and K = 2304 (int8: three 1024-segments, the last
# one short)
SHAPES = [(31, 40, 256), (32, 40, 256), (33, 8, 256), (47, 72, 384), (64, 1000, 128), (39, 24, 96), (40, 8, 100),
          (40, 56, 2304)]
AMX_FORMATS = ["w8a8", "w4a8-g128", "w4a8-g32-asym", "w4a8-g64-fzero"]


def _case(fmt, m, n, k, dtype):
    torch.manual_seed(m * 1000 + n + k)
    cfg = FORMATS[fmt]
    if cfg.weight_bits == 4 and k % cfg.group_size:
        pytest.skip(f"{fmt}: K={k} is not a multiple of the group")
    w = torch.randn(n, k) / math.sqrt(k)
    w[:, 3] *= 20  # a loud input channel and output rows of very different sizes
    w[1::7] *= 0.01
    x = torch.randn(m, k)
    x[:, 5] *= 30
    b = torch.randn(n) * 0.1 if (m + n) % 2 else None
    return x.to(dtype), quantize(w, cfg), None if b is None else b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fmt", AMX_FORMATS)
def test_amx_matches_reference_and_vnni(fmt, m, n, k, dtype):
    x, qw, b = _case(fmt, m, n, k, dtype)
    ref = reference_linear(x, qw, b)
    tol = quant_tolerance(x, qw, ref, b)
    with use_isa("amx"):
        out = quantized_linear(x, qw, b, backend="cpu")
    assert_within(out, ref, tol, f"{fmt} amx {m}x{n}x{k} {dtype}")
    with use_isa("avx512_vnni"):
        vnni = quantized_linear(x, qw, b, backend="cpu")
    assert_within(out, vnni, 2 * tol, f"{fmt} amx vs avx512_vnni {m}x{n}x{k} {dtype}")


def test_amx_strided_input_and_3d():
    """Rows read through the caller's row stride (a column slice) and a 3-D batch, as a patched model passes them."""
    qw = quantize(torch.randn(72, 256) / 16, FORMATS["w8a8"])
    big = torch.randn(2, 24, 300)
    x = big[..., 10:266]  # rows 300 apart
    ref = reference_linear(x.reshape(-1, 256).contiguous(), qw, None).view(2, 24, 72)
    with use_isa("amx"):
        out = quantized_linear(x, qw, None, backend="cpu")
    assert_within(out, ref, quant_tolerance(x.reshape(-1, 256), qw, ref.view(-1, 72)).view(2, 24, 72), "strided")


def test_amx_threads_agree():
    """One thread and two give the same result (tasks split over whole weight tiles and row blocks)."""
    x, qw, b = _case("w4a8-g128", 96, 200, 512, torch.float32)
    n = torch.get_num_threads()
    try:
        with use_isa("amx"):
            torch.set_num_threads(1)
            one = quantized_linear(x, qw, b, backend="cpu")
            torch.set_num_threads(2)
            two = quantized_linear(x, qw, b, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
