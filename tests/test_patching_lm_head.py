"""patch(lm_head=...): the output head quantized on request (tied to the embeddings or not), saved, loaded and
undone like every other swap."""
import json

import pytest
import torch

import kernswap
from kernswap.nn import QuantLinear
from kernswap.patching import load_quantized, patch_state, save_quantized
from kernswap.testing.tiny import tiny_model

IDS = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lm_head,bits", [(True, 8), ("int4", 4)])
def test_head_quantized_embedding_kept(tied, lm_head, bits):
    model = tiny_model("llama", tie_word_embeddings=tied)
    emb, head = model.model.embed_tokens.weight, model.lm_head
    table = emb.detach().clone()
    ref = _logits(model)
    report = kernswap.patch(model, quant="int8", lm_head=lm_head, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.config.weight_bits == bits
    assert ("lm_head", "lm_head") in [(n, r) for n, r, _ in report.swapped]
    assert "lm_head" not in dict(report.skipped)
    # the lookups still read the very same float table
    assert model.model.embed_tokens.weight is emb and torch.equal(emb, table)
    # the head computes with its own quantized copy: close to the float head (int8: tight, int4: loose)
    got = _logits(model)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if bits == 8 else 0.3), rel
    kernswap.unpatch(model)
    assert model.lm_head is head and (not tied or model.lm_head.weight is model.model.embed_tokens.weight)
    assert torch.equal(_logits(model), ref)


def test_head_alone_and_default_untouched():
    model = tiny_model("qwen3", tie_word_embeddings=True)
    kernswap.patch(model, quant="int4", progress=False)
    assert not isinstance(model.lm_head, QuantLinear)  # default: never the head
    kernswap.unpatch(model)
    report = kernswap.patch(model, lm_head=True, progress=False)  # only the head
    assert report.num_swapped == 1 and isinstance(model.lm_head, QuantLinear)


def test_save_load_roundtrip(tmp_path, monkeypatch):
    model = tiny_model("llama", tie_word_embeddings=True)
    kernswap.patch(model, quant="int4", lm_head="int8", progress=False)
    ref = _logits(model)
    save_quantized(model, tmp_path)
    plan = json.loads((tmp_path / "kernswap_patch.json").read_text())
    assert plan["lm_head"]["name"] == "lm_head" and plan["lm_head"]["quant"]["weight_bits"] == 8
    assert "lm_head" not in plan["quantized"]
    monkeypatch.setattr(QuantLinear, "from_linear", lambda *a, **k: pytest.fail("load must not quantize"))
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.config.weight_bits == 8
    assert isinstance(loaded.model.embed_tokens.weight, torch.nn.Parameter)
    loaded.tie_weights()  # transformers re-tying the head: the quantized head keeps no float table
    assert [n for n, _ in loaded.lm_head.named_parameters()] == []  # llama's head has no bias
    assert torch.equal(_logits(loaded), ref)
    assert patch_state(loaded).request["lm_head"].weight_bits == 8


def test_bad_lm_head_argument():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="lm_head must be"):
        kernswap.patch(model, quant="int8", lm_head=3, progress=False)
    with pytest.raises(ValueError, match="weight_bits|format|quant"):
        kernswap.patch(model, quant="int8", lm_head="int3", progress=False)
    assert patch_state(model) is None
