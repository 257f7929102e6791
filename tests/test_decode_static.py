"""Decode steps over a static KV cache (kernswap.ops.decode_layer_step, nn/decode_static.py, the static branch of
nn/decode_model.py): generate with cache_implementation="static" runs every layer's step through the decode-layer
kernel with the tokens and logits of the per-op path (eager and under torch.compile, fullgraph), falls back to the
layers' modules for masks that are not plain causal (left padding), and the registered op passes opcheck and
refuses bad input with clear errors through the wrapper and torch.ops."""
import gc

import pytest
import torch
import torch._dynamo

import kernswap
from kernswap import _ext
from kernswap.nn import decode_static
from kernswap.nn.decode_layer import DecodeForward
from kernswap.patching import set_decode_path
from kernswap.testing.tiny import tiny_model

from conftest import ISAS, assert_raises, use_isa
from test_decode_layer import IDS, NEW, _generate
from test_decode_layer import _logit_tol as _tol

pytestmark = pytest.mark.skipif(not _ext.have_cpu_ext(), reason="the compiled extension is not built")

DENSE = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture
def count(monkeypatch):
    """Steps through the kernel ("kernel") and through the layers' modules ("reference"), one per layer and token."""
    n = {"kernel": 0, "reference": 0}
    real_ref = decode_static._reference

    def ref(*a):
        n["reference"] += 1
        return real_ref(*a)

    real_steps = decode_static.static_steps

    def steps(fwds, *a):
        before = n["reference"]
        out = real_steps(fwds, *a)
        n["kernel"] += len(fwds) - (n["reference"] - before)
        return out

    monkeypatch.setattr(decode_static, "_reference", ref)
    import kernswap.nn.decode_layer as dl

    monkeypatch.setattr(dl.DecodeForward, "static_steps", staticmethod(steps))
    return n


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches empty before and after (a compiled test leaves no graph for the next)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _patched(family, quant="int8", **kw):
    model = tiny_model(family, **kw)
    kernswap.patch(model, quant=quant, progress=False)
    model.generation_config.cache_implementation = "static"
    return model


@pytest.mark.parametrize("quant", ["int8", "w8a8"])
@pytest.mark.parametrize("family", DENSE)
def test_same_tokens_as_per_op_path(family, quant, count):
    model = _patched(family, quant, **({"sliding_window": None} if family == "mistral" else {}))
    layers = model.config.num_hidden_layers
    tokens, logits = _generate(model)
    assert count == {"kernel": layers * (NEW - 1), "reference": 0}, "every decode step took the kernel"
    set_decode_path(model, False)
    ref_tokens, ref_logits = _generate(model)
    assert count["kernel"] == layers * (NEW - 1) and count["reference"] == 0, "off: the model's own forward"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_tol(ref_logits))
    set_decode_path(model, True)
    model.generation_config.cache_implementation = None  # the dynamic cache's path: the same tokens
    assert torch.equal(_generate(model)[0], tokens)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_tier(isa, count):
    with use_isa(isa):
        model = _patched("qwen3", kernswap.QuantConfig(weight_bits=4, group_size=32, symmetric=False))
        tokens, logits = _generate(model)
        set_decode_path(model, False)
        ref_tokens, ref_logits = _generate(model)
    assert count["kernel"] > 0 and count["reference"] == 0
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_tol(ref_logits))


def test_sliding_window_layers_keep_their_forward(count):
    """A sliding-window model's static cache has StaticSlidingWindowLayer layers: the model's own forward."""
    model = _patched("mistral", sliding_window=8)
    tokens, logits = _generate(model)
    assert count == {"kernel": 0, "reference": 0}
    set_decode_path(model, False)
    assert torch.equal(tokens, _generate(model)[0])


def test_padding_mask_takes_the_layers_modules(count):
    """Left padding: the model's 4-D mask is not plain causal, so each step runs the reference (the layers' own
    modules over the static buffers under that mask): the per-op path's tokens and logits."""
    model = _patched("llama")
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    tokens, logits = _generate(model, attention_mask=mask)
    assert count["reference"] == model.config.num_hidden_layers * (NEW - 1) and count["kernel"] == 0
    set_decode_path(model, False)
    ref_tokens, ref_logits = _generate(model, attention_mask=mask)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_tol(ref_logits))


def test_replaced_weights_are_read(count):
    """A quantized buffer replaced by another object between two generates: the static steps read the new one
    (the layer's plan is rebuilt), through the kernel."""
    model = _patched("llama")
    before = _generate(model)[1]
    qkv = model.model.layers[1].self_attn._modules["qkv_proj"]
    qkv.packed = qkv.packed.clone().neg_()
    count["kernel"] = 0
    after = _generate(model)[1]
    assert count == {"kernel": model.config.num_hidden_layers * (NEW - 1), "reference": 0}
    set_decode_path(model, False)
    ref = _generate(model)[1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=0, atol=_tol(ref))


