"""The PatchReport, the generic rule for unknown families, argument checks, the progress bar."""
import pytest
import torch
from torch import nn

import kernswap
from kernswap.nn import QuantLinear
from kernswap.testing.tiny import tiny_model


def test_report_table():
    model = tiny_model("qwen2_moe")
    report = kernswap.patch(model, quant="w8a8", progress=False)
    text = str(report)
    assert "family=qwen2_moe" in text and "quant=w8a8" in text
    assert "Linear -> QuantLinear[w8a8]" in text
    for word in ("attention", "mlp", "skipped", "lm_head", "router/gate", "MoE swap", "before", "after"):
        assert word in text, word
    # 2 layers: q/k/v fused + o_proj per attention block, gate/up fused + down per shared expert
    assert report.counts == {("attention", "Linear -> QuantLinear[w8a8]"): 2,
                             ("attention", "q_proj+k_proj+v_proj -> one QuantLinear[w8a8]"): 2,
                             ("mlp", "Linear -> QuantLinear[w8a8]"): 2,
                             ("mlp", "gate_proj+up_proj -> one QuantLinear[w8a8]"): 2}
    assert "fused projections" in text
    assert report.memory_before > report.memory_after > 0
    d = report.to_dict()
    assert d["swapped"]["attention: q_proj+k_proj+v_proj -> one QuantLinear[w8a8]"] == 2
    assert "PatchReport(" in repr(report)


class _Conv1D(nn.Module):  # like transformers' GPT-2 Conv1D: a 2-D weight that is not an nn.Linear
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        return x @ self.weight


class _MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "my_unknown_arch"})()
        self.embed = nn.Embedding(10, 64)
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64)
        self.odd = nn.Linear(48, 64)  # K=48: int4 g32 cannot take it
        self.conv = _Conv1D()
        self.custom = _MyLinear(64, 64)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.b(torch.relu(self.a(h))) + self.conv(h) + self.custom(h) + self.odd(h[..., :48])
        return self.lm_head(h)


def test_generic_rule_for_unknown_family():
    torch.manual_seed(0)
    model = _Unknown().eval()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        ref = model(ids)
    report = kernswap.patch(model, quant=kernswap.QuantConfig(weight_bits=4, group_size=32), progress=False)
    assert report.family == "generic" and report.model_type == "my_unknown_arch"
    assert {n for n, _, _ in report.swapped} == {"a", "b"}
    assert all(role == "other" for _, role, _ in report.swapped)
    skipped = dict(report.skipped)
    assert "not divisible by group_size=32" in skipped["odd"]
    assert "not an nn.Linear" in skipped["conv"]
    assert "_MyLinear subclasses nn.Linear" in skipped["custom"]
    assert "skip list" in skipped["lm_head"]
    assert "embeddings" in skipped["embed"]
    assert any("unknown model family" in n and "attention/MoE" in n for n in report.notes)
    assert "unknown model family" in str(report)
    with torch.no_grad():
        out = model(ids)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    kernswap.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids), ref)


