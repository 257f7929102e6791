"""A patched model saves (save_quantized / save_pretrained) and loads back without re-quantizing."""
import json
import os

import pytest
import torch

import kernswap
from kernswap.nn import QuantLinear
from kernswap.patching import load_quantized, save_quantized
from kernswap.testing.tiny import tiny_model

INT4_G32_ASYM = kernswap.QuantConfig(weight_bits=4, group_size=32, symmetric=False)


def _no_quantizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("load must not quantize")

    monkeypatch.setattr(QuantLinear, "from_linear", boom)


@pytest.mark.parametrize("family,quant", [("llama", "w8a8"), ("qwen2_moe", INT4_G32_ASYM)])
def test_save_quantized_roundtrip(tmp_path, monkeypatch, family, quant):
    model = tiny_model(family)
    kernswap.patch(model, quant=quant, progress=False)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path)
    plan = json.loads((tmp_path / "kernswap_patch.json").read_text())
    assert plan["quant"]["weight_bits"] == kernswap.QuantConfig.from_any(quant).weight_bits
    assert len(plan["quantized"]) + len(plan["fused"]) == kernswap.patching.patch_state(model).report.num_swapped
    assert plan["fused"] and {g["name"] for g in plan["fused"]} == {"qkv_proj", "gate_up_proj"}
    _no_quantizing(monkeypatch)
    loaded = load_quantized(tmp_path)
    assert type(loaded) is type(model)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    with pytest.raises(RuntimeError, match="not available"):
        kernswap.unpatch(loaded)
    # a loaded model is patched: patching it again with the same request is a no-op, never a re-quantization
    assert kernswap.patch(loaded, quant=quant, progress=False) is kernswap.patching.patch_state(loaded).report


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_save_pretrained_then_load_quantized(tmp_path, monkeypatch, family):
    model = tiny_model(family, tie_word_embeddings=True)
    kernswap.patch(model, quant="int8", progress=False)
    ids = torch.randint(3, 256, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)  # plain transformers save: the plan travels in the state dict
    assert not (tmp_path / "kernswap_patch.json").exists()
    _no_quantizing(monkeypatch)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def test_load_into_given_model_and_dtype(tmp_path):
    model = tiny_model("mistral", dtype=torch.bfloat16)
    kernswap.patch(model, quant=kernswap.QuantConfig(weight_bits=4, group_size=32), progress=False)
    save_quantized(model, tmp_path)
    skeleton = tiny_model("mistral", seed=5)  # any unpatched model of the same architecture
    loaded = load_quantized(skeleton, tmp_path, backend="reference")
    assert loaded is skeleton
    gate_up = loaded.model.layers[0].mlp.gate_up_proj
    assert isinstance(gate_up, QuantLinear) and gate_up.config.backend == kernswap.Backend.REFERENCE
    assert loaded.model.layers[0].mlp.up_proj.fused is gate_up
    assert torch.equal(gate_up.packed, model.model.layers[0].mlp.gate_up_proj.packed)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32  # the given model keeps its dtype
    built = load_quantized(tmp_path)
    assert built.model.embed_tokens.weight.dtype == torch.bfloat16  # built from config: the saved dtype


def test_save_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(model, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_quantized(model, os.fspath(tmp_path))
    other = tiny_model("qwen2")
    kernswap.patch(other, quant="int8", progress=False)
    save_quantized(other, tmp_path / "q")
    with pytest.raises(ValueError, match="model_type"):
        load_quantized(model, tmp_path / "q")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_experts_and_sparse_attention_round_trip(tmp_path, family):
    """moe= experts (quantized by quant= or by MoEConfig.quant) and the attention swap are rebuilt on load,
    without re-quantizing: outputs are bit-identical."""
    from kernswap import MoEConfig, SparseAttentionConfig
    from kernswap.nn import FusedExperts

    ids = torch.randint(3, 256, (1, 40))
    for quant, moe in (("int8", "fused"), (None, MoEConfig(quant="int4"))):
        model = tiny_model(family)
        attn = SparseAttentionConfig(block_size=16, min_seq_len=0, density=0.5)
        kernswap.patch(model, quant=quant, moe=moe, attention=attn, progress=False)
        with torch.no_grad():
            ref = model(ids).logits
        path = save_quantized(model, tmp_path / f"{quant}")
        loaded = load_quantized(path)
        assert isinstance(loaded.model.layers[0].mlp.experts, FusedExperts)
        assert loaded.config._attn_implementation == "kernswap_sparse"
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)


def test_truncated_plan_file_names_the_file(tmp_path):
    """A truncated kernswap_patch.json gives a ValueError that names the file, not a bare JSONDecodeError."""
    model = tiny_model("llama")
    kernswap.patch(model, quant="int8", progress=False)
    save_quantized(model, tmp_path)
    path = os.path.join(tmp_path, "kernswap_patch.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError) as ei:
        load_quantized(str(tmp_path))
    assert "kernswap_patch.json" in str(ei.value) and "not a valid kernswap plan" in str(ei.value), str(ei.value)
