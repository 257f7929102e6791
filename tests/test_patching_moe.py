"""MoERule: the experts of tiny Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE models swapped for FusedExperts.
Unquantized: equal to the unpatched model to fp32 rounding; quantized: the swapped module matches the
reference of the same format; unpatch restores the very same modules; state_dict round trip; skip reasons."""
import pytest
import torch

from conftest import assert_raises
from kernswap.config import MoEConfig
from kernswap.nn import FusedExperts
from kernswap.patching.api import apply_rules, unpatch
from kernswap.patching.families import get_family
from kernswap.patching.moe import MoERule
from kernswap.reference.moe import fused_experts_ref
from kernswap.testing.tiny import MOE_FAMILIES, tiny_model


def _patch(model, moe=MoEConfig(), quant=None):
    return apply_rules(model, [MoERule(moe, quant)], {"moe": moe, "quant": None},
                       get_family(model.config.model_type), progress=False)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_patched_float_equals_original(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        ref = model(ids).logits
    originals = {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}
    rep = _patch(model)
    swapped = {n for n, _, _ in rep.swapped}
    assert swapped == set(originals), (swapped, set(originals))
    assert all(isinstance(model.get_submodule(n), FusedExperts) for n in swapped)
    assert all(model.get_submodule(n).gate_up_proj is originals[n].gate_up_proj for n in swapped)  # no copy
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    out_grad_mode = model(ids).logits  # grad-recording mode goes through the torch op instead of the fast path
    torch.testing.assert_close(out_grad_mode.detach(), out, rtol=1e-6, atol=1e-6 * out.abs().max().item())
    unpatch(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family,quant", [("mixtral", "int8"), ("qwen2_moe", "int4"), ("qwen3_moe", "w8a8"),
                                          ("olmoe", "w4a8")])
def test_patched_quantized_matches_format_reference(family, quant):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref_logits = model(ids).logits
    block = model.model.layers[0].mlp
    _patch(model, quant=quant)
    fx = block.experts
    assert isinstance(fx, FusedExperts) and fx.quant.name.startswith(quant)
    x = torch.randn(9, model.config.hidden_size)
    with torch.no_grad():
        _, w, top = block.gate(x)
        out = fx(x, top, w)
        ref = fused_experts_ref(x, w, top, *fx.weights())
    tol = 1e-3 if quant.startswith("w") else 1e-5
    assert (out - ref).norm() <= tol * ref.norm()
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - ref_logits).norm() <= 0.2 * ref_logits.norm()  # quantized, still the same model


def test_moe_config_quant_overrides_patch_quant_and_state_dict_roundtrip():
    model = tiny_model("mixtral")
    rep = _patch(model, moe=MoEConfig(quant="int8"), quant="int4")
    assert all("int8" in kind for _, _, kind in rep.swapped)
    fx = model.model.layers[1].mlp.experts
    sd = fx.state_dict()
    assert {"gate_up_packed", "gate_up_scale", "down_packed", "down_scale", "qformat"} <= set(sd)
    fresh = FusedExperts(fx.num_experts, fx.hidden_dim, fx.intermediate_dim, quant="int8")
    fresh.load_state_dict(sd)
    x, top, w = torch.randn(3, fx.hidden_dim), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2)
    with torch.no_grad():
        assert torch.equal(fresh(x, top, w), fx(x, top, w))
    other = FusedExperts(fx.num_experts, fx.hidden_dim, fx.intermediate_dim, quant="int4")
    assert_raises(lambda: other.load_state_dict(sd), RuntimeError, "format mismatch")


def test_unsupported_experts_are_skipped_with_reason():
    model = tiny_model("olmoe")
    model.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()
    rep = _patch(model)
    assert [n for n, _, _ in rep.swapped] == ["model.layers.1.mlp.experts"]
    (name, reason), = rep.skipped
    assert name == "model.layers.0.mlp.experts" and "not SiLU" in reason


def test_qwen3_dense_layer_untouched_and_bad_moe_config():
    model = tiny_model("qwen3_moe")  # layer 1 is a dense MLP
    rep = _patch(model)
    assert [n for n, _, _ in rep.swapped] == ["model.layers.0.mlp.experts"]
    assert_raises(lambda: MoERule("sparse", None), ValueError, "moe must be a kernswap.MoEConfig or 'fused'")
    assert_raises(lambda: FusedExperts(0, 8, 8), ValueError, "num_experts must be an int > 0, got 0")


def test_fused_experts_data_assignment_is_never_stale():
    """Float FusedExperts: replacing gate_up_proj's `.data` after a cached eager call is seen by the next call."""
    torch.manual_seed(0)
    e, h, i, t, k = 4, 32, 48, 5, 2
    fx = FusedExperts(e, h, i)
    with torch.no_grad():
        fx.gate_up_proj.normal_(0, 0.1)
        fx.down_proj.normal_(0, 0.1)
        x = torch.randn(t, h)
        ids = torch.randint(0, e, (t, k))
        w = torch.rand(t, k)
        y = fx(x, ids, w)
        fx.gate_up_proj.data = fx.gate_up_proj.data * 2
        y2 = fx(x, ids, w)
        ref = FusedExperts(e, h, i, backend="reference")
        ref.gate_up_proj.copy_(fx.gate_up_proj)
        ref.down_proj.copy_(fx.down_proj)
        torch.testing.assert_close(y2, ref(x, ids, w), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y2, y)
