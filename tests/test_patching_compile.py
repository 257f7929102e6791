"""torch.compile on a patched model: kernswap's ops trace as one custom op, without graph breaks."""
import pytest
import torch

import kernswap
from kernswap.testing.tiny import tiny_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("quant", ["int8", "w4a8"])
def test_no_graph_breaks_in_patched_mlp(quant):
    model = tiny_model("llama")
    cfg = kernswap.QuantConfig.from_any(quant)
    if cfg.weight_bits == 4:
        cfg = kernswap.QuantConfig(weight_bits=4, group_size=32, dynamic_activations=cfg.dynamic_activations)
    kernswap.patch(model, quant=cfg, progress=False)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    explanation = torch._dynamo.explain(mlp)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(mlp, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mlp(x))


def test_fullgraph_patched_decoder_forward():
    model = tiny_model("qwen2")
    kernswap.patch(model, quant="int8", progress=False)
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        out = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref)
