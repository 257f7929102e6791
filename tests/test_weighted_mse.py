"""method="mse" with calibration: each group's squared error weighted by its input channels' mean squares
(scale_search weights, formats.quantize with a Hessian, patch(calibration=...)). The weighted searches never do
worse than RTN or the unweighted search on the weighted error, uniform weights give the unweighted result, a layer
with loud input channels gets a lower output error on held-out inputs, and patch collects the Hessians, reports the
calibration, and saves / loads / unpatches as before."""
import pytest
import torch

import kernswap
from kernswap.config import QuantConfig
from kernswap.formats import quantize, quantize_int4, quantize_int8
from kernswap.formats.scale_search import (group_weights, importance_of, rtn_float_zero, search_asymmetric,
                                           search_float_zero, search_symmetric)
from kernswap.patching import load_quantized, save_quantized
from kernswap.testing.tiny import tiny_model

from conftest import assert_raises
from test_gptq import _layer


def _groups(g=57, length=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, length, generator=gen) * 0.05
    w[:, ::13] *= 6
    c = torch.rand(g, length, generator=gen) ** 4 * 50 + 1e-3  # heavy-tailed importance
    return w, c


def _werr(w, wq, c):
    return ((w - wq) ** 2 * c).sum().item()


def test_symmetric_weighted_error_below_unweighted_and_rtn():
    w, c = _groups()
    s, q = search_symmetric(w, -8, 7, weights=c)
    s0, q0 = search_symmetric(w, -8, 7)
    rtn_s = w.abs().amax(1) / 7
    rtn = torch.clamp(torch.round(w / rtn_s[:, None]), -8, 7) * rtn_s[:, None]
    e, e0, er = _werr(w, q * s[:, None], c), _werr(w, q0 * s0[:, None], c), _werr(w, rtn, c)
    assert e < e0 and e < er, (e, e0, er)
    assert q.min() >= -8 and q.max() <= 7


def test_asymmetric_and_float_zero_weighted_error_below_unweighted():
    w, c = _groups(seed=1)
    s, z, q = search_asymmetric(w, weights=c)
    s0, z0, q0 = search_asymmetric(w)
    assert _werr(w, (q - z[:, None]) * s[:, None], c) <= _werr(w, (q0 - z0[:, None]) * s0[:, None], c)
    s, z, q = search_float_zero(w, weights=c)
    s0, z0, q0 = search_float_zero(w)
    sr, zr, qr = rtn_float_zero(w)
    e = _werr(w, (q - z[:, None]) * s[:, None], c)
    assert e < _werr(w, (q0 - z0[:, None]) * s0[:, None], c) and e <= _werr(w, (qr - zr[:, None]) * sr[:, None], c)


