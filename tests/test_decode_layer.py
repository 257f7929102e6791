"""The decode-layer path (kernswap.nn.decode_layer, installed by patch with fused projections): a decode step of a
Llama / Mistral / Qwen2 / Qwen3 layer in two compiled calls gives the per-op path's tokens and logits within fp32
rounding, is really taken (counted), falls back to the layer's own forward for everything else, is undone by
unpatch, comes back with load_quantized, and its bindings reject bad input with a clear error."""
import pytest
import torch

import kernswap
from kernswap import _ext
from kernswap.nn.decode_layer import DecodeForward
from kernswap.patching import load_quantized, save_quantized, set_decode_path
from kernswap.testing.tiny import MOE_FAMILIES, tiny_model

from conftest import ISAS, assert_raises, use_isa

pytestmark = pytest.mark.skipif(not _ext.have_cpu_ext(), reason="the compiled extension is not built")

DENSE = ("llama", "mistral", "qwen2", "qwen3")
IDS = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
FORMATS = {"int8": "int8", "w8a8": "w8a8",
           "int4-g32-asym": kernswap.QuantConfig(weight_bits=4, group_size=32, symmetric=False),
           "int4-g32-fzero": kernswap.QuantConfig(weight_bits=4, group_size=32, symmetric=False, zero_point="float")}
NEW = 12


@pytest.fixture
def steps(monkeypatch):
    """Counts the decode steps the kernel ran (one per layer and token)."""
    n = {"steps": 0}
    real = DecodeForward._step

    def counted(self, *a, **k):
        n["steps"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(DecodeForward, "_step", counted)
    from kernswap.nn import decode_model

    real_loop = decode_model._one_call_per_layer

    def counted_loop(fwds, *a):  # the base model's loop runs every layer's step itself: one per layer
        out = real_loop(fwds, *a)
        n["steps"] += 0 if out is None else len(fwds)
        return out

    monkeypatch.setattr(decode_model, "_one_call_per_layer", counted_loop)
    return n


def _patched(family, quant="int8", **kw):
    model = tiny_model(family, **kw)
    kernswap.patch(model, quant=quant, progress=False)
    return model


def _generate(model, ids=IDS, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _logit_tol(ref):
    """fp32 rounding of a few hundred-term sums, re-associated (norms in double, fused attention, another op
    order): a few ulps of the logits' scale, per element."""
    return 64 * torch.finfo(torch.float32).eps * ref.abs().amax().item()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("family", DENSE)
def test_same_tokens_as_per_op_path(family, fmt, steps):
    model = _patched(family, FORMATS[fmt])
    layers = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), DecodeForward)]
    assert len(layers) == model.config.num_hidden_layers
    tokens, logits = _generate(model)
    assert steps["steps"] == model.config.num_hidden_layers * (NEW - 1), "every decode step took the kernel"
    assert set_decode_path(model, False) == len(layers)
    ref_tokens, ref_logits = _generate(model)
    assert steps["steps"] == model.config.num_hidden_layers * (NEW - 1), "off: no step took the kernel"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_logit_tol(ref_logits))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["w8a8", "int4-g32-fzero"])
def test_every_isa_tier(isa, fmt, steps):
    """The kernel's matmuls run on the forced tier (its elementwise parts are plain loops): the same tokens and
    logits as the per-op path on that tier."""
    with use_isa(isa):
        model = _patched("qwen3", FORMATS[fmt])
        tokens, logits = _generate(model)
        assert steps["steps"] > 0
        set_decode_path(model, False)
        ref_tokens, ref_logits = _generate(model)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_logit_tol(ref_logits))


def test_same_tokens_as_unfused_model():
    fast = _patched("llama", FORMATS["int4-g32-asym"])
    slow = tiny_model("llama")
    kernswap.patch(slow, quant=FORMATS["int4-g32-asym"], progress=False, fuse=False)
    assert not any(isinstance(m.__dict__.get("forward"), DecodeForward) for m in slow.modules())
    assert torch.equal(_generate(fast)[0], _generate(slow)[0])


