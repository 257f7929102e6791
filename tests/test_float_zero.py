"""Asymmetric int4 with float zero-points (QuantConfig(zero_point="float"), GGUF Q4_1's min-offset grid): the
quantizers (exact on a Q4_1 grid, never worse than their round-to-nearest, constant groups exact), the format's
checks, the module's save / load and stacked experts (integer zero-points only). The kernels are tested on
this format with every other one (conftest.FORMATS, the Triton format list), GPTQ in test_gptq."""
import pytest
import torch

from conftest import FORMATS
from kernswap import QuantConfig
from kernswap.formats import QuantizedWeight, quantize
from kernswap.formats.experts import quantize_experts
from kernswap.formats.scale_search import rtn_float_zero, search_float_zero
from kernswap.nn import QuantLinear
from kernswap.nn.fused_moe import experts_quant_config

FZ = QuantConfig(4, 32, symmetric=False, zero_point="float")


def _q41_grid(n=48, k=256, seed=0):
    """Weights on a Q4_1 grid: per group of 32, w = q * d + m with codes 0..15, 0 and 15 present (as Q4_1's own
    quantizer maps min and max), d and m rounded to fp16 as the file stores them."""
    g = torch.Generator().manual_seed(seed)
    ng = k // 32
    d = (torch.rand(n, ng, 1, generator=g) * 0.05 + 1e-3).half().float()
    m = (-torch.rand(n, ng, 1, generator=g) * 0.4).half().float()
    q = torch.randint(0, 16, (n, ng, 32), generator=g).float()
    q[..., 3], q[..., 17] = 0, 15
    return (q * d + m).reshape(n, k)


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_recovers_a_q4_1_grid(method):
    w = _q41_grid()
    qw = quantize(w, QuantConfig(4, 32, symmetric=False, zero_point="float", method=method))
    assert qw.float_zero and qw.zero.dtype == torch.float32 and qw.format_name == "int4-g32-fzero"
    err = (qw.dequantize() - w).abs().max().item()
    assert err <= 4 * 2.0 ** -24 * w.abs().max().item(), err  # a few fp32 roundings: the grid itself
    # the integer zero-point form cannot hold it (its range is widened to include 0 and its zero is rounded)
    qi = quantize(w, QuantConfig(4, 32, symmetric=False, method=method))
    assert (qi.dequantize() - w).abs().max().item() > 100 * err + 1e-4


def test_mse_never_worse_than_rtn_per_group_and_better_than_integer_zeros():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(97, 256, generator=g) * 0.05
    w[:, ::37] *= 8  # planted outliers
    wg = w.reshape(-1, 32)

    def err(s, z, q):
        return ((wg - (q - z[:, None]) * s[:, None]) ** 2).sum(1)

    e_rtn, e_mse = err(*rtn_float_zero(wg)), err(*search_float_zero(wg))
    assert (e_mse <= e_rtn * (1 + 1e-5) + 1e-12).all() and e_mse.sum() < 0.9 * e_rtn.sum()
    mse_int = quantize(w, QuantConfig(4, 32, symmetric=False, method="mse"))
    assert e_mse.sum() < ((mse_int.dequantize() - w) ** 2).sum()


def test_constant_groups_are_exact():
    w = torch.randn(4, 64)
    w[0, :32] = 0.0
    w[1, 32:] = -0.3
    w[2, :32] = 7.0
    for method in ("rtn", "mse"):
        qw = quantize(w, QuantConfig(4, 32, symmetric=False, zero_point="float", method=method))
        dq = qw.dequantize()
        assert torch.equal(dq[0, :32], torch.zeros(32))
        torch.testing.assert_close(dq[1, 32:], torch.full((32,), -0.3), rtol=1e-6, atol=0)
        torch.testing.assert_close(dq[2, :32], torch.full((32,), 7.0), rtol=1e-6, atol=0)


def test_config_and_format_checks():
    assert FZ.name == "int4-g32-fzero" and FZ.float_zero
    assert QuantConfig(4, 64, symmetric=False).zero_point == "int"
    with pytest.raises(ValueError, match=r"QuantConfig.zero_point must be one of \['int', 'float'\] for asymmetric "
                                         r"int4, got 'fp16'"):
        QuantConfig(4, 32, symmetric=False, zero_point="fp16")
    with pytest.raises(ValueError, match="QuantConfig.zero_point must be None for symmetric formats"):
        QuantConfig(4, 32, zero_point="float")
    with pytest.raises(ValueError, match="QuantConfig.zero_point must be None"):
        QuantConfig(8, zero_point="int")
    qw = quantize(torch.randn(20, 64), FZ)
    with pytest.raises(ValueError, match=r"QuantizedWeight.zero must be torch.uint8 \(integer zero-points\) or "
                                         r"torch.float32 \(float ones\) of shape \[2, 32\], got torch.float16"):
        QuantizedWeight(qw.packed, qw.scale, qw.zero.half(), 4, 32, False, 64, 20)


def test_module_state_dict_round_trip_and_format_mismatch():
    lin = torch.nn.Linear(96, 40)
    q = QuantLinear.from_linear(lin, FZ)
    assert q.zero.dtype == torch.float32 and q.qformat[3].item() == 2
    x = torch.randn(3, 96)
    q2 = QuantLinear(96, 40, config=FZ)
    q2.load_state_dict(q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    ints = QuantLinear(96, 40, config=QuantConfig(4, 32, symmetric=False))
    with pytest.raises(ValueError, match="float zero-points=False, got .* float zero-points=True"):
        ints.load_quantized(q.qweight)


def test_stacked_experts_take_integer_zero_points():
    assert experts_quant_config(FZ, 64).zero_point == "int"
    with pytest.raises(ValueError, match="stacked experts store integer zero-points"):
        quantize_experts(torch.randn(2, 16, 64), FZ)
    assert "int4-g32-fzero" in FORMATS  # the kernels' tests cover the format
