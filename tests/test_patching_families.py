"""Each declared family, as a tiny random model: swap counts, logits close to unpatched, generate() runs."""
import pytest
import torch

import kernswap
from kernswap.patching.families import families, get_family
from kernswap.testing.tiny import MOE_FAMILIES, TINY_FAMILIES, expected_linear_count, tiny_model

INT4_G32 = kernswap.QuantConfig(weight_bits=4, group_size=32)
W4A8_G32 = kernswap.QuantConfig(weight_bits=4, group_size=32, dynamic_activations=True)
# (config, max relative L2 error of the logits, min cosine similarity): tiny random models, K = 64/128
FORMATS = {"int8": ("int8", 0.03, 0.9995), "w8a8": ("w8a8", 0.04, 0.999),
           "int4-g32": (INT4_G32, 0.15, 0.99), "w4a8-g32": (W4A8_G32, 0.15, 0.99)}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_every_family_is_declared():
    declared = families()
    for fam in TINY_FAMILIES:
        assert declared[fam].name == fam
        assert declared[fam].attention and "lm_head" in declared[fam].skip
    assert get_family("no-such-model").name == "generic"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-layer"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_swap_counts_and_logits(family, fmt, fuse):
    cfg, max_rel, min_cos = FORMATS[fmt]
    model = tiny_model(family)
    ids = torch.randint(3, 256, (2, 19))
    ref = _logits(model, ids)
    report = kernswap.patch(model, quant=cfg, progress=False, fuse=fuse)
    attn, mlp = expected_linear_count(family, fused=fuse)
    assert report.count(role="attention") == attn
    assert report.count(role="mlp") == mlp
    assert report.num_swapped == attn + mlp
    n_ql = sum(isinstance(m, kernswap.nn.QuantLinear) for m in model.modules())
    assert n_ql == attn + mlp
    assert not isinstance(model.lm_head, kernswap.nn.QuantLinear)
    out = _logits(model, ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert rel < max_rel and cos > min_cos, (family, fmt, rel, cos)
    assert report.memory_after < report.memory_before


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_experts_left_for_the_moe_swap(family):
    model = tiny_model(family)
    report = kernswap.patch(model, quant="int8", progress=False)
    reasons = report.skipped_by_reason
    experts = [r for r in reasons if "stacked 3-D expert weights" in r]
    assert experts and "MoE swap" in experts[0]
    assert any("router/gate" in r for r in reasons)  # routers are never quantized
    assert all(isinstance(b.mlp.experts.gate_up_proj, torch.nn.Parameter)
               for b in model.model.layers if hasattr(b.mlp, "experts"))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "qwen2_moe"])
def test_generate_greedy_and_sampling(family):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 7))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    kernswap.patch(model, quant="int8", progress=False)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        no_cache = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8,
                                 use_cache=True, pad_token_id=0)
    assert greedy.shape == no_cache.shape == sampled.shape == (1, 13)
    assert torch.equal(greedy, no_cache)  # the KV cache path agrees with the full recompute
    assert torch.equal(greedy[:, :7], ids)
    assert (greedy[:, 7:9] == ref[:, 7:9]).float().mean() >= 0.5  # int8 keeps the first greedy tokens


def test_bf16_model_int4():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (1, 9))
    ref = _logits(model, ids)
    report = kernswap.patch(model, quant=INT4_G32, skip=("lm_head", "*.o_proj"), progress=False, fuse=False)
    assert report.num_swapped == 12
    out = model(ids).logits
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.2
