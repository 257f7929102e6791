"""kernswap._C.qdequant (weight rows dequantized to fp32, used by the weight-only runner at larger M) against the
format's own dequantize(), every ISA, every format, partial row ranges and odd sizes; and the runner's choice
between the integer engine and the dequantized-panel GEMM on each side of the row threshold."""
import math

import pytest
import torch

from conftest import FORMATS, HAVE_C, ISAS, NO_C_REASON, assert_within, quant_tolerance, use_isa
from kernswap import _ext
from kernswap.backends import cpu as cpu_backend
from kernswap.formats import quantize
from kernswap.reference import reference_linear

pytestmark = pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [f for f in FORMATS if not FORMATS[f].dynamic_activations])
@pytest.mark.parametrize("n,k,rows", [(37, 384, (0, 37)), (37, 384, (5, 30)), (64, 256, (16, 48)),
                                      (1000, 128, (999, 1000)), (20, 4096, (3, 20)), (33, 260, (0, 33))])
def test_qdequant_matches_format(isa, fmt, n, k, rows):
    cfg = FORMATS[fmt]
    if cfg.weight_bits == 4 and k % cfg.group_size:
        pytest.skip("int4 needs K % group_size == 0")
    qw = quantize(torch.randn(n, k), cfg)
    want = qw.dequantize()[rows[0]:rows[1]]
    ld = k + 3  # a padded leading dimension: the kernel must honour it
    out = torch.full((rows[1] - rows[0], ld), float("nan"))
    scale = qw.scale.contiguous()
    zero = None if qw.zero is None else qw.zero.contiguous()
    with use_isa(isa):
        _ext.get_C().qdequant(qw.packed.data_ptr(), qw.packed.numel(), qw.bits, qw.group_size, n, k,
                              scale.data_ptr(), scale.numel(), 0 if zero is None else zero.data_ptr(),
                              0 if zero is None else zero.numel(), zero is not None and zero.is_floating_point(),
                              rows[0], rows[1], out.data_ptr(), out.numel(), ld,
                              2)
    torch.testing.assert_close(out[:, :k], want, rtol=0, atol=0)
    assert torch.isnan(out[:, k:]).all(), "wrote past K in the padded leading dimension"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4-g64-asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_both_sides_of_threshold(isa, fmt, dtype):
    """The runner gives the reference's result with the integer engine (below the tier's threshold) and with the
    dequantized panels (at and above it, several panels when the weight is larger than one panel)."""
    n, k = 300, 4096  # 300 rows x 4096 x 4 B > one 4 MiB panel: the panel loop runs more than once
    qw = quantize(torch.randn(n, k) / math.sqrt(k), FORMATS[fmt])
    bias = torch.randn(n) * 0.1
    with use_isa(isa):
        rows = cpu_backend.dense_from_rows(qw.bits)
        run = cpu_backend.prepare(qw.packed, qw.scale, qw.zero, bias, qw.bits, qw.group_size, k, n, False)
        ms = [1, 3] if rows is None else sorted({1, max(1, rows - 1), rows, rows + 5})
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            ref = reference_linear(x, qw, bias)
            assert_within(run(x), ref, quant_tolerance(x, qw, ref, bias), f"{fmt} {isa} m={m} (dense from {rows})")