@pytest.mark.parametrize("hidden, heads, kv_heads, head_dim", [(128, 8, 2, 64), (96, 12, 2, 40)])
def test_long_cache_parallel_attention(steps, hidden, heads, kv_heads, head_dim):
    """A cache long enough for the attention to split (sequence, kv head) pairs over the threads (L * D * M * Hq
    >= 2^18), GQA with 4 query heads per kv head (the scores as dot products on the cache rows) and with 6 (more
    rows than that: the packed GEMM), head_dim 64 and 40, a cache longer than one block of anything."""
    model = _patched("llama", "int8", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, max_position_embeddings=1024)
    ids = torch.randint(3, 256, (2, 530), generator=torch.Generator().manual_seed(1))
    tokens, logits = _generate(model, ids)
    assert steps["steps"] > 0
    set_decode_path(model, False)
    ref_tokens, ref_logits = _generate(model, ids)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_logit_tol(ref_logits))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_layers_keep_their_forward(family):
    model = _patched(family)
    assert not any(isinstance(m.__dict__.get("forward"), DecodeForward) for m in model.modules())


def test_falls_back_with_a_mask(steps):
    """Left-padded prompts: the model passes an attention mask, so every step runs the layer's own forward."""
    model = _patched("llama")
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    tokens, _ = _generate(model, attention_mask=mask)
    assert steps["steps"] == 0
    set_decode_path(model, False)
    assert torch.equal(tokens, _generate(model, attention_mask=mask)[0])


def _one_step(model):
    """Prefill then one decode step called by hand (position_ids of one row: cos / sin of [1, 1, D] that broadcast
    over the batch), the step's logits."""
    with torch.no_grad():
        cache = model(IDS, use_cache=True).past_key_values
        return model(IDS[:, :1], cache=cache).logits, cache


def test_hand_called_step_and_grad_fallback(steps):
    model = _patched("llama")
    logits, cache = _one_step(model)
    assert steps["steps"] == 2
    with torch.enable_grad():
        model(IDS[:, :1], cache=cache)  # a decode step with grad on runs the layer's own forward
    assert steps["steps"] == 2
    set_decode_path(model, False)
    ref, _ = _one_step(model)
    torch.testing.assert_close(logits, ref, rtol=0, atol=_logit_tol(ref))


def test_falls_back_with_bf16(steps):
    bf = _patched("llama", dtype=torch.bfloat16)
    _generate(bf)
    assert steps["steps"] == 0


def test_falls_back_when_a_part_is_replaced(steps):
    """A layer whose parts no longer match (here o_proj swapped for a plain Linear after patching) takes its own
    forward: the checks run on every call, not only at patch time."""
    model = _patched("llama")
    attn = model.model.layers[0].self_attn
    o = attn.o_proj
    attn.o_proj = torch.nn.Linear(o.in_features, o.out_features, bias=False)
    _generate(model)
    assert steps["steps"] == (NEW - 1) * (model.config.num_hidden_layers - 1)
    attn.o_proj = o


def test_sizes_the_kernel_does_not_fit_fall_back(steps):
    """A config whose head counts no longer match the fused q/k/v layer: the layer's own forward, never an error."""
    model = _patched("llama")
    ref = _generate(model)
    model.config.num_key_value_heads = 1  # the attention modules read their own sizes; the plan reads the config
    for layer in model.model.layers:
        layer.__dict__["forward"]._plan = None
    out = _generate(model)
    assert steps["steps"] == 2 * (NEW - 1), "only the first generate took the kernel"
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=_logit_tol(ref[1]))


