"""The adversarial cases of issue 9, one callable each, for tests/test_fuzz.py (run in a child process there).

ADVERSARIAL: (case id, fn, expect). fn() returns "ok" after comparing with the reference backend, or raises;
expect is "ok" or a substring of the clear exception the case must raise (never a crash, never garbage)."""
import dataclasses

import torch

Q = torch.ops.kernswap
NONE_Q = (None, None, None, None, 0, 0, 0, True, False)  # float experts' quantization arguments


def _qw(fmt="int4-g64-asym", n=24, k=128):
    from conftest import FORMATS
    from kernswap.formats import quantize

    return quantize(torch.randn(n, k) / k ** 0.5, FORMATS[fmt])


def _op_ql(qw, x=None, bias=None, n=None, k=None, scale=None, zero="same", backend="auto"):
    k = qw.in_features if k is None else k
    x = torch.randn(3, k) if x is None else x
    z = qw.zero if zero == "same" else zero
    return Q.quantized_linear(x, qw.packed, qw.scale if scale is None else scale, z, bias, qw.bits, qw.group_size,
                              k, qw.out_features if n is None else n, qw.dynamic_activations, backend)


def _edited(**kw):
    """ops.quantized_linear with a QuantizedWeight edited after construction (no __post_init__ ran again)."""
    from kernswap import ops

    qw = _qw()
    for name, v in kw.items():
        setattr(qw, name, v(qw) if callable(v) else v)
    return ops.quantized_linear(torch.randn(2, qw.in_features), qw)


def _ql_module(fmt="int8"):
    from conftest import FORMATS
    from kernswap.nn import QuantLinear

    return QuantLinear.from_linear(torch.nn.Linear(128, 40), FORMATS[fmt])


def _ql_tamper(edit, fmt="int8"):
    """A QuantLinear that ran one cached no_grad forward, then `edit(q)`: the next forward must follow the edit
    (the reference's result on the edited buffers) or refuse it."""
    from test_fuzz import ql_check

    q = _ql_module(fmt)
    x = torch.randn(3, 128)
    with torch.no_grad():
        q(x)
        edit(q)
        out = q(x)
    ql_check(out, x, q.qweight, None if q.bias is None else q.bias.detach())
    return "ok"


def _fe(quant=None, e=4, h=32, i=32):
    from kernswap.formats.experts import quantize_experts
    from kernswap.nn import FusedExperts

    fe = FusedExperts(e, h, i, quant=quant)
    wgu, wd = torch.randn(e, 2 * i, h) / h ** 0.5, torch.randn(e, h, i) / i ** 0.5
    if quant is None:
        fe.gate_up_proj.data, fe.down_proj.data = wgu, wd
    else:
        fe.load_quantized(quantize_experts(wgu, fe.cfg_gate_up), quantize_experts(wd, fe.cfg_down))
    return fe


def _fe_tamper(edit, quant=None, width=32):
    """A FusedExperts that ran one cached no_grad forward, then `edit(fe)`; next forward vs the reference."""
    from test_fuzz import moe_check
    from kernswap.reference.moe import fused_experts_ref

    fe = _fe(quant)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0]])
    w = torch.rand(3, 2)
    with torch.no_grad():
        fe(torch.randn(3, 32), ids, w)
        edit(fe)
        x = torch.randn(3, width)
        out = fe(x, ids, w)
    wgu, wd = fe.weights()
    moe_check(out, fused_experts_ref(x, w, ids, wgu, wd), None if quant is None else wgu)
    return "ok"


def _attn(q_shape=(1, 2, 20, 64), k_shape=(1, 1, 40, 64), v_shape=None, mask_shape=(1, 1, 2, 3), op=True,
          devices=("cpu", "cpu"), backend="auto", causal=True):
    from kernswap import ops

    q = torch.randn(*q_shape, device=devices[0])
    k = torch.randn(*k_shape, device=devices[1])
    v = torch.randn(*(v_shape or k_shape), device=devices[1])
    m = torch.ones(*mask_shape, dtype=torch.bool)
    if op:
        return Q.block_sparse_attention(q, k, v, m, 16, causal, 0.125, backend)
    return ops.block_sparse_attention(q, k, v, m, block_size=16, causal=causal, backend=backend)


