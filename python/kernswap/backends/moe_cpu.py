"""CPU backend of the fused-MoE ops: the compiled kernswap._C (routing, alignment, experts, combine in C++).

Backend interface (see kernswap.ops.fused_moe): ``available()``, ``supports(piece, **kw)``, and the pieces
``route``, ``align``, ``fused_experts`` (experts + combine), plus ``experts`` (pair outputs) and ``combine``.
Arguments arrive validated by kernswap.ops; here we only make the pointers safe to pass.
"""
from typing import Optional, Tuple

import torch

from .. import _ext
from . import cpu
from .cpu import DTYPE_CODES, extent
from ..formats.experts import QuantizedExperts

__all__ = ["available", "supports", "route", "align", "fused_experts", "experts", "combine", "prepare"]

SCORING_CODES = {("softmax", "softmax_topk"): 0, ("softmax", "topk_softmax"): 1, ("sigmoid", "softmax_topk"): 2,
                 ("sigmoid", "topk_softmax"): 2}
_NO_Q = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False)


def available() -> Tuple[bool, str]:
    """(True, "") when kernswap._C is importable and has moe_experts_combine, else (False, reason)."""
    return cpu.available('moe_experts_combine')


def _cpu(*ts) -> bool:
    return all(t is None or t.device.type == "cpu" for t in ts)


def _weights_ok(w_gate_up, w_down) -> bool:
    if isinstance(w_gate_up, QuantizedExperts):
        return isinstance(w_down, QuantizedExperts) and _cpu(w_gate_up.packed, w_down.packed) \
            and w_gate_up.bits in (4, 8)
    return (isinstance(w_gate_up, torch.Tensor) and isinstance(w_down, torch.Tensor) and _cpu(w_gate_up, w_down)
            and w_gate_up.dtype in DTYPE_CODES and w_down.dtype == w_gate_up.dtype)


def supports(piece: str, **kw) -> bool:
    """Every piece on CPU tensors of fp32/bf16/fp16 (experts float or quantized int8/int4); no block padding."""
    if piece == "route":
        return _cpu(kw.get("router_logits"), kw.get("correction_bias"))
    if piece == "align":
        return _cpu(kw.get("topk_ids")) and kw.get("block_size") is None
    if piece in ("fused_experts", "experts"):
        h = kw.get("hidden2d")
        return h is not None and _cpu(h) and h.dtype in DTYPE_CODES and _weights_ok(kw.get("w_gate_up"),
                                                                                    kw.get("w_down"))
    if piece == "combine":
        return _cpu(kw.get("pair_out"), kw.get("topk_weights")) and kw.get("pair_out").dtype in DTYPE_CODES
    return False


def _threads() -> int:
    return torch.get_num_threads()


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str, order: str,
          correction_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = router_logits.to(torch.float32)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32)
    ids = torch.empty(t, top_k, dtype=torch.int32)
    if t:
        bias = None if correction_bias is None else correction_bias.to(torch.float32).contiguous()
        _ext.get_C().moe_route(logits.data_ptr(), extent(logits), t, e, logits.stride(0), top_k,
                               SCORING_CODES[(scoring, order)], bool(renormalize),
                               0 if bias is None else bias.data_ptr(), extent(bias), weights.data_ptr(),
                               weights.numel(), ids.data_ptr(), ids.numel(), _threads())
    return weights, ids


def align(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int] = None
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = topk_ids.to(torch.int32).contiguous()
    p = ids.numel()
    sorted_ids = torch.empty(p, dtype=torch.int32)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32)
    bad = _ext.get_C().moe_align(ids.data_ptr(), p, p, num_experts, sorted_ids.data_ptr(), p, offsets.data_ptr(),
                                 num_experts + 1)
    if bad:
        raise ValueError(f"moe_align: topk_ids must be in [0, num_experts={num_experts}), got {bad} value(s) "
                         f"outside")
    return sorted_ids, offsets


def _weight_args(w_gate_up, w_down):
    """(keep-alive tensors, (w_gate_up_ptr, its numel), (w_down_ptr, its numel), w_dtype, q_gate_up, q_down,
    inter_size)."""
    if isinstance(w_gate_up, QuantizedExperts):
        def q(w: QuantizedExperts):
            p, s, z = w.packed.contiguous(), w.scale.to(torch.float32).contiguous(), w.zero
            z = None if z is None else z.contiguous()
            return (p, s, z), (p.data_ptr(), extent(p), p.stride(0) * p.element_size(), s.data_ptr(), extent(s),
                               s.stride(0), 0 if z is None else z.data_ptr(), extent(z),
                               0 if z is None else z.stride(0), int(w.bits), int(w.group_size),
                               bool(w.dynamic_activations))
        kg, qg = q(w_gate_up)
        kd, qd = q(w_down)
        return kg + kd, (0, 0), (0, 0), 0, qg, qd, w_down.in_features
    gu, d = w_gate_up.contiguous(), w_down.contiguous()
    return ((gu, d), (gu.data_ptr(), extent(gu)), (d.data_ptr(), extent(d)), DTYPE_CODES[gu.dtype], _NO_Q, _NO_Q,
            d.shape[2])


