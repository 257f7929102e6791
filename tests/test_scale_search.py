"""QuantConfig(method="mse"): error-minimising scales, never worse than round-to-nearest per group, read by every
backend (negative scales included)."""
import pytest
import torch

import kernswap
from conftest import ISAS, assert_within, quant_tolerance, use_isa
from kernswap.config import QuantConfig
from kernswap.formats import quantize
from kernswap.formats.scale_search import search_asymmetric, search_symmetric
from kernswap.ops import quantized_linear
from kernswap.reference import reference_linear


def _weights(n=97, k=256, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outliers:  # planted outliers: a few large values per row, where max|w| scaling wastes most codes
        w[:, ::37] *= 8
    w[5] = 0.0  # an all-zero row
    return w


def _group_err(qw, w, group):
    d = (qw.dequantize() - w).pow(2)
    return d.reshape(w.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_mse_never_worse_than_rtn_per_group(group, sym):
    w = _weights()
    rtn = quantize(w, QuantConfig(4, group, sym, method="rtn"))
    mse = quantize(w, QuantConfig(4, group, sym, method="mse"))
    e_rtn, e_mse = _group_err(rtn, w, group), _group_err(mse, w, group)
    assert (e_mse <= e_rtn * (1 + 1e-5) + 1e-12).all()
    assert e_mse.sum() < 0.9 * e_rtn.sum() if sym else e_mse.sum() < e_rtn.sum()  # strictly lower with outliers
    q, scale, zero = mse.unpack()
    assert q.min() >= 0 and q.max() <= 15 and (scale[5] == 0).all()
    assert torch.equal(mse.dequantize()[5], torch.zeros(w.shape[1]))


def test_int8_mse_never_worse_than_rtn():
    w = _weights(outliers=True)
    rtn, mse = quantize(w, QuantConfig(8, method="rtn")), quantize(w, QuantConfig(8, method="mse"))
    e_rtn, e_mse = _group_err(rtn, w, w.shape[1]), _group_err(mse, w, w.shape[1])
    assert (e_mse <= e_rtn * (1 + 1e-5) + 1e-12).all() and e_mse.sum() < e_rtn.sum()


def test_search_returns_consistent_codes():
    wg = _weights(n=40, k=64).reshape(-1, 32)
    s, q = search_symmetric(wg, -8, 7)
    assert q.min() >= -8 and q.max() <= 7 and (q == torch.round(q)).all()
    assert (s < 0).any() and (s > 0).any()  # both signs are used: the extreme value may take the -8 side
    s2, z, q2 = search_asymmetric(wg)
    assert (s2 >= 0).all() and z.min() >= 0 and z.max() <= 15 and q2.min() >= 0 and q2.max() <= 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [QuantConfig(4, 32), QuantConfig(4, 64, dynamic_activations=True),
                                 QuantConfig(4, 128, symmetric=False), QuantConfig(8, method="mse")],
                         ids=lambda c: f"{c.name}-{c.method}")
def test_kernels_read_mse_weights(cfg, dtype):
    """Negative scales and searched codes through every CPU tier, against the same-format reference."""
    if not ISAS:
        pytest.skip("kernswap._C not built")
    w = _weights(n=75, k=256)
    qw = quantize(w, cfg)
    x = torch.randn(9, 256).to(dtype)
    ref = reference_linear(x, qw)
    tol = quant_tolerance(x, qw, ref)
    for isa in ISAS:
        with use_isa(isa):
            assert_within(quantized_linear(x, qw, backend="cpu"), ref, tol, f"{cfg.name} cpu:{isa}")


def test_config_method():
    assert QuantConfig(4, 128).method == "mse" and QuantConfig(8).method == "rtn"
    assert kernswap.QuantConfig.from_any("int4").method == "mse"
    assert QuantConfig(4, 128, method="awq").method == "awq"
    with pytest.raises(ValueError, match=r"QuantConfig.method must be one of \['rtn', 'mse', 'gptq', 'awq'\], got 'hqq'"):
        QuantConfig(4, 128, method="hqq")