def test_weights_changed_in_place_are_read(steps):
    """The prepared pointers are keyed on the buffers' versions: an in-place write to a norm weight is seen."""
    model = _patched("llama")
    before = _generate(model)[1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.mul_(3.0)
    after = _generate(model)[1]
    set_decode_path(model, False)
    ref = _generate(model)[1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=0, atol=_logit_tol(ref))


@pytest.mark.parametrize("how", ["buffer", "parameter", "data"])
def test_replaced_weights_are_read(steps, how):
    """The prepared pointers follow the modules: a quantized buffer or a norm weight replaced by another object, or
    its ``.data`` moved, after the plan was made is read on the next step (the plan is rebuilt), never the old
    memory."""
    model = _patched("llama")
    before = _generate(model)[1]
    layer = model.model.layers[0]
    qkv, norm = layer.self_attn._modules["qkv_proj"], layer.post_attention_layernorm
    if how == "buffer":
        qkv.packed = qkv.packed.clone().neg_()
    elif how == "parameter":
        norm.weight = torch.nn.Parameter(norm.weight.detach() * 3.0)
    else:
        norm.weight.data = norm.weight.data * 3.0
    steps["steps"] = 0
    after = _generate(model)[1]
    assert steps["steps"] == (NEW - 1) * model.config.num_hidden_layers, "the rebuilt plan still takes the kernel"
    set_decode_path(model, False)
    ref = _generate(model)[1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=0, atol=_logit_tol(ref))


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("how", ["forward hook", "pre-hook", "instance forward", "embedding hook"])
def test_hooked_or_wrapped_parts_run(steps, how, cache):
    """A hook on a part the kernel stands for (o_proj, a norm; the embedding, which the model-level step looks up
    itself) or a wrapper set as a part's instance ``forward`` (down_proj) runs on every decode step, as in the
    per-op path (the layer takes its modules while it is there); once it is removed the kernel takes the layer
    again."""
    model = _patched("llama")
    model.generation_config.cache_implementation = cache
    layer = model.model.layers[0]
    calls = []
    if how == "forward hook":
        handle = layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
        remove = handle.remove
    elif how == "pre-hook":
        handle = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, i: calls.append(1) or (i[0] * 2,))
        remove = handle.remove
    elif how == "embedding hook":
        handle = model.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
        remove = handle.remove
    else:
        down = layer.mlp.down_proj
        down.forward = lambda x: calls.append(1) or type(down).forward(down, x) * 0.5
        remove = lambda: down.__dict__.pop("forward")  # noqa: E731
    out = _generate(model)
    n = len(calls)
    set_decode_path(model, False)
    ref = _generate(model)
    assert n == len(calls) - n == NEW, "the hook or wrapper ran on every step, as in the per-op path"
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=_logit_tol(ref[1]))
    remove()
    set_decode_path(model, True)
    steps["steps"] = 0
    _generate(model)
    if cache is None:  # (the counter sees the dynamic cache's steps)
        assert steps["steps"] == (NEW - 1) * model.config.num_hidden_layers, "the kernel takes the layer again"


def test_unpatch_leaves_no_forward():
    model = tiny_model("qwen2")
    ref = _generate(model)
    kernswap.patch(model, quant="int8", progress=False)
    kernswap.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    out = _generate(model)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_save_load_installs_the_path(tmp_path, steps):
    model = _patched("qwen3", FORMATS["int4-g32-asym"])
    tokens, logits = _generate(model)
    n = steps["steps"]
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert sum(isinstance(m.__dict__.get("forward"), DecodeForward) for m in loaded.modules()) == 2
    out_tokens, out_logits = _generate(loaded)
    assert steps["steps"] == 2 * n
    assert torch.equal(out_tokens, tokens) and torch.equal(out_logits, logits)


def test_dense_attention_keeps_the_decode_kernel(tmp_path, steps, model_steps):
    """With attention="dense" (every causal block) the decode steps still run the decode-layer kernel, with the
    tokens and logits of the same patch without it; sparse attention (density < 1) keeps its own decode; the
    attention swap saves, loads and unpatches with the rest."""
    from kernswap.nn import sparse_attention as sa

    ref = _generate(_patched("llama", "w8a8"))
    steps["steps"] = model_steps["steps"] = 0
    model = tiny_model("llama")
    kernswap.patch(model, quant="w8a8", attention="dense", progress=False)
    out = _generate(model)
    assert steps["steps"] == 2 * (NEW - 1) and model_steps["steps"] == NEW - 1
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=_logit_tol(ref[1]))
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.config._attn_implementation == sa.ATTN_NAME
    assert _generate(loaded)[0].equal(out[0]) and steps["steps"] == 4 * (NEW - 1)
    kernswap.unpatch(model)
    assert model.config._attn_implementation != sa.ATTN_NAME
    sparse = tiny_model("llama")
    kernswap.patch(sparse, quant="w8a8", progress=False,
                   attention=kernswap.SparseAttentionConfig(block_size=16, density=0.5, min_seq_len=0))
    _generate(sparse)
    assert steps["steps"] == 4 * (NEW - 1), "a sparse layer must not run the dense decode kernel"


def test_set_decode_path_checks_its_argument():
    model = _patched("llama")
    assert_raises(lambda: set_decode_path(model, 1), TypeError, "enabled must be a bool, got int")
    assert kernswap.set_decode_path(model, True) == 2


# ---------------------------------------------------------------------------------------------- the bindings
def _one_layer():
    """A patched tiny layer's prepared arguments for a direct call of both bindings."""
    model = _patched("llama")
    fwd = model.model.layers[0].__dict__["forward"]
    layer = fwd.layer
    h, d, hq, hkv = 64, 16, 4, 2
    x = torch.randn(1, 1, h)
    cos, sin = torch.ones(1, 1, d), torch.zeros(1, 1, d)
    from transformers import DynamicCache

    with torch.no_grad():
        prepared = fwd._prepared(x, dict(position_embeddings=(cos, sin), cache=DynamicCache(config=model.config)))
    assert prepared is not None
    weights = prepared.weights
    return layer, weights, h, d, hq, hkv