def test_mask_is_causal_at():
    f = decode_static.mask_is_causal_at
    causal = torch.arange(8).view(1, 1, 1, 8) <= 3
    assert f(None, 3, 8) and f(causal, 3, 8) and not f(causal, 4, 8)
    assert not f(causal.clone().index_fill_(3, torch.tensor([6]), True), 3, 8)  # a later position open
    add = torch.zeros(1, 1, 1, 8).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert f(add, 3, 8) and not f(add.clone().fill_(0), 3, 8) and not f(add + 0.5, 3, 8)
    pad = torch.ones(2, 4, dtype=torch.long)
    assert f(pad, 3, 8)
    pad[1, 0] = 0
    assert not f(pad, 3, 8)


def test_compiled_fullgraph_same_tokens(count, fresh_dynamo):
    """torch.compile(model.forward, fullgraph=True) with a static cache: no graph break, one graph for the decode
    steps, every step through the kernel, the eager path's tokens."""
    model = _patched("llama")
    ref_tokens, ref_logits = _generate(model)
    count["kernel"] = 0
    model.forward = torch.compile(model.forward, fullgraph=True)
    tokens, logits = _generate(model)
    assert count == {"kernel": model.config.num_hidden_layers * (NEW - 1), "reference": 0}
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_tol(ref_logits))
    # another length: a cache of another capacity, which torch.compile retraces with a dynamic capacity
    with torch.no_grad():
        more = model.generate(IDS, max_new_tokens=NEW + 5, min_new_tokens=NEW + 5, do_sample=False, pad_token_id=0)
    assert torch.equal(more[:, :tokens.shape[1]], tokens)


def _counted_hook():
    """(calls, hook): a forward hook that shifts a decoder layer's output and counts its calls in a tensor (a Python
    counter would be a guard that fails on every compiled step)."""
    calls = torch.zeros((), dtype=torch.long)

    def hook(mod, args, out):
        calls.add_(1)
        return (out[0] + 0.5,) + tuple(out[1:]) if isinstance(out, tuple) else out + 0.5

    return calls, hook


@pytest.mark.parametrize("which", ["the model", "a deep copy"])
def test_compiled_step_runs_a_layer_hook(which, fresh_dynamo):
    """A forward hook on a decoder layer when torch.compile traces the decode step: the compiled step is the
    model's own forward with the hook in it (called on every step, the eager tokens and logits). The model-level
    hooks are read once when the step is traced, as Dynamo reads a compiled module's own; a deep copy of a patched
    model has its own model-level forward, so compiled it reads the copy's hooks, not the original's (none)."""
    import copy

    model = _patched("llama")
    if which == "a deep copy":
        original, model = model, copy.deepcopy(model)
        assert model.model.__dict__["forward"].uid != original.model.__dict__["forward"].uid
    calls, hook = _counted_hook()
    model.model.layers[1].register_forward_hook(hook)
    ref_tokens, ref_logits = _generate(model)
    assert int(calls) == NEW
    model.forward = torch.compile(model.forward, fullgraph=True)
    tokens, logits = _generate(model)
    assert int(calls) == 2 * NEW, "the hook ran on every compiled step"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_tol(ref_logits))


def test_compiled_step_sees_a_later_hook_when_hooks_are_guarded(fresh_dynamo):
    """With Dynamo's hook guards on (skip_nnmodule_hook_guards=False), the decode path reads the hooks on every
    compiled call: a hook set after the step was compiled runs on every following step (a recompile), with the
    eager tokens and logits."""
    model = _patched("llama")
    calls, hook = _counted_hook()
    eager = model.forward
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        model.forward = torch.compile(eager, fullgraph=True)
        plain = _generate(model)[1]
        model.model.layers[1].register_forward_hook(hook)
        tokens, logits = _generate(model)
    assert int(calls) == NEW, "the hook ran on every compiled step"
    model.forward = eager
    ref_tokens, ref_logits = _generate(model)
    assert int(calls) == 2 * NEW and not torch.allclose(ref_logits, plain), "the hook changes the logits"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_tol(ref_logits))


def _op_args(model, b=2, cap=9, pos=4):
    cfg = model.config
    d, hkv, n = cfg.head_dim, cfg.num_key_value_heads, cfg.num_hidden_layers
    fwds = [layer.__dict__["forward"] for layer in model.model.layers]
    assert all(isinstance(f, DecodeForward) for f in fwds)
    g = torch.Generator().manual_seed(3)
    return dict(x=torch.randn(b, cfg.hidden_size, generator=g), cos=torch.randn(b, d, generator=g),
                sin=torch.randn(b, d, generator=g), keys=[torch.randn(b, hkv, cap, d, generator=g) for _ in range(n)],
                values=[torch.randn(b, hkv, cap, d, generator=g) for _ in range(n)],
                positions=[torch.tensor(pos) for _ in range(n)], attention_mask=None,
                layer_ids=[f.uid for f in fwds])


