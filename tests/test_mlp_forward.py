"""The compiled SwiGLU of patched MLPs (kernswap.nn.mlp_forward, installed with fused projections): a prefill of
every declared family gives the per-op path's logits within fp32 rounding, is really taken (counted), falls back
to the MLP's own forward for autograd, bf16, hooks and replaced parts, is undone by unpatch, and its binding rejects
bad input with a clear error. Every ISA tier the CPU runs."""
import pytest
import torch

import kernswap
from kernswap import _ext
from kernswap.nn.mlp_forward import MLP_CLASSES, SwiGLUForward
from kernswap.patching import load_quantized, save_quantized, set_decode_path
from kernswap.testing.tiny import TINY_FAMILIES, tiny_model

from conftest import ISAS, assert_raises, use_isa

pytestmark = pytest.mark.skipif(not _ext.have_cpu_ext(), reason="the compiled extension is not built")

IDS = torch.randint(3, 256, (2, 37), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calls(monkeypatch):
    n = {"n": 0}
    C = _ext.get_C()
    real = C.swiglu_rows

    class Counted:
        def __getattr__(self, name):
            return getattr(C, name)

        def swiglu_rows(self, *a):
            n["n"] += 1
            return real(*a)

    monkeypatch.setattr(_ext, "get_C", lambda: Counted())
    return n


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _tol(ref):
    """fp32 rounding of silu (another exp) through a few layers: a few ulps of the logits' scale, per element."""
    return 64 * torch.finfo(torch.float32).eps * ref.abs().amax().item()


def _n_mlps(model):
    return sum(isinstance(m.__dict__.get("forward"), SwiGLUForward) for m in model.modules())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_logits_as_per_op_path(family, calls):
    model = tiny_model(family)
    kernswap.patch(model, quant="w8a8" if family == "qwen3" else "int8", progress=False)
    n = _n_mlps(model)
    assert n == sum(type(m).__name__ in MLP_CLASSES for m in model.modules())  # every dense SiLU MLP
    if family in ("mixtral", "olmoe"):  # fused experts, no dense MLP
        assert n == 0
        return
    assert n > 0
    out = _logits(model)
    assert calls["n"] == n
    set_decode_path(model, False)
    ref = _logits(model)
    assert calls["n"] == n
    torch.testing.assert_close(out, ref, rtol=0, atol=_tol(ref))


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_tier(isa, calls):
    model = tiny_model("llama", hidden_size=96, intermediate_size=328)
    kernswap.patch(model, quant="int8", progress=False)
    with use_isa(isa):
        out = _logits(model)
        set_decode_path(model, False)
        ref = _logits(model)
    assert calls["n"] == model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, rtol=0, atol=_tol(ref))


def test_falls_back(calls):
    model = tiny_model("llama")
    kernswap.patch(model, quant="int8", progress=False)
    with torch.enable_grad():
        x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
        model.model.layers[0].mlp(x).sum().backward()  # autograd: the class's forward, the gradient flows
    assert x.grad is not None and calls["n"] == 0
    seen = []
    h = model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *a: seen.append(1))
    _logits(model)
    assert seen and calls["n"] == model.config.num_hidden_layers - 1  # the hooked MLP ran its own forward
    h.remove()
    mlp = model.model.layers[1].mlp
    up = mlp.up_proj
    mlp.up_proj = torch.nn.Linear(up.in_features, up.out_features, bias=False)  # a replaced part
    calls["n"] = 0
    _logits(model)
    assert calls["n"] == model.config.num_hidden_layers - 1  # that MLP ran its own forward
    mlp.up_proj = up
    bf = tiny_model("llama", dtype=torch.bfloat16)
    kernswap.patch(bf, quant="int8", progress=False)
    before = calls["n"]
    _logits(bf)
    assert calls["n"] == before


def test_unpatch_and_save_load(tmp_path, calls):
    model = tiny_model("qwen2")
    ref = _logits(model)
    kernswap.patch(model, quant="int8", progress=False)
    out = _logits(model)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert _n_mlps(loaded) == _n_mlps(model) > 0
    assert torch.equal(_logits(loaded), out)
    kernswap.unpatch(model)
    assert _n_mlps(model) == 0
    assert torch.equal(_logits(model), ref)


def _args(**over):
    gu, out = torch.randn(3, 10), torch.empty(3, 5)
    a = dict(M=3, I=5, gu_ptr=gu.data_ptr(), gu_numel=gu.numel(), ld_gu=10, out_ptr=out.data_ptr(),
             out_numel=out.numel(), ld_out=5, num_threads=2)
    a.update(over)
    return a, gu, out


def test_binding_computes_rows():
    C = _ext.get_C()
    a, gu, out = _args()
    C.swiglu_rows(**a)
    g, u = gu[:, :5].double(), gu[:, 5:].double()
    ref = (torch.nn.functional.silu(g) * u).float()
    torch.testing.assert_close(out, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)


@pytest.mark.parametrize("over, substr", [
    ({"M": -1}, "M must be >= 0, got -1"),
    ({"ld_gu": 9}, "ld_gu must be >= 10, got 9"),
    ({"ld_out": 4}, "ld_out must be >= 5, got 4"),
    ({"gu_numel": 29}, "gu_numel must be >= 30 elements"),
    ({"out_numel": 14}, "out_numel must be >= 15 elements"),
    ({"gu_ptr": 0}, "gu_numel: null address"),
    ({"I": 2 ** 62}, "overflows 64 bits"),
])
def test_binding_rejects(over, substr):
    a, gu, out = _args(**over)
    assert_raises(lambda: _ext.get_C().swiglu_rows(**a), ValueError, substr)