def _x(hidden2d: torch.Tensor) -> torch.Tensor:
    return hidden2d if hidden2d.shape[1] <= 1 or hidden2d.stride(1) == 1 else hidden2d.contiguous()


def prepare(w_gate_up, w_down):
    """A runner ``run(hidden2d, topk_weights, topk_ids) -> out2d`` for one layer's experts: the weight-side
    pointers and conversions are done once here (FusedExperts keeps the runner). Ids outside [0, E) raise
    ValueError (the C++ alignment counts them). The runner holds references to the tensors it points into."""
    keep, wgu, wd, wdt, qg, qd, inter = _weight_args(w_gate_up, w_down)
    e = w_gate_up.num_experts if isinstance(w_gate_up, QuantizedExperts) else w_gate_up.shape[0]
    wargs = (*wgu, *wd, wdt, qg, qd)  # the weight side of every call, with the buffers' element counts
    experts_combine = _ext.get_C().moe_experts_combine

    def run(hidden2d: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        x = _x(hidden2d)
        t, h = x.shape
        out = torch.empty(t, h, dtype=x.dtype)
        if t == 0:
            return out
        k = topk_ids.shape[1]
        sorted_ids, offsets = align(topk_ids, e)  # (fresh buffers of t * k and e + 1 elements)
        w = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.to(torch.float32)
        w = w.contiguous()
        code = DTYPE_CODES[x.dtype]
        experts_combine(x.data_ptr(), extent(x), code, t, h, inter, e, k,
                        x.stride(0), sorted_ids.data_ptr(), t * k, offsets.data_ptr(), e + 1, *wargs, w.data_ptr(),
                        w.numel(), out.data_ptr(), t * h, code, h, _threads())
        return out

    run.keep = keep
    return run


def fused_experts(hidden2d: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up,
                  w_down) -> torch.Tensor:
    """[T, H] in hidden2d.dtype: alignment, then experts and combine in one C++ call."""
    return prepare(w_gate_up, w_down)(hidden2d, topk_weights, topk_ids)


def experts(hidden2d: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_offsets: torch.Tensor, w_gate_up,
            w_down, top_k: int) -> torch.Tensor:
    """pair_out [T*top_k, H] in hidden2d.dtype (rows of pairs not in sorted_pair_ids are 0)."""
    x = _x(hidden2d)
    t, h = x.shape
    p = t * top_k
    keep, wgu, wd, wdt, qg, qd, inter = _weight_args(w_gate_up, w_down)
    e = expert_offsets.numel() - 1
    sorted_ids = sorted_pair_ids.to(torch.int32).contiguous()
    offsets = expert_offsets.to(torch.int32).contiguous()
    if sorted_ids.numel() and int(offsets[-1]) and int(sorted_ids[:int(offsets[-1])].max()) >= p:
        sorted_ids, offsets = _unpad(sorted_ids, offsets, p)
    rows = int(offsets[-1])
    sorted_out = torch.empty(max(rows, 1), h, dtype=torch.float32)
    if t and rows:
        _ext.get_C().moe_experts(x.data_ptr(), extent(x), DTYPE_CODES[x.dtype], t, h, inter, e, top_k, x.stride(0),
                                 sorted_ids.data_ptr(), sorted_ids.numel(), offsets.data_ptr(), offsets.numel(),
                                 *wgu, *wd, wdt, qg, qd, sorted_out.data_ptr(), sorted_out.numel(), _threads())
    del keep
    pair_out = torch.zeros(p, h, dtype=x.dtype)
    if rows:
        pair_out.index_copy_(0, sorted_ids[:rows].to(torch.int64), sorted_out[:rows].to(x.dtype))
    return pair_out


def _unpad(sorted_ids: torch.Tensor, offsets: torch.Tensor, p: int):
    """Drop block-padding sentinels (>= p) from an aligned array; offsets recomputed."""
    seg = torch.repeat_interleave(torch.arange(offsets.numel() - 1), (offsets[1:] - offsets[:-1]).to(torch.int64))
    keep = sorted_ids[:seg.numel()] < p
    counts = torch.bincount(seg[keep], minlength=offsets.numel() - 1)
    new_off = torch.zeros_like(offsets)
    new_off[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return sorted_ids[:seg.numel()][keep].contiguous(), new_off


def combine(pair_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    t, k = topk_weights.shape
    rows = pair_out.to(torch.float32).contiguous()
    h = rows.shape[1]
    out = torch.empty(t, h, dtype=pair_out.dtype)
    if t and h:
        w = topk_weights.to(torch.float32).contiguous()
        _ext.get_C().moe_combine(rows.data_ptr(), rows.numel(), h, 0, 0, w.data_ptr(), w.numel(), t, k, h,
                                 out.data_ptr(), out.numel(), DTYPE_CODES[pair_out.dtype], h, _threads())
    return out