def _experts_op(sorted_ids=None, offsets=None, n_experts=3, backend="auto", device="cpu", quant=False):
    from kernswap.formats.experts import experts_to_args, quantize_experts

    h = torch.randn(4, 32)
    wgu, wd = torch.randn(n_experts, 64, 32), torch.randn(n_experts, 32, 32)
    args = experts_to_args(wgu, wd)
    if quant:
        args = experts_to_args(quantize_experts(wgu, "int8"), quantize_experts(wd, "int8"))
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    s = torch.tensor([0, 5, 1, 2, 6, 3, 4, 7], dtype=torch.int32) if sorted_ids is None else sorted_ids
    o = torch.tensor([0, 3, 5, 8], dtype=torch.int32) if offsets is None else offsets
    return Q.moe_experts(h, s, o, *args, 2, backend)


def _qe_edited():
    """ops.fused_moe with QuantizedExperts whose scale was sliced after construction."""
    from kernswap import ops
    from kernswap.formats.experts import quantize_experts

    qgu, qd = quantize_experts(torch.randn(3, 64, 32), "int8"), quantize_experts(torch.randn(3, 32, 32), "int8")
    qd.scale = qd.scale[:, :, :16]
    return ops.fused_moe(torch.randn(4, 32), torch.randn(4, 3), qgu, qd, 2)


def _set(name, fn):
    def edit(m):
        getattr(m, name).data = fn(getattr(m, name).data)
    return edit


