"""unpatch is exact, patches stay on their instance, failures roll back, a second patch never re-quantizes."""
import pytest
import torch

import kernswap
from kernswap.nn import QuantLinear
from kernswap.testing.tiny import tiny_model


def _snapshot(model):
    return {n: m for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap):
    mods, sd = snap
    now = dict(model.named_modules())
    assert now.keys() == mods.keys()
    assert all(now[n] is mods[n] for n in mods)  # the same objects
    now_sd = model.state_dict()
    assert now_sd.keys() == sd.keys()
    assert all(torch.equal(now_sd[k], sd[k]) for k in sd)  # bit for bit


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_unpatch_restores_same_objects(family):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 11))
    with torch.no_grad():
        ref = model(ids).logits
    snap = _snapshot(model)
    quant = kernswap.QuantConfig(weight_bits=4, group_size=32) if family == "llama" else "w8a8"
    kernswap.patch(model, quant=quant, skip=["lm_head", "*down_proj", "*gate"],
                   progress=False)
    assert kernswap.patching.is_patched(model)
    assert "kernswap_plan" in model.state_dict()
    assert kernswap.unpatch(model) is model
    _assert_same(model, snap)
    assert not kernswap.patching.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(ValueError, match="not patched"):
        kernswap.unpatch(model)


def test_patch_again_after_unpatch():
    model = tiny_model("mistral")
    kernswap.patch(model, quant="int8", progress=False)
    kernswap.unpatch(model)
    report = kernswap.patch(model, quant="int4", skip=["lm_head", "*.o_proj"], progress=False, fuse=False)
    # int4 g128: down_proj (K=128) takes group 128, the K=64 layers the finer group 64 (said in the notes)
    assert report.num_swapped == 12
    assert any("in_features=64" in n and "group_size=64" in n for n in report.notes), report.notes


def test_other_model_untouched():
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    b.config = a.config  # even a shared config object must not carry the patch over
    snap_b = _snapshot(b)
    cls_forward = torch.nn.Linear.forward
    kernswap.patch(a, quant="int8", progress=False)
    _assert_same(b, snap_b)
    assert not kernswap.patching.is_patched(b)
    assert torch.nn.Linear.forward is cls_forward
    assert type(a.model.layers[0].self_attn) is type(b.model.layers[0].self_attn)
    assert not any(isinstance(m, QuantLinear) for m in b.modules())
    assert not hasattr(a.config, "kernswap_plan")


@pytest.mark.parametrize("fail_at", [1, 5, 8])  # 8 quantizations: per layer q/k/v fused, o_proj, gate/up fused, down
def test_rollback_on_failure(monkeypatch, fail_at):
    model = tiny_model("qwen2")
    snap = _snapshot(model)
    real = QuantLinear.from_linear.__func__
    calls = {"n": 0}

    def flaky(cls, linear, config, **kw):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError(f"injected failure at call {fail_at}")
        return real(cls, linear, config, **kw)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(flaky))
    with pytest.raises(RuntimeError, match="injected failure"):
        kernswap.patch(model, quant="int8", progress=False)
    assert calls["n"] == fail_at
    _assert_same(model, snap)
    assert not kernswap.patching.is_patched(model)
    monkeypatch.undo()
    assert kernswap.patch(model, quant="int8", progress=False).num_swapped == 8


def test_second_patch_call(monkeypatch):
    model = tiny_model("llama")
    first = kernswap.patch(model, quant="int8", progress=False)
    packed = model.model.layers[0].mlp.gate_up_proj.packed.clone()

    def boom(*a, **k):
        raise AssertionError("quantized twice")

    monkeypatch.setattr(QuantLinear, "from_linear", boom)
    again = kernswap.patch(model, quant="int8", progress=False)  # identical request: a no-op
    assert again is first
    with pytest.raises(RuntimeError, match="already patched.*unpatch"):
        kernswap.patch(model, quant="int4", progress=False)
    with pytest.raises(RuntimeError, match="already patched"):
        kernswap.patch(model, quant="int8", skip=(), progress=False)
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.packed, packed)


def test_keep_originals_false():
    model = tiny_model("llama")
    kernswap.patch(model, quant="int8", progress=False, keep_originals=False)
    state = kernswap.patching.patch_state(model)
    assert all(getattr(r, "original", None) is None for r in state.records)
    with pytest.raises(RuntimeError, match="not available"):
        kernswap.unpatch(model)


def test_shared_module_swapped_everywhere():
    model = tiny_model("llama")
    shared = model.model.layers[0].mlp.up_proj
    model.model.layers[1].mlp.up_proj = shared
    report = kernswap.patch(model, quant="int8", progress=False)
    assert model.model.layers[0].mlp.up_proj is model.model.layers[1].mlp.up_proj
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    # a layer shared by two blocks is never fused (its gate/up pairs run one by one): 2 x (qkv, o, gate, down) + up
    assert report.num_swapped == 9 and not hasattr(model.model.layers[0].mlp, "gate_up_proj")
    kernswap.unpatch(model)
    assert model.model.layers[0].mlp.up_proj is shared and model.model.layers[1].mlp.up_proj is shared
