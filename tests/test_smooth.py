"""QuantConfig(smooth=...): SmoothQuant factors folded into the norms that feed the activation-quantized layers."""
import dataclasses

import pytest
import torch

import kernswap
from kernswap.calibration.smooth import smooth_model
from kernswap.config import QuantConfig
from kernswap.nn import QuantLinear
from kernswap.patching import load_quantized, patch_state, save_quantized
from kernswap.testing.tiny import tiny_model

W8A8 = dict(weight_bits=8, dynamic_activations=True)


def _outlier_model(family="llama"):
    """A tiny model whose norms give two input channels of every layer 30x the others (activation outliers)."""
    model = tiny_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 30
            layer.post_attention_layernorm.weight[7] *= 30
    return model


def _ids(seed, shape=(4, 32)):
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, ref):
    sd = model.state_dict()
    return sd.keys() == ref.keys() and all(torch.equal(sd[k], v) for k, v in ref.items())


def _patched_error(model, ev, **patch_kw):
    """(mean squared logit error of the patched model on ``ev``, the report); unpatched after, and checked to be
    the model it was bit for bit (the scales folded into the norms are undone too)."""
    before = _state(model)
    with torch.no_grad():
        ref = model(ev).logits
    report = kernswap.patch(model, progress=False, **patch_kw)
    with torch.no_grad():
        e = float((model(ev).logits - ref).pow(2).mean())
    kernswap.unpatch(model)
    assert _same_state(model, before)
    return e, report


def test_config_checks():
    assert QuantConfig(**W8A8, smooth=False).smooth is None
    assert QuantConfig(**W8A8, smooth=0.5).name == "w8a8-smooth0.5"
    assert QuantConfig(4, 64, dynamic_activations=True, smooth=True).name == "w4a8-g64-smooth"
    with pytest.raises(ValueError, match="QuantConfig.smooth must be None for weight-only"):
        QuantConfig(8, smooth=True)
    for bad in (1.0, 0.0, -0.2, 2, "yes"):
        with pytest.raises(ValueError, match=r"QuantConfig.smooth must be None, a bool, or a float alpha in \(0, 1\)"):
            QuantConfig(**W8A8, smooth=bad)


def test_smooth_needs_calibration():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="smooth=True needs calibration="):
        kernswap.patch(model, quant=QuantConfig(**W8A8, smooth=True), progress=False)
    assert patch_state(model) is None


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fold_is_exact_and_undone_bit_for_bit(family):
    model = _outlier_model(family)
    ids = _ids(1)
    before = _state(model)
    with torch.no_grad():
        ref = model(ids).logits
    runs = [lambda: model(input_ids=ids, use_cache=False)]
    rec, note = smooth_model(model, runs, 0.5, lambda name, lin: QuantConfig(**W8A8) if "proj" in name else None)
    assert rec is not None and len(rec.norms) == 2 * model.config.num_hidden_layers, note
    assert not _same_state(model, before)  # the norms and layers did change
    with torch.no_grad():
        out = model(ids).logits
    # exact up to fp32 rounding: a few ulps of the logits' scale
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    rec.undo()
    assert _same_state(model, before)


@pytest.mark.parametrize("cfg", [QuantConfig(**W8A8, smooth=0.5), QuantConfig(**W8A8, smooth=True)])
def test_lower_error_than_unsmoothed_on_outliers(cfg):
    model = _outlier_model()
    calib, ev = _ids(1), _ids(5, (2, 32))
    plain, _ = _patched_error(model, ev, quant=QuantConfig(**W8A8))
    smoothed, _ = _patched_error(model, ev, quant=cfg, calibration=calib)
    assert smoothed < 0.7 * plain, (smoothed, plain)


def test_report_and_searched_alpha():
    model = _outlier_model()
    report = kernswap.patch(model, quant=QuantConfig(**W8A8, smooth=True), calibration=[_ids(1), _ids(2)],
                            progress=False)
    note = next(n for n in report.notes if n.startswith("smoothing:"))
    assert "searched: calibration loss none" in note, note
    assert any("calibration: 2 batch(es), 256 tokens" in n for n in report.notes), report.notes
    assert patch_state(model).plan["smoothed"] or "nothing folded" in note


def test_saves_and_loads_without_recalibrating(tmp_path, monkeypatch):
    model = _outlier_model("qwen3")
    ids = _ids(2, (2, 40))
    kernswap.patch(model, quant=QuantConfig(**W8A8, smooth=0.5), calibration=ids, progress=False)
    assert len(patch_state(model).plan["smoothed"]) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path)
    monkeypatch.setattr(QuantLinear, "from_linear", lambda *a, **k: pytest.fail("load must not quantize"))
    monkeypatch.setattr("kernswap.calibration.smooth.smooth_model", lambda *a, **k: pytest.fail("no smoothing"))
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_failure_part_way_restores_the_smoothed_norms(monkeypatch):
    model = _outlier_model()
    before = _state(model)
    real = QuantLinear.from_linear
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure")
        return real(*a, **k)

    monkeypatch.setattr(QuantLinear, "from_linear", flaky)
    with pytest.raises(RuntimeError, match="planted failure"):
        kernswap.patch(model, quant=QuantConfig(**W8A8, smooth=0.5), calibration=_ids(1), progress=False)
    assert patch_state(model) is None
    assert _same_state(model, before)


def test_keep_originals_false_cannot_unpatch():
    model = _outlier_model()
    kernswap.patch(model, quant=QuantConfig(**W8A8, smooth=0.5), calibration=_ids(1), progress=False,
                   keep_originals=False)
    with pytest.raises(RuntimeError, match="not available"):
        kernswap.unpatch(model)


# ----------------------------------------------------------------------------------------- method="awq"
@pytest.mark.parametrize("cfg", [QuantConfig(4, 32, method="awq"), QuantConfig(8, method="awq"),
                                 QuantConfig(4, 32, symmetric=False, zero_point="float", method="awq")])
def test_awq_lower_error_than_rtn_and_undone(cfg):
    model = _outlier_model()
    calib, ev = _ids(1), _ids(5, (2, 32))
    plain, _ = _patched_error(model, ev, quant=dataclasses.replace(cfg, method="rtn"))
    scaled, report = _patched_error(model, ev, quant=cfg, calibration=calib)
    assert any(n.startswith("awq: scales folded into 4 normalization layers") for n in report.notes), report.notes
    assert scaled < plain, (scaled, plain)


def test_awq_needs_calibration_and_excludes_smooth(tmp_path):
    with pytest.raises(ValueError, match="method='awq' needs calibration="):
        kernswap.patch(tiny_model("llama"), quant=QuantConfig(4, 32, method="awq"), progress=False)
    with pytest.raises(ValueError, match="QuantConfig.smooth must be None with method='awq'"):
        QuantConfig(8, dynamic_activations=True, method="awq", smooth=True)
    model = _outlier_model("qwen3")
    ids = _ids(2, (2, 40))
    kernswap.patch(model, quant=QuantConfig(4, 32, method="awq"), calibration=ids, progress=False)
    assert patch_state(model).plan["smoothed"]
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path)(ids).logits, ref)
