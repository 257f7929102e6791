"""One checked path per op (issue 9): the registered ops (torch.ops.kernswap.*, what torch.compile, opcheck and
users call) refuse what their wrappers refuse, with the same messages, on real tensors and in their fake kernels
(meta tensors); meta mixed with CPU tensors and unknown backends raise instead of running a fake kernel on CPU
memory; configs and modules refuse at construction a backend that can never run them; a forced backend never
falls back silently. (Kernel-reaching adversarial inputs through every entry path: tests/test_fuzz.py.)"""
import pytest
import torch

import kernswap
from kernswap import MoEConfig, QuantConfig, SparseAttentionConfig, ops
from kernswap.formats import quantize
from kernswap.nn import FusedExperts

Q = torch.ops.kernswap
NONE_Q = (None, None, None, None, 0, 0, 0, True, False)  # float experts' quantization arguments


def _ql(dev="cpu", n=24, k=64, x=None, scale=None, bias=None, backend="auto", packed_dev=None, fmt="int8"):
    qw = quantize(torch.randn(n, k), fmt)
    x = torch.randn(3, k) if x is None else x
    p = qw.packed.to(packed_dev or dev)
    s = (qw.scale if scale is None else scale).to(dev)
    z = None if qw.zero is None else qw.zero.to(dev)
    b = None if bias is None else bias.to(dev)
    return lambda: Q.quantized_linear(x.to(dev), p, s, z, b, qw.bits, qw.group_size, qw.in_features, qw.out_features,
                                      qw.dynamic_activations, backend)


def _ql_n(dev):
    qw = quantize(torch.randn(24, 64), QuantConfig(4, 64))
    return lambda: Q.quantized_linear(torch.randn(2, 64, device=dev), qw.packed.to(dev), qw.scale.to(dev), None,
                                      None, 4, 64, 64, 40, False, "auto")


def _attn(dev="cpu", mask=None, k_shape=(1, 1, 40, 64), v_shape=None, backend="auto", kdev=None):
    q = torch.randn(1, 2, 20, 64, device=dev)
    k = torch.randn(*k_shape, device=kdev or dev)
    v = torch.randn(*(v_shape or k_shape), device=kdev or dev)
    m = torch.ones(1, 1, 2, 3, dtype=torch.bool) if mask is None else mask
    return lambda: Q.block_sparse_attention(q, k, v, m.to(dev), 16, True, 0.125, backend)


def _experts(dev="cpu", offsets=None, sorted_ids=None, backend="auto", w_dev=None):
    h = torch.randn(4, 32, device=dev)
    wgu, wd = torch.randn(3, 16, 32, device=w_dev or dev), torch.randn(3, 32, 8, device=w_dev or dev)
    s = torch.tensor([0, 5, 1, 2, 6, 3, 4, 7], dtype=torch.int32) if sorted_ids is None else sorted_ids
    o = torch.tensor([0, 3, 5, 8], dtype=torch.int32) if offsets is None else offsets
    return lambda: Q.moe_experts(h, s.to(dev), o.to(dev), wgu, wd, *NONE_Q, 2, backend)


def _fused(dev="cpu", logits_shape=(4, 3), hidden=32, backend="auto", bias=None):
    h = torch.randn(4, hidden, device=dev)
    wgu, wd = torch.randn(3, 16, 32, device=dev), torch.randn(3, 32, 8, device=dev)
    lg = torch.randn(*logits_shape, device=dev)
    scoring = "sigmoid" if bias is not None else "softmax"
    return lambda: Q.fused_moe(h, lg, None, None, wgu, wd, *NONE_Q, 2, True, scoring, "softmax_topk",
                               None if bias is None else bias.to(dev), backend)