def test_op_kernel_matches_reference_and_writes_one_position():
    model = _patched("qwen3")
    a = _op_args(model)
    b = {k: ([t.clone() for t in v] if isinstance(v, list) and isinstance(v[0], torch.Tensor) else v)
         for k, v in a.items()}
    versions = [t._version for t in a["keys"] + a["values"]]
    out = kernswap.ops.decode_layer_step(**a)
    assert all(int(p) == 5 for p in a["positions"])
    assert all(t._version > v for t, v in zip(a["keys"] + a["values"], versions)), "in-place writes bump versions"
    x = b["x"]
    for layer, k, v, p in zip(model.model.layers, b["keys"], b["values"], b["positions"]):
        with torch.no_grad():
            x = decode_static._reference(layer, x, b["cos"], b["sin"], k, v, int(p), None)
    torch.testing.assert_close(out, x, rtol=0, atol=_tol(x))
    for new, ref in zip(a["keys"] + a["values"], b["keys"] + b["values"]):
        torch.testing.assert_close(new[:, :, 4], ref[:, :, 4], rtol=0, atol=_tol(ref[:, :, 4]))
        assert torch.equal(new[:, :, :4], ref[:, :, :4]) and torch.equal(new[:, :, 5:], ref[:, :, 5:])


def test_op_mixes_kernel_and_reference_layers(count):
    """A layer the kernel does not take (its path off) runs its modules between kernel layers of the same step,
    reading and writing the same hidden states: the all-reference result."""
    model = _patched("llama")
    a = _op_args(model)
    b = {k: ([t.clone() for t in v] if isinstance(v, list) and isinstance(v[0], torch.Tensor) else v)
         for k, v in a.items()}
    model.model.layers[0].__dict__["forward"].enabled = False
    out = kernswap.ops.decode_layer_step(**a)
    assert count == {"kernel": 1, "reference": 1}
    x = b["x"]
    for layer, k, v, p in zip(model.model.layers, b["keys"], b["values"], b["positions"]):
        with torch.no_grad():
            x = decode_static._reference(layer, x, b["cos"], b["sin"], k, v, int(p), None)
    torch.testing.assert_close(out, x, rtol=0, atol=_tol(x))


def test_op_position_past_capacity_writes_nothing():
    """Every position is checked before any layer runs: a full cache in the last layer leaves all untouched."""
    model = _patched("llama")
    a = _op_args(model)
    a["positions"][-1] = torch.tensor(9)
    keys = [k.clone() for k in a["keys"]]
    assert_raises(lambda: kernswap.ops.decode_layer_step(**a), ValueError, "got 9 (positions[1])")
    assert [int(p) for p in a["positions"]] == [4, 9]
    assert all(torch.equal(k, k0) for k, k0 in zip(a["keys"], keys))


def test_opcheck():
    model = _patched("llama")
    a = _op_args(model, cap=40, pos=0)
    torch.library.opcheck(torch.ops.kernswap.decode_layer_step.default, tuple(a.values()),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("over, exc, substr", [
    (lambda a: {"x": a["x"].double()}, TypeError, "x.dtype must be one of torch.float32"),
    (lambda a: {"cos": a["cos"][:1]}, ValueError, "cos and sin must be [batch=2, head_dim]"),
    (lambda a: {"keys": a["keys"][:1]}, ValueError, "one entry per layer"),
    (lambda a: {"keys": (a["keys"][0],) * 3}, ValueError, "got 3, 2, 2 and 2"),
    (lambda a: {"values": [v[:, :, :3] for v in a["values"]]}, ValueError, "keys[0] and values[0] must be"),
    (lambda a: {"positions": [torch.tensor(9)] * 2}, ValueError, "position must be in [0, capacity=9)"),
    (lambda a: {"positions": [torch.tensor([1])] * 2}, ValueError, "positions[0] must be 0-D"),
    (lambda a: {"attention_mask": torch.ones(1, 1, 1, 5, dtype=torch.bool)}, ValueError, "capacity=[9]"),
    (lambda a: {"layer_ids": [0, 1]}, ValueError, "layer_ids[0] must be >= 1, got 0"),
    (lambda a: {"layer_ids": [10 ** 9] * 2}, ValueError, "layer_id must name a patched decoder layer"),
])
def test_bad_arguments(over, exc, substr):
    model = _patched("llama")
    a = _op_args(model)
    a.update(over(a))
    assert_raises(lambda: kernswap.ops.decode_layer_step(**a), exc, substr)
    assert_raises(lambda: torch.ops.kernswap.decode_layer_step(*a.values()), exc, substr)


def test_unpatched_layer_ids_die():
    model = _patched("llama")
    a = _op_args(model)
    kernswap.unpatch(model)
    gc.collect()
    assert_raises(lambda: kernswap.ops.decode_layer_step(**a), ValueError, "layer_id must name a patched decoder")