ADVERSARIAL = [
    # the four segfaults of the issue
    ("op ql out_features past packed", lambda: _op_ql(_qw(), n=64), "torch.ops.kernswap.quantized_linear: packed"),
    ("wrapper ql out_features edited", lambda: _edited(out_features=64), "quantized_linear: qweight.packed must be"),
    ("op experts negative pair id", lambda: _experts_op(sorted_ids=torch.tensor([0, -5, 1, 2, 6, 3, 4, 7],
                                                                                dtype=torch.int32)),
     "sorted_pair_ids must be in [0, num_tokens * top_k = 8]"),
    ("op experts offsets past the end", lambda: _experts_op(offsets=torch.tensor([0, 3, 5, 40], dtype=torch.int32)),
     "expert_offsets must start at 0, not decrease, and end at most at len(sorted_pair_ids)=8"),
    ("op experts quantized offsets past the end", lambda: _experts_op(offsets=torch.tensor([0, 3, 5, 40],
                                                                                           dtype=torch.int32),
                                                                      quant=True), "expert_offsets must start at 0"),
    # stale weights: the next call follows the edit
    ("QuantLinear scale.data replaced", lambda: _ql_tamper(_set("scale", lambda d: d * 2)), "ok"),
    ("QuantLinear bias.data replaced", lambda: _ql_tamper(_set("bias", lambda d: d + 1)), "ok"),
    ("QuantLinear packed edited in place", lambda: _ql_tamper(lambda q: q.packed.mul_(-1)), "ok"),
    ("QuantLinear int4 zero.data replaced", lambda: _ql_tamper(_set("zero", lambda d: d.flip(0).clone()),
                                                               "int4-g64-asym"), "ok"),
    ("QuantLinear packed.data smaller", lambda: _ql_tamper(_set("packed", lambda d: d[:1].clone())),
     "QuantizedWeight.packed must be torch.int8 of shape [3, 2048]"),
    ("QuantLinear bias.data shorter", lambda: _ql_tamper(_set("bias", lambda d: d[:5].clone())),
     "bias must have shape [out_features=40], got [5]"),
    ("QuantLinear scale.data sliced", lambda: _ql_tamper(_set("scale", lambda d: d[:, :16].clone())),
     "QuantizedWeight.scale must be torch.float32 of shape [1, 48]"),
    ("QuantLinear out_features edited", lambda: _ql_tamper(lambda q: setattr(q, "out_features", 64)),
     "QuantizedWeight.packed must be"),
    ("FusedExperts gate_up_proj.data replaced", lambda: _fe_tamper(_set("gate_up_proj", lambda d: d * 2)), "ok"),
    ("FusedExperts down_proj edited in place", lambda: _fe_tamper(lambda f: f.down_proj.data.mul_(-1)), "ok"),
    ("FusedExperts quantized scale.data replaced", lambda: _fe_tamper(_set("down_scale", lambda d: d * 2), "int8"),
     "ok"),
    # the eager fast path raises as ops.fused_moe does
    ("FusedExperts hidden size edited", lambda: _fe_tamper(lambda f: setattr(f, "hidden_dim", 16), width=16),
     "fused_moe: w_gate_up must be [num_experts, 2 * intermediate_size, hidden_size=16]"),
    ("FusedExperts gate_up_proj.data wrong shape", lambda: _fe_tamper(_set("gate_up_proj", lambda d: d[:, :40])),
     "fused_moe: w_down must be [num_experts=4, hidden_size=32, intermediate_size=20]"),
    ("FusedExperts fewer experts in down_proj", lambda: _fe_tamper(_set("down_proj", lambda d: d[:2].clone())),
     "fused_moe: w_down must be [num_experts=4"),
    ("FusedExperts quantized intermediate size edited", lambda: _fe_tamper(
        lambda f: setattr(f, "intermediate_dim", 64), "int8"), "QuantizedExperts.packed must be"),
    ("FusedExperts expert id past the experts", lambda: _fe_ids(), "topk_ids must be in [0, num_experts=4)"),
    # a QuantizedWeight / QuantizedExperts edited after construction
    ("QuantizedWeight in_features edited", lambda: _edited(in_features=64), "qweight.packed must be"),
    ("QuantizedWeight scale sliced", lambda: _edited(scale=lambda q: q.scale[:, :8]), "qweight.scale must be"),
    ("QuantizedWeight bits edited", lambda: _edited(bits=8), "quantized_linear: qweight: int8 needs group_size"),
    ("QuantizedWeight group_size edited", lambda: _edited(group_size=32), "qweight.scale must be torch.float32 of "
                                                                          "shape [4, 32]"),
    ("QuantizedWeight group_size not dividing", lambda: _edited(group_size=48), "int4 needs group_size in"),
    ("QuantizedExperts scale sliced", _qe_edited, "fused_moe: w_down.scale must be"),
    # registered ops with inconsistent shapes
    ("op ql short scale", lambda: _op_ql(_qw(), scale=torch.ones(2, 16)), "scale must be torch.float32 of shape [2, 32]"),
    ("op ql short zero", lambda: _op_ql(_qw(), zero=torch.zeros(2, 16, dtype=torch.uint8)), "zero must be torch.uint8"),
    ("op ql short bias", lambda: _op_ql(_qw(), bias=torch.randn(20)), "bias must have shape [out_features=24]"),
    ("op ql x width", lambda: _op_ql(_qw(), x=torch.randn(3, 100)), "x2d.shape[-1] must equal in_features=128"),
    ("op attention mask smaller than grid", lambda: _attn(mask_shape=(1, 1, 1, 3)), "block_mask must have shape"),
    ("op attention mask wrong batch", lambda: _attn(mask_shape=(3, 1, 2, 3)), "block_mask must have shape (1 or 1,"),
    ("op attention k/v smaller head dim", lambda: _attn(k_shape=(1, 1, 40, 32)), "k must be (B=1, Hkv, Sk, D=64)"),
    ("op attention v fewer tokens", lambda: _attn(v_shape=(1, 1, 33, 64)), "k and v must have the same shape"),
    ("op attention k fewer tokens than causal q", lambda: _attn(k_shape=(1, 1, 10, 64), mask_shape=(1, 1, 2, 1)),
     "causal attention needs Sq <= Sk"),
    ("wrapper attention mask smaller than grid", lambda: _attn(mask_shape=(1, 1, 2, 2), op=False),
     "block_sparse_attention: block_mask must have shape"),
    ("op route correction_bias short", lambda: Q.moe_route(torch.randn(5, 8), 2, True, "sigmoid", "softmax_topk",
                                                           torch.zeros(3), "auto"),
     "correction_bias must have shape [num_experts=8], got [3]"),
    ("op experts offsets for more experts", lambda: _experts_op(offsets=torch.tensor([0, 3, 5, 8, 8, 8],
                                                                                     dtype=torch.int32)),
     "expert_offsets must have shape [num_experts + 1 = 4], got [6]"),
    ("op combine fewer rows", lambda: Q.moe_combine(torch.randn(7, 16), torch.rand(4, 2), "auto"),
     "pair_out must have num_tokens * top_k = 4 * 2 = 8 rows"),
    # meta mixed with CPU, unknown backends: raise, never the fake kernel's uninitialised CPU memory
    ("op ql meta weight", lambda: _op_ql(dataclasses.replace(_qw(), packed=_qw().packed.to("meta"))),
     "packed must be on the same device as x (cpu), got meta"),
    ("op ql meta x", lambda: _op_ql(_qw(), x=torch.randn(3, 128, device="meta")),
     "must be on the same device as x (meta), got cpu"),
    ("op ql bogus backend", lambda: _op_ql(_qw(), backend="bogus"), "backend must be one of"),
    ("op ql meta bogus backend", lambda: _op_ql(_qw(), x=torch.randn(3, 128, device="meta"), backend="bogus"),
     "torch.ops.kernswap.quantized_linear: "),
    ("op attention meta k/v", lambda: _attn(devices=("cpu", "meta")), "must be on one device"),
    ("op attention bogus backend", lambda: _attn(backend="bogus"), "backend must be one of"),
    ("op experts meta weights", lambda: _experts_op(device="meta"), "must be on the same device as the input (cpu)"),
    ("op experts bogus backend", lambda: _experts_op(backend="bogus"), "backend must be one of"),
    ("op combine meta weights", lambda: Q.moe_combine(torch.randn(8, 16), torch.rand(4, 2, device="meta"), "auto"),
     "must be on the same device as the input (cpu), got meta"),
    ("op align bogus backend", lambda: Q.moe_align(torch.zeros(3, 2, dtype=torch.int32), 4, None, "bogus"),
     "backend must be one of"),
    ("op route meta bias", lambda: Q.moe_route(torch.randn(5, 8), 2, True, "sigmoid", "softmax_topk",
                                               torch.zeros(8, device="meta"), "auto"), "same device"),
    ("wrapper ql bogus backend", lambda: _wrapper_ql(backend="bogus"), "quantized_linear: backend must be one of"),
    ("wrapper ql meta weight", lambda: _wrapper_ql(device="meta"), "qweight.packed must be on the same device as x"),
    ("wrapper ql unedited", lambda: _wrapper_ql(), "ok"),
]


def _wrapper_ql(backend="auto", device="cpu"):
    from kernswap import ops
    from test_fuzz import ql_check

    qw, x = _qw(), torch.randn(2, 128)
    out = ops.quantized_linear(x, qw.to(device), backend=backend)
    ql_check(out, x, qw, None)
    return "ok"


def _fe_ids():
    """FusedExperts' fast path with an expert id past its experts."""
    fe = _fe()
    with torch.no_grad():
        fe(torch.randn(2, 32), torch.tensor([[0, 9], [1, 2]]), torch.rand(2, 2))
    return "no error"