# (call on cpu, call on meta or None, exception, substring): the same message on real tensors and in the fake kernel
CASES = [
    ("ql out_features past packed", _ql_n, ValueError, "packed must be torch.uint8 of shape [3, 512]"),
    ("ql short scale", lambda d: _ql(d, scale=torch.ones(1, 16)), ValueError, "scale must be torch.float32 of shape [1, 32]"),
    ("ql short bias", lambda d: _ql(d, bias=torch.randn(23)), ValueError, "bias must have shape [out_features=24], got [23]"),
    ("ql x K", lambda d: _ql(d, x=torch.randn(2, 63)), ValueError, "x2d.shape[-1] must equal in_features=64, got 63"),
    ("ql x dtype", lambda d: _ql(d, x=torch.randn(2, 64).double()), TypeError, "x2d.dtype must be one of"),
    ("ql bogus backend", lambda d: _ql(d, backend="bogus"), ValueError, "backend must be one of"),
    ("attn mask grid", lambda d: _attn(d, mask=torch.ones(1, 1, 1, 3, dtype=torch.bool)), ValueError,
     "block_mask must have shape (1 or 1, 1 or 2, 2, 3)"),
    ("attn mask batch", lambda d: _attn(d, mask=torch.ones(3, 1, 2, 3, dtype=torch.bool)), ValueError,
     "block_mask must have shape"),
    ("attn k head dim", lambda d: _attn(d, k_shape=(1, 1, 40, 32)), ValueError, "k must be (B=1, Hkv, Sk, D=64)"),
    ("attn v tokens", lambda d: _attn(d, v_shape=(1, 1, 30, 64)), ValueError, "k and v must have the same shape"),
    ("attn bogus backend", lambda d: _attn(d, backend="bogus"), ValueError, "backend must be one of"),
    ("experts more experts than weights", lambda d: _experts(d, offsets=torch.tensor([0, 3, 5, 8, 8], dtype=torch.int32)),
     ValueError, "expert_offsets must have shape [num_experts + 1 = 4], got [5]"),
    ("experts bogus backend", lambda d: _experts(d, backend="bogus"), ValueError, "backend must be one of"),
    ("combine fewer rows", lambda d: (lambda: Q.moe_combine(torch.randn(7, 16, device=d), torch.rand(4, 2, device=d), "auto")),
     ValueError, "pair_out must have num_tokens * top_k = 4 * 2 = 8 rows"),
    ("route short bias", lambda d: (lambda: Q.moe_route(torch.randn(5, 8, device=d), 2, True, "sigmoid", "softmax_topk",
                                                         torch.zeros(7, device=d), "auto")),
     ValueError, "correction_bias must have shape [num_experts=8], got [7]"),
    ("route bogus backend", lambda d: (lambda: Q.moe_route(torch.randn(5, 8, device=d), 2, True, "softmax", "softmax_topk",
                                                            None, "bogus")), ValueError, "backend must be one of"),
    ("align bogus backend", lambda d: (lambda: Q.moe_align(torch.zeros(3, 2, dtype=torch.int32, device=d), 4, None, "bogus")),
     ValueError, "backend must be one of"),
    ("fused logits experts", lambda d: _fused(d, logits_shape=(4, 5)), ValueError, "router_logits must be [..., num_experts=3]"),
    ("fused hidden", lambda d: _fused(d, hidden=16), ValueError, "hidden_size=16"),
    ("fused short bias", lambda d: _fused(d, bias=torch.zeros(2)), ValueError, "correction_bias must have shape [num_experts=3]"),
    ("fused bogus backend", lambda d: _fused(d, backend="bogus"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("make,exc,substr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_registered_op_checks_its_arguments(make, exc, substr, device):
    with pytest.raises(exc) as ei:
        make(device)()
    msg = str(ei.value)
    assert msg.startswith("torch.ops.kernswap.") and substr in msg, msg


@pytest.mark.parametrize("call", [
    lambda: _ql("cpu", packed_dev="meta")(),
    lambda: _attn("cpu", kdev="meta")(),
    lambda: _experts("cpu", w_dev="meta")(),
    lambda: Q.moe_combine(torch.randn(8, 16), torch.rand(4, 2, device="meta"), "auto"),
    lambda: Q.moe_route(torch.randn(5, 8), 2, True, "sigmoid", "softmax_topk", torch.zeros(8, device="meta"), "auto"),
    lambda: ops.quantized_linear(torch.randn(2, 64), quantize(torch.randn(8, 64), "int8").to("meta")),
    lambda: ops.moe_combine(torch.randn(8, 16, device="meta"), torch.rand(4, 2)),
], ids=["quantized_linear", "block_sparse_attention", "moe_experts", "moe_combine", "moe_route", "wrapper ql",
        "wrapper combine"])
def test_meta_mixed_with_cpu_raises(call):
    """Never the fake kernel's uninitialised CPU output: a device mismatch is a ValueError naming the argument."""
    with pytest.raises(ValueError, match="must be on the same device|must be on one device"):
        call()


def test_eager_data_checks_of_the_registered_ops():
    """What the fake kernel cannot see (the values), the real implementation checks before any kernel."""
    with pytest.raises(ValueError, match="sorted_pair_ids must be in"):
        _experts(sorted_ids=torch.tensor([0, -5, 1, 2, 6, 3, 4, 7], dtype=torch.int32))()
    with pytest.raises(ValueError, match="expert_offsets must start at 0, not decrease, and end at most"):
        _experts(offsets=torch.tensor([0, 3, 5, 30], dtype=torch.int32))()
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, num_experts=4\)"):
        Q.moe_align(torch.tensor([[0, 4]], dtype=torch.int32), 4, None, "auto")


def test_checks_trace_under_compile_with_dynamic_shapes():
    """The checks are torch._check-style: the ops trace with dynamic sizes, fullgraph, and still check."""
    qw = quantize(torch.randn(24, 64), "int8")
    fn = torch.compile(lambda x: ops.quantized_linear(x, qw), fullgraph=True, dynamic=True, backend="eager")
    for m in (3, 5):
        x = torch.randn(m, 64)
        torch.testing.assert_close(fn(x), ops.quantized_linear(x, qw, backend="reference"), rtol=1e-5, atol=1e-5)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    attn = torch.compile(lambda q, k, v: ops.block_sparse_attention(q, k, v, mask, block_size=16), fullgraph=True,
                         dynamic=True, backend="eager")
    q, k = torch.randn(1, 2, 20, 64), torch.randn(1, 2, 30, 64)
    torch.testing.assert_close(attn(q, k, k), ops.block_sparse_attention(q, k, k, mask, block_size=16))


@pytest.mark.parametrize("make,substr", [
    (lambda: SparseAttentionConfig(backend="cuda"), "SparseAttentionConfig.backend must be a backend that can run"),
    (lambda: QuantConfig(8, dynamic_activations=True, backend="cuda"), "QuantConfig.backend"),
    (lambda: QuantConfig(4, 64, dynamic_activations=True, backend="cuda"), "weight-only formats only"),
    (lambda: MoEConfig(backend="cuda"), "has no fused_experts piece"),
    (lambda: MoEConfig(quant="int4", backend="triton"), "float experts only"),
    (lambda: FusedExperts(2, 32, 32, backend="bogus"), "FusedExperts.backend must be one of"),
    (lambda: FusedExperts(2, 32, 32, backend="cuda"), "FusedExperts.backend must be a backend that can run"),
    (lambda: FusedExperts(2, 32, 32, quant="int8", backend="triton"), "float experts only"),
], ids=["attention cuda", "w8a8 cuda", "w4a8 cuda", "moe cuda", "moe int4 triton", "experts bogus", "experts cuda",
        "experts int8 triton"])
def test_configs_refuse_backends_that_can_never_run(make, substr):
    with pytest.raises(ValueError) as ei:
        make()
    assert substr in str(ei.value), str(ei.value)


def test_possible_backends_are_accepted():
    assert SparseAttentionConfig(backend="triton").backend.value == "triton"
    assert QuantConfig(8, backend="cuda").backend.value == "cuda"
    assert MoEConfig(backend="triton").backend.value == "triton"
    fe = FusedExperts(2, 32, 32, backend="CPU")
    assert fe.backend == "cpu" and "backend=cpu" in repr(fe)
    with pytest.raises(ValueError, match="FusedExperts.backend must be one of"):
        fe.backend = "gpu"  # assignment is validated too
    assert fe.backend == "cpu"


def test_forced_backend_lacking_a_piece_raises():
    """A forced backend never falls back to the reference for a piece it lacks (auto still does)."""
    from kernswap.ops._moe_common import MOE_TABLE, choose_piece

    ok, _ = MOE_TABLE.available("triton")
    if not ok:
        pytest.skip("the triton MoE backend is unavailable here")
    with pytest.raises(NotImplementedError, match="backend='triton' has no 'route' piece"):
        choose_piece("route", "cpu", "triton", router_logits=torch.randn(3, 4))
    with pytest.raises(NotImplementedError, match="has no 'route' piece"):
        ops.moe_route(torch.randn(3, 4), 2, backend="triton")
    assert choose_piece("route", "cpu", "auto", router_logits=torch.randn(3, 4), top_k=2, scoring="softmax",
                        order="softmax_topk", correction_bias=None)[0] in ("cpu", "reference")


def test_kernswap_exports_unchanged():
    assert callable(kernswap.patch) and callable(ops.fused_moe)