def test_generic_transformers_model_gpt_neox():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    report = kernswap.patch(model, quant="int8", progress=False)
    assert report.family == "generic"
    assert report.num_swapped == 8  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h per layer
    assert not isinstance(model.lm_head, QuantLinear)  # the output head is skipped by the generic list
    out = model.generate(torch.randint(3, 256, (1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_skip_is_configurable():
    model = tiny_model("llama")
    report = kernswap.patch(model, quant="int8", skip=(), progress=False, fuse=False)  # lm_head too (not tied)
    assert isinstance(model.lm_head, QuantLinear) and report.num_swapped == 15
    model = tiny_model("llama")
    report = kernswap.patch(model, quant="int8", skip=["lm_head", "model.layers.0.*", "v_proj"], progress=False)
    # layer 1 only; without v_proj its q/k/v group is not fused (q, k, o one by one), gate/up is
    assert report.num_swapped == 3 + 2
    assert isinstance(model.model.layers[1].self_attn.v_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_tied_lm_head_not_quantized():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = kernswap.patch(model, quant="int8", skip=(), progress=False)
    assert "tied to model.embed_tokens.weight" in dict(report.skipped)["lm_head"]


def test_argument_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="attention must be"):
        kernswap.patch(model, attention="flash")
    with pytest.raises(ValueError, match="moe must be"):
        kernswap.patch(model, quant="int8", moe="fast")
    with pytest.raises(ValueError, match="int8"):
        kernswap.patch(model, quant="int3")
    with pytest.raises(ValueError, match="backend"):
        kernswap.patch(model, quant="int8", backend="gpu")
    with pytest.raises(TypeError, match="skip"):
        kernswap.patch(model, quant="int8", skip=[1])
    with pytest.raises(TypeError, match="nn.Module"):
        kernswap.patch("not a model", quant="int8")
    assert not kernswap.patching.is_patched(model)


def test_backend_goes_into_the_config():
    model = tiny_model("llama")
    kernswap.patch(model, quant="int8", backend="reference", progress=False)
    assert model.model.layers[0].mlp.up_proj.config.backend == kernswap.Backend.REFERENCE


def test_progress_bar(capfd):
    model = tiny_model("llama")
    kernswap.patch(model, quant="int8", progress=True)
    err = capfd.readouterr().err
    assert "kernswap: quantizing" in err
    model = tiny_model("llama")
    kernswap.patch(model, quant="int8", progress=False)
    assert "kernswap" not in capfd.readouterr().err


@pytest.mark.parametrize("quant", ["int8", "int4", "w8a8"])
def test_report_names_cpu_tier(quant):
    """patch() says which CPU tier the quantized layers run with and where auto hands a shape class to torch's
    GEMM on dequantized panels (weight-only formats on tiers whose integer engine loses there)."""
    from kernswap import _ext
    from kernswap.backends import cpu as cpu_backend

    if not _ext.have_cpu_ext():
        pytest.skip(_ext.cpu_ext_reason())
    report = kernswap.patch(tiny_model("llama"), quant=quant, progress=False)
    tier = _ext.op_isa("qlinear")
    notes = [n for n in report.notes if "CPU kernels" in n]
    assert len(notes) == 1 and f"kernswap's {tier} CPU kernels" in notes[0], report.notes
    rows = None if quant == "w8a8" else cpu_backend.dense_from_rows(8 if quant == "int8" else 4)
    assert (f">= {rows} rows run torch's fp32 GEMM" in notes[0]) == (rows is not None), notes[0]


def test_report_names_attention_and_moe_tiers():
    """With attention= and moe=, the report names the CPU tier of those kernels too."""
    from kernswap import _ext

    if not _ext.have_cpu_ext():
        pytest.skip(_ext.cpu_ext_reason())
    report = kernswap.patch(tiny_model("qwen2_moe"), attention="sparse", moe="fused", progress=False)
    tier = _ext.op_isa("block_sparse_attention")
    assert any(n.startswith(f"block-sparse attention runs kernswap's {tier} CPU kernels") for n in report.notes), \
        report.notes
    assert any(n.startswith(f"fused MoE experts run kernswap's {_ext.op_isa('moe_swiglu')} CPU kernels")
               for n in report.notes), report.notes


def test_report_says_when_auto_runs_the_reference(monkeypatch):
    """Without the compiled CPU module, `auto` runs the reference on the CPU: the report says so (never silently)."""
    from kernswap import _ext

    monkeypatch.setenv("KERNSWAP_NO_EXT", "1")
    _ext.reload()
    try:
        assert not _ext.have_cpu_ext()
        report = kernswap.patch(tiny_model("llama"), quant="int8", progress=False)
        assert any("pure-PyTorch reference" in n and "KERNSWAP_NO_EXT" in n for n in report.notes), report.notes
    finally:
        monkeypatch.delenv("KERNSWAP_NO_EXT")
        _ext.reload()
    if _ext.have_cpu_ext():
        report = kernswap.patch(tiny_model("llama"), quant="int8", progress=False)
        assert not any("pure-PyTorch reference" in n for n in report.notes)
