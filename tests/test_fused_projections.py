"""Fused projections (patch(fuse=True), the default): q/k/v and gate/up as one quantized call, the same results bit
for bit as one call per layer, reversible, and never a stale shared output."""
import pytest
import torch

import kernswap
from kernswap.nn import QuantLinear
from kernswap.nn.fused_linear import QuantLinearSlice
from kernswap.testing.tiny import TINY_FAMILIES, tiny_model

G = torch.Generator().manual_seed(0)
IDS = torch.randint(3, 256, (2, 13), generator=G)
FORMATS = {"int8": "int8", "w8a8": "w8a8",
           "int4-g32-asym": kernswap.QuantConfig(weight_bits=4, group_size=32, symmetric=False),
           "w4a8-g32": kernswap.QuantConfig(weight_bits=4, group_size=32, dynamic_activations=True)}


def _patched(family, quant, fuse, **kw):
    model = tiny_model(family, **kw)
    kernswap.patch(model, quant=quant, progress=False, fuse=fuse)
    # the fused layers' own calls only: the compiled SwiGLU and decode kernels (tests/test_mlp_forward.py,
    # test_decode_layer.py) round differently from torch's ops
    kernswap.set_decode_path(model, False)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_logits_as_one_call_per_layer(family, fmt):
    fused, single = _patched(family, FORMATS[fmt], True), _patched(family, FORMATS[fmt], False)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, QuantLinear) and isinstance(attn.q_proj, QuantLinearSlice)
    assert attn.qkv_proj.out_features == sum(getattr(attn, p).out_features for p in ("q_proj", "k_proj", "v_proj"))
    # each output row is computed exactly as its own layer computed it (rows of the weight, activations per row)
    assert torch.equal(_logits(fused), _logits(single))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_moe"])
def test_greedy_tokens_match(family):
    ids = IDS[:1, :7]
    outs = []
    for fuse in (True, False):
        model = _patched(family, "int8", fuse)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_qwen2_biases_fused():
    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None
    ref = _logits(_patched("qwen2", "int8", False))
    kernswap.patch(model, quant="int8", progress=False)
    kernswap.set_decode_path(model, False)
    assert attn.qkv_proj.bias is not None and attn.qkv_proj.bias.shape[0] == attn.qkv_proj.out_features
    assert torch.equal(_logits(model), ref)


def test_unpatch_leaves_nothing():
    model = tiny_model("llama")
    before = {n: p for n, p in model.named_parameters()}
    names = {n for n, _ in model.named_modules()}
    ref = _logits(model)
    kernswap.patch(model, quant=FORMATS["int4-g32-asym"], progress=False)
    kernswap.unpatch(model)
    assert {n for n, _ in model.named_modules()} == names  # no qkv_proj / gate_up_proj left behind
    assert all(p is before[n] for n, p in model.named_parameters())
    assert torch.equal(_logits(model), ref)


def test_shared_output_never_stale(monkeypatch):
    model = _patched("llama", "int8", True)
    attn = model.model.layers[0].self_attn
    calls = {"n": 0}
    real = QuantLinear.forward

    def counting(self, x):
        calls["n"] += 1
        return real(self, x)

    monkeypatch.setattr(QuantLinear, "forward", counting)
    x = torch.randn(3, 64)
    with torch.no_grad():
        q = attn.q_proj(x)
        k, v = attn.k_proj(x), attn.v_proj(x)
        assert calls["n"] == 1  # one fused call for the three
        full = real(attn.qkv_proj, x)
        assert torch.equal(torch.cat([q, k, v], -1), full)
        attn.q_proj(x)  # the same slice again on the same input: a fresh call, not the shared output
        assert calls["n"] == 2
        x.mul_(2)  # the input changed in place: the next slice recomputes
        k2 = attn.k_proj(x)
        assert calls["n"] == 3 and torch.equal(k2, real(attn.qkv_proj, x)[..., attn.k_proj.start:attn.k_proj.stop])
        y = x.clone()  # another tensor with the same values: recomputed (identity, not equality, is the key)
        attn.v_proj(y)
        assert calls["n"] == 4


def test_autograd_through_slices():
    model = _patched("llama", "int8", True)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 64, requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_not_fused_when_a_sibling_is_skipped():
    model = tiny_model("llama")
    report = kernswap.patch(model, quant="int8", skip=["lm_head", "*.k_proj"], progress=False)
    attn = model.model.layers[0].self_attn
    assert not hasattr(attn, "qkv_proj") and isinstance(attn.q_proj, QuantLinear)
    assert type(attn.k_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert report.count(kind_contains="gate_proj+up_proj") == 2


def test_fuse_argument_checked():
    with pytest.raises(TypeError, match="fuse must be a bool"):
        kernswap.patch(tiny_model("llama"), quant="int8", fuse="yes", progress=False)