def _attn_in(C, layer, w, h, d, hq, hkv, **over):
    x, out = torch.randn(1, h), torch.empty(1, (hq + 2 * hkv) * d)
    cos, sin, nw = torch.ones(1, d), torch.zeros(1, d), layer.input_layernorm.weight
    a = dict(x_ptr=x.data_ptr(), x_numel=x.numel(), M=1, H=h, norm_ptr=nw.data_ptr(), norm_numel=nw.numel(),
             eps=1e-6, qkv=w[0], cos_ptr=cos.data_ptr(), cos_numel=cos.numel(), sin_ptr=sin.data_ptr(),
             sin_numel=sin.numel(), Hq=hq, Hkv=hkv, D=d, q_norm_ptr=0, q_norm_numel=0, k_norm_ptr=0, k_norm_numel=0,
             qk_eps=0.0, out_ptr=out.data_ptr(), out_numel=out.numel(), num_threads=1)
    a.update(over)
    return lambda: C.decode_attn_in(**a), (x, out, cos, sin)


def _attn_out(C, layer, w, h, d, hq, hkv, L=5, **over):
    x, qkv, out = torch.randn(1, h), torch.randn(1, (hq + 2 * hkv) * d), torch.empty(1, h)
    k, v = torch.randn(1, hkv, L, d), torch.randn(1, hkv, L, d)
    pw, inter = layer.post_attention_layernorm.weight, layer.mlp.down_proj.in_features
    a = dict(x_ptr=x.data_ptr(), x_numel=x.numel(), q_ptr=qkv.data_ptr(), q_numel=qkv.numel(),
             q_row_stride=qkv.shape[1], k_ptr=k.data_ptr(), k_numel=k.numel(), ks0=k.stride(0), ks1=k.stride(1),
             ks2=k.stride(2), v_ptr=v.data_ptr(), v_numel=v.numel(), vs0=v.stride(0), vs1=v.stride(1),
             vs2=v.stride(2), L=L, M=1, H=h, Hq=hq, Hkv=hkv, D=d, scaling=d ** -0.5, o=w[1], post_ptr=pw.data_ptr(),
             post_numel=pw.numel(), eps=1e-6, gate_up=w[2], down=w[3], I=inter, out_ptr=out.data_ptr(),
             out_numel=out.numel(), num_threads=1)
    a.update(over)
    return lambda: C.decode_attn_out(**a), (x, qkv, k, v, out)


def test_bindings_run_on_good_input():
    C = _ext.get_C()
    layer, w, h, d, hq, hkv = _one_layer()
    call, keep = _attn_in(C, layer, w, h, d, hq, hkv)
    call()
    assert torch.isfinite(keep[1]).all()
    call, keep = _attn_out(C, layer, w, h, d, hq, hkv)
    call()
    assert torch.isfinite(keep[-1]).all()


@pytest.mark.parametrize("over, substr", [
    (dict(x_numel=63), "x_numel must be >= 64"),
    (dict(out_numel=10), "out_numel must be >= 128"),
    (dict(cos_numel=15), "cos_numel must be >= 16"),
    (dict(Hq=3), "Hq must be a multiple of Hkv=2"),
    (dict(D=15), "D must be even"),
    (dict(M=0), "M"),
    (dict(q_norm_ptr=1, q_norm_numel=16), "must be given together"),
])
def test_attn_in_rejects(over, substr):
    C = _ext.get_C()
    layer, w, h, d, hq, hkv = _one_layer()
    call, _ = _attn_in(C, layer, w, h, d, hq, hkv, **over)
    assert_raises(call, (ValueError, RuntimeError), substr)


@pytest.mark.parametrize("over, substr", [
    (dict(k_numel=100), "k_numel must be >="),
    (dict(v_numel=0), "v_numel must be >="),
    (dict(ks2=1000), "k_numel must be >="),
    (dict(q_row_stride=8), "q_row_stride"),
    (dict(L=0), "L"),
    (dict(I=7), "gate_up must be [N=14"),
    (dict(post_numel=3), "post_numel must be >= 64"),
])
def test_attn_out_rejects(over, substr):
    C = _ext.get_C()
    layer, w, h, d, hq, hkv = _one_layer()
    call, _ = _attn_out(C, layer, w, h, d, hq, hkv, **over)
    assert_raises(call, (ValueError, RuntimeError), substr)


