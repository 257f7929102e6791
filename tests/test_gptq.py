"""QuantConfig(method="gptq") with patch(calibration=...): layers quantized against their own inputs."""
import pytest
import torch

import kernswap
from kernswap.calibration import gptq_quantize, normalize_calibration
from kernswap.config import QuantConfig
from kernswap.formats import quantize
from kernswap.nn import QuantLinear
from kernswap.patching import load_quantized, patch_state, save_quantized
from kernswap.testing.tiny import tiny_model


def _layer(n=96, k=256, rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::29] *= 8  # planted outliers
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)  # correlated input features
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :8] *= 10  # a few loud input channels, as in real activations
    return w, x


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32, method="gptq"), QuantConfig(4, 128, method="gptq"),
                                 QuantConfig(4, 64, symmetric=False, method="gptq"), QuantConfig(8, method="gptq"),
                                 QuantConfig(4, 32, symmetric=False, zero_point="float", method="gptq")],
                         ids=lambda c: c.name)
def test_output_error_below_rtn_and_mse(cfg):
    w, x = _layer()
    xt, xe = x[:1536], x[1536:]  # calibrate on one half, measure on the other
    h = xt.t() @ xt
    errs = {}
    for method in ("rtn", "mse", "gptq"):
        c = QuantConfig(cfg.weight_bits, cfg.group_size, cfg.symmetric, method=method, zero_point=cfg.zero_point)
        qw = quantize(w, c, h if method == "gptq" else None)
        errs[method] = ((xe @ qw.dequantize().t() - xe @ w.t()).norm() / (xe @ w.t()).norm()).item()
    assert errs["gptq"] < errs["rtn"] and errs["gptq"] < errs["mse"], errs


def test_gptq_codes_in_range_and_dead_inputs():
    w, x = _layer(n=40, k=128)
    x[:, 5] = 0.0  # an input channel that never fires: its weights are dropped, not divided by zero
    q, s, z = gptq_quantize(w, x.t() @ x, 4, 32, True)
    assert q.min() >= -8 and q.max() <= 7 and z is None and torch.isfinite(s).all()
    assert (q[:, 5] == 0).all()


def test_patch_needs_calibration_and_reports():
    model = tiny_model("llama")
    cfg = QuantConfig(4, 32, method="gptq")
    with pytest.raises(ValueError, match="needs calibration="):
        kernswap.patch(model, quant=cfg, progress=False)
    assert patch_state(model) is None
    with pytest.raises(TypeError, match="calibration token ids"):
        kernswap.patch(model, quant=cfg, calibration=[torch.randn(3, 4)], progress=False)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    report = kernswap.patch(model, quant=cfg, calibration=ids, progress=False)
    assert any("gptq" in n and "128 tokens" in n for n in report.notes), report.notes
    assert report.weight_errors and all(0 < e < 1 for e in report.weight_errors.values())
    assert "model.layers.0.self_attn.qkv_proj" in report.weight_errors
    assert "weight error" in str(report)
    kernswap.unpatch(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_calibrated_model_saves_and_loads(tmp_path, monkeypatch):
    model = tiny_model("qwen3")
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    kernswap.patch(model, quant=QuantConfig(4, 32, method="gptq"), calibration=[ids[0], ids[1]], progress=False)
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path)
    monkeypatch.setattr(QuantLinear, "from_linear", lambda *a, **k: pytest.fail("load must not quantize"))
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_calibration_forms():
    ids = torch.randint(0, 9, (2, 5))
    assert [b["input_ids"].shape for b in normalize_calibration(ids)] == [(2, 5)]
    assert [b["input_ids"].shape for b in normalize_calibration([ids[0], ids])] == [(1, 5), (2, 5)]
    assert normalize_calibration([{"input_ids": ids, "attention_mask": torch.ones(2, 5)}])[0]["attention_mask"].shape == (2, 5)
    with pytest.raises(ValueError, match="empty"):
        normalize_calibration([])


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32, method="gptq", act_order=True),
                                 QuantConfig(4, 64, symmetric=False, method="gptq", act_order=True),
                                 QuantConfig(8, method="gptq", act_order=True)], ids=lambda c: c.name)
def test_act_order_output_error_below_rtn_and_mse(cfg):
    """act_order (loudest input columns first, static group scales): codes in range, the held-out output error
    below RTN's and mse's on the planted layer, and the packed layout the kernels read unchanged."""
    w, x = _layer()
    xt, xe = x[:1536], x[1536:]
    h = xt.t() @ xt
    ref = xe @ w.t()
    errs = {}
    for method in ("rtn", "mse", "gptq"):
        c = QuantConfig(cfg.weight_bits, cfg.group_size, cfg.symmetric, method=method,
                        act_order=method == "gptq")
        qw = quantize(w, c, h if method == "gptq" else None)
        errs[method] = ((xe @ qw.dequantize().t() - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < errs["rtn"] and errs["gptq"] < errs["mse"], errs
    q, s, z = gptq_quantize(w, h, cfg.weight_bits, cfg.group_size or w.shape[1], cfg.symmetric, act_order=True)
    lo, hi = (-127, 127) if cfg.weight_bits == 8 else ((-8, 7) if cfg.symmetric else (0, 15))
    assert q.min() >= lo and q.max() <= hi and torch.equal(q, q.round())
    lin = torch.nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = QuantLinear.from_linear(lin, cfg, hessian=h)
    with torch.no_grad():
        torch.testing.assert_close(mod(xe), xe @ quantize(w, cfg, h).dequantize().t(), rtol=1e-4, atol=1e-4)


def test_act_order_needs_gptq():
    with pytest.raises(ValueError, match="QuantConfig.act_order must be False unless method='gptq'"):
        QuantConfig(4, 128, act_order=True)
    with pytest.raises(ValueError, match="QuantConfig.act_order must be a bool"):
        QuantConfig(4, 128, method="gptq", act_order=1)