def test_uniform_weights_give_the_unweighted_search():
    w, _ = _groups(seed=2)
    ones = torch.ones_like(w)
    for search in (lambda **k: search_symmetric(w, -8, 7, **k), lambda **k: search_asymmetric(w, **k),
                   lambda **k: search_float_zero(w, **k)):
        a, b = search(weights=ones), search()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_importance_of_and_group_weights():
    h = torch.diag(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    imp = importance_of(h)
    torch.testing.assert_close(imp, torch.tensor([2.0, 1e-6, 1.0, 1.0]))
    assert torch.equal(importance_of(torch.zeros(3, 3)), torch.ones(3))
    gw = group_weights(torch.arange(4.0), 3, 4, 2)
    assert gw.shape == (6, 2) and torch.equal(gw[5], torch.tensor([2.0, 3.0]))
    assert group_weights(None, 3, 4, 2) is None
    assert_raises(lambda: group_weights(torch.ones(5), 3, 4, 2), ValueError, "importance must be [in_features=4]")


@pytest.mark.parametrize("cfg", [QuantConfig(4, 128), QuantConfig(4, 32, symmetric=False),
                                 QuantConfig(4, 64, symmetric=False, zero_point="float"), QuantConfig(8, method="mse")],
                         ids=lambda c: c.name)
def test_output_error_below_unweighted_mse(cfg):
    """A layer with loud input channels: the activation-weighted scales give a lower output error on held-out
    inputs than the weight-error ones."""
    w, x = _layer()
    xt, xe = x[:1536], x[1536:]
    ref = xe @ w.t()
    err = {}
    for name, h in (("mse", None), ("weighted", xt.t() @ xt)):
        qw = quantize(w, cfg, h)
        err[name] = ((xe @ qw.dequantize().t() - ref).norm() / ref.norm()).item()
    assert err["weighted"] < err["mse"], err


def test_importance_argument_checks():
    w = torch.randn(8, 64)
    assert_raises(lambda: quantize_int4(w, 32, method="rtn", importance=torch.ones(64)), ValueError,
                  "importance weights the error of method='mse', got method='rtn'")
    assert_raises(lambda: quantize_int8(w, method="mse", importance=torch.ones(64, 1)), TypeError,
                  "importance must be a 1-D float tensor")
    assert_raises(lambda: quantize_int8(w, method="mse", importance=torch.ones(63)), ValueError,
                  "importance must be [in_features=64]")


def _loud_model():
    """A tiny Llama whose norms make a few input channels of q/k/v and gate/up 12x louder."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] *= 12
    return model


def test_patch_with_calibration_lowers_the_output_error(tmp_path, monkeypatch):
    """Against the weight-error search (the data-free importance off): calibration text lowers the output error."""
    from kernswap.calibration import importance

    monkeypatch.setattr(importance, "data_free_importance", lambda *a: ({}, None))
    ids = torch.randint(3, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    calib = torch.randint(3, 256, (8, 48), generator=torch.Generator().manual_seed(6))
    ref_model = _loud_model()
    with torch.no_grad():
        ref = ref_model(ids).logits
    errs = {}
    for name, cal in (("mse", None), ("weighted", calib)):
        m = _loud_model()
        report = kernswap.patch(m, quant="int4", progress=False, calibration=cal)
        with torch.no_grad():
            out = m(ids).logits
        errs[name] = ((out - ref).norm() / ref.norm()).item()
        if cal is not None:
            assert any("calibration: 1 batch(es), 384 tokens" in n for n in report.notes), report.notes
            save_quantized(m, tmp_path)
            with torch.no_grad():
                assert torch.equal(load_quantized(tmp_path)(ids).logits, out)
            kernswap.unpatch(m)
            with torch.no_grad():
                assert torch.equal(m(ids).logits, ref)
    assert errs["weighted"] < errs["mse"], errs


def test_data_free_importance_without_calibration(monkeypatch):
    """No calibration: patch weights the int4 search by the inputs' mean squares over random token ids, the same
    every time, with a lower output error than the weight-error search on a model with loud input channels; a
    model that takes no token ids keeps the weight error and says so."""
    from kernswap.calibration import importance

    ids = torch.randint(3, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _loud_model()(ids).logits

    def patched():
        m = _loud_model()
        rep = kernswap.patch(m, quant="int4", progress=False)
        with torch.no_grad():
            return m, rep, m(ids).logits

    m1, rep, out = patched()
    assert any("activation-weighted error" in n and "random token ids" in n for n in rep.notes), rep.notes
    _, _, again = patched()
    assert torch.equal(out, again)
    real = importance.data_free_importance
    monkeypatch.setattr(importance, "data_free_importance", lambda *a: ({}, None))
    _, rep_w, plain = patched()
    assert not any("random token ids" in n for n in rep_w.notes)
    e_free, e_plain = ((out - ref).norm() / ref.norm()).item(), ((plain - ref).norm() / ref.norm()).item()
    assert e_free < e_plain, (e_free, e_plain)
    monkeypatch.setattr(importance, "data_free_importance", real)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 64))
    notes = kernswap.patch(seq, quant="int4", progress=False).notes
    assert any("weight error (no data-free importance: the model has no config.vocab_size" in n for n in notes)