def test_weight_tuple_checked():
    C = _ext.get_C()
    layer, w, h, d, hq, hkv = _one_layer()
    call, _ = _attn_in(C, layer, w, h, d, hq, hkv, qkv=w[0][:13])
    assert_raises(call, (ValueError, RuntimeError), "qkv must be a 14-tuple, got 13")
    bad = list(w[0])
    bad[1] = 10  # packed_numel far below the weight's bytes
    call, _ = _attn_in(C, layer, w, h, d, hq, hkv, qkv=tuple(bad))
    assert_raises(call, (ValueError, RuntimeError), "packed")
    call, _ = _attn_out(C, layer, w, h, d, hq, hkv, o=w[0])
    assert_raises(call, (ValueError, RuntimeError), "o must be [N=64, K=64], got [128, 64]")


# ---------------------------------------------------------------------------------------------- the cache append
def _dynamic_layer(b=2, h=3, n=3, d=8):
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.update(torch.randn(b, h, n, d), torch.randn(b, h, n, d))
    return layer


class _OneLayerCache:
    """The part of DynamicCache the appender reads, around one DynamicLayer."""

    def __init__(self, layer):
        self.layers, self.offloading = [layer], False

    def update(self, k, v, idx):
        return self.layers[idx].update(k, v)


def test_kv_append_matches_concatenation():
    """150 steps from 3 cached positions (the buffer grows twice), a crop and a step through update() between:
    the layer holds what concatenation would have left, and a view handed out earlier keeps its values."""
    from kernswap.nn.kv_append import KVAppender

    ours, ref = _dynamic_layer(), _dynamic_layer()
    ref.keys, ref.values = ours.keys.clone(), ours.values.clone()
    app, cache = KVAppender(), _OneLayerCache(ours)
    early = None
    for step in range(150):
        k, v = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
        if step == 40:
            ours.crop(-10), ref.crop(-10)
        if step == 90:  # the model's own forward ran in between (a prefill chunk, a fallback step)
            ours.update(k, v), ref.update(k, v)
            continue
        keys, values = app.append(cache, 0, k, v)
        rk, rv = ref.update(k, v)
        assert keys is ours.keys and values is ours.values
        assert torch.equal(keys, rk) and torch.equal(values, rv)
        if step == 10:
            early = (keys, keys.clone())
    assert ours.get_seq_length() == ref.get_seq_length() == 3 + 150 - 10
    assert torch.equal(early[0], early[1]), "a view returned earlier is never written"


def test_kv_append_other_layers_use_update():
    from kernswap.nn.kv_append import KVAppender

    layer = _dynamic_layer()
    layer.keys = layer.keys.to(torch.bfloat16)  # not what the kernel reads: the layer's own update runs
    calls = []
    cache = _OneLayerCache(layer)
    real = cache.update
    cache.update = lambda *a: calls.append(1) or real(*a)
    k = torch.randn(2, 3, 1, 8)
    KVAppender().append(cache, 0, k, k)
    assert calls == [1]


def test_generated_cache_equals_per_op_cache():
    model = _patched("llama")
    caches = []
    for on in (True, False):
        set_decode_path(model, on)
        with torch.no_grad():
            out = model.generate(IDS, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        caches.append(out.past_key_values)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=_logit_tol(b.keys))
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=_logit_tol(b.values))


# ---------------------------------------------------------------------------------------------- the model-level loop
@pytest.fixture
def model_steps(monkeypatch):
    from kernswap.nn.decode_model import DecodeModelForward

    n = {"steps": 0}
    real = DecodeModelForward._step

    def counted(self, *a):
        n["steps"] += 1
        return real(self, *a)

    monkeypatch.setattr(DecodeModelForward, "_step", counted)
    return n


@pytest.mark.parametrize("family", DENSE)
def test_model_loop_same_tokens(family, model_steps, steps):
    from kernswap.nn.decode_model import DecodeModelForward

    model = _patched(family, FORMATS["int4-g32-asym"])
    assert isinstance(model.model.__dict__.get("forward"), DecodeModelForward)
    tokens, logits = _generate(model)
    assert model_steps["steps"] == NEW - 1 and steps["steps"] == 2 * (NEW - 1)
    set_decode_path(model, False)
    ref_tokens, ref_logits = _generate(model)
    assert model_steps["steps"] == NEW - 1
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=_logit_tol(ref_logits))


def test_model_loop_all_ones_mask_and_hooks(model_steps):
    model = _patched("llama")
    mask = torch.ones_like(IDS)
    tokens, _ = _generate(model, attention_mask=mask)
    assert model_steps["steps"] == NEW - 1, "an all-ones mask is no mask"
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda mod, a, out: seen.append(1))
    hooked, _ = _generate(model, attention_mask=mask)
    handle.remove()
    assert model_steps["steps"] == NEW - 1, "a hooked layer: the model's own forward"
    assert len(seen) == NEW and torch.equal(hooked, tokens)


def test_model_loop_removed_by_unpatch():
    model = _patched("qwen3")
    kernswap.unpatch(model)
    assert "forward" not in model.model.__dict__


# ---------------------------------------------------------------------------------------------- the one-call plan
def _native_plan(**over):
    C = _ext.get_C()
    layer, w, h, d, hq, hkv = _one_layer()
    n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    a = dict(H=h, Hq=hq, Hkv=hkv, D=d, I=layer.mlp.down_proj.in_features, norm1_ptr=n1.data_ptr(),
             norm1_numel=n1.numel(), eps1=1e-6, norm2_ptr=n2.data_ptr(), norm2_numel=n2.numel(), eps2=1e-6,
             q_norm_ptr=0, q_norm_numel=0, k_norm_ptr=0, k_norm_numel=0, qk_eps=0.0, scaling=d ** -0.5, qkv=w[0],
             o=w[1], gate_up=w[2], down=w[3])
    a.update(over)
    return (lambda: C.DecodeLayerPlan(**a)), (layer, h, d, hkv)


def _native_step(plan, h, d, hkv, cap=8, pos=3, **over):
    x, out = torch.randn(1, h), torch.empty(1, h)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)
    k, v = torch.randn(1, hkv, cap, d), torch.randn(1, hkv, cap, d)
    a = dict(x_ptr=x.data_ptr(), x_numel=x.numel(), M=1, cos_ptr=cos.data_ptr(), cos_numel=cos.numel(),
             sin_ptr=sin.data_ptr(), sin_numel=sin.numel(), k_ptr=k.data_ptr(), k_numel=k.numel(), ks0=k.stride(0),
             ks1=k.stride(1), ks2=k.stride(2), v_ptr=v.data_ptr(), v_numel=v.numel(), vs0=v.stride(0),
             vs1=v.stride(1), vs2=v.stride(2), pos=pos, capacity=cap, out_ptr=out.data_ptr(), out_numel=out.numel(),
             num_threads=1)
    a.update(over)
    return (lambda: plan.step(**a)), (x, out, k, v, cos, sin)  # (the call reads them: they must stay alive)


def test_native_step_writes_the_cache_position():
    make, (layer, h, d, hkv) = _native_plan()
    call, (x, out, k, v, *_) = _native_step(make(), h, d, hkv)
    before = k.clone()
    call()
    assert torch.equal(k[:, :, :3], before[:, :, :3]) and torch.equal(k[:, :, 4:], before[:, :, 4:])
    assert not torch.equal(k[:, :, 3], before[:, :, 3]) and torch.isfinite(out).all()


@pytest.mark.parametrize("over, substr", [
    (dict(norm1_numel=3), "norm1_numel must be >= 64"),
    (dict(Hq=3), "Hq must be a multiple of Hkv=2"),
    (dict(I=7), "gate_up must be [N=14"),
    (dict(k_norm_ptr=1, k_norm_numel=16), "must be given together"),
])
def test_native_plan_rejects(over, substr):
    make, _ = _native_plan(**over)
    assert_raises(make, (ValueError, RuntimeError), substr)


@pytest.mark.parametrize("over, substr", [
    (dict(pos=8), "capacity must be >= 9"),
    (dict(pos=-1), "pos"),
    (dict(k_numel=100), "k_numel must be >="),
    (dict(vs2=100), "v_numel must be >="),
    (dict(ks1=-16), "k strides must be >= 0"),
    (dict(x_numel=1), "x_numel must be >= 64"),
    (dict(M=0), "M"),
])
def test_native_step_rejects(over, substr):
    make, (layer, h, d, hkv) = _native_plan()
    call, _ = _native_step(make(), h, d, hkv, **over)
    assert_raises(call, (ValueError, RuntimeError), substr)
