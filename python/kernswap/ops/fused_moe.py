"""fused_moe: a whole mixture-of-experts layer (route, align, experts, combine) in one op.

    kernswap.ops.fused_moe(hidden, router_logits, w_gate_up, w_down, top_k, ...)  checks inputs, flattens
      -> torch.ops.kernswap.fused_moe(...)   declared once here (schema + fake kernel)
           route:         backend "route" piece (cpu: C++), else the reference
           experts+combine: backend "fused_experts" piece (cpu: one C++ call that threads over (expert, panel)
                          tasks; cuda: "cuda", "triton"), else the reference
Backend table and interface: ops/_moe_common.py. The pieces are public ops of their own (moe_route,
moe_align, moe_experts, moe_combine).
"""
from typing import Optional, Union

import torch

from ..backend import Backend
from ..formats.experts import experts_from_args, experts_to_args
from ..reference.moe import fused_experts_ref, moe_route_ref
from ._moe_common import (FLOAT_DTYPES, check_backend, check_experts, check_int, check_tensor, choose_piece,
                          eager_fast_path, experts_of, require)
from .moe_align import check_ids
from .moe_experts import check_hidden
from .moe_route import check_route_args

__all__ = ["fused_moe", "check_args", "check_routed"]

OP = "torch.ops.kernswap.fused_moe"
_ID_DTYPES = (torch.int32, torch.int64)


def check_routed(fn: str, num_tokens, top_k, topk_weights, topk_ids, device) -> None:
    """Pre-routed calls (transformers' experts interface): topk_weights (float) and topk_ids (int32/int64), both
    [num_tokens, top_k] on the input's device. Also FusedExperts' eager fast path's per-call check."""
    if (type(topk_weights) is torch.Tensor and type(topk_ids) is torch.Tensor and topk_weights.dtype in FLOAT_DTYPES
            and topk_ids.dtype in _ID_DTYPES and topk_ids.shape == topk_weights.shape == (num_tokens, top_k)
            and topk_weights.device == device and topk_ids.device == device):
        return  # plain eager tensors that pass (half the cost of the checks below, which say what is wrong)
    check_tensor(fn, "topk_weights", topk_weights, dtypes=FLOAT_DTYPES, device=device)
    check_tensor(fn, "topk_ids", topk_ids, dtypes=_ID_DTYPES, device=device)
    require(topk_ids.dim() == 2 and topk_ids.shape[0] == num_tokens and topk_ids.shape[1] == top_k
            and topk_weights.shape == topk_ids.shape, ValueError,
            lambda: f"{fn}: topk_weights and topk_ids must both be [num_tokens={num_tokens}, top_k={top_k}], "
                    f"got {list(topk_weights.shape)} and {list(topk_ids.shape)}")


def check_args(fn: str, hidden2d, router_logits, topk_weights, topk_ids, w_gate_up, w_down, top_k, renormalize,
               scoring, order, correction_bias, backend) -> Backend:
    """The op's one checking function, on 2-D hidden states: the wrapper (fn "fused_moe", after flattening), the
    registered op and its fake kernel (fn OP, weights rebuilt from the op's arguments). Expert ids are checked
    by check_ids (eager calls: it reads them)."""
    check_hidden(fn, hidden2d)
    if hidden2d.dim() != 2:
        raise ValueError(f"{fn}: hidden must be 2-D [num_tokens, hidden_size], got shape {list(hidden2d.shape)}")
    t, h = hidden2d.shape
    dev = hidden2d.device
    e, _ = check_experts(fn, h, w_gate_up, w_down, dev)
    if router_logits is not None:
        if topk_weights is not None or topk_ids is not None:
            raise ValueError(f"{fn}: give either router_logits or (topk_weights, topk_ids), not both")
        check_tensor(fn, "router_logits", router_logits, dtypes=FLOAT_DTYPES, device=dev)
        require(router_logits.dim() == 2 and router_logits.shape[0] == t and router_logits.shape[1] == e,
                ValueError, lambda: f"{fn}: router_logits must be [..., num_experts={e}] with the leading size of "
                                    f"hidden ({t} tokens), got shape {list(router_logits.shape)}")
        check_route_args(fn, e, top_k, renormalize, scoring, order, correction_bias, dev)
    else:
        if topk_weights is None or topk_ids is None:
            raise ValueError(f"{fn}: router_logits is None, so topk_weights and topk_ids must both be given")
        check_int(fn, "top_k", top_k, 1, e)
        check_routed(fn, t, top_k, topk_weights, topk_ids, dev)
    return check_backend(fn, backend)


def _run(hidden2d, router_logits, topk_weights, topk_ids, w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero,
         bits, gu_group, d_group, symmetric, dynamic_act, top_k, renormalize, scoring, order, correction_bias,
         backend):
    dev = hidden2d.device.type
    if router_logits is not None:
        _, mod = choose_piece("route", dev, backend, router_logits=router_logits, top_k=top_k, scoring=scoring,
                              order=order, correction_bias=correction_bias)
        route = mod.route if mod is not None else moe_route_ref
        topk_weights, topk_ids = route(router_logits, top_k, renormalize, scoring, order, correction_bias)
    wgu, wd = experts_from_args((w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group,
                                 symmetric, dynamic_act), hidden2d.shape[1])
    _, mod = choose_piece("fused_experts", dev, backend, hidden2d=hidden2d, topk_weights=topk_weights,
                          topk_ids=topk_ids, w_gate_up=wgu, w_down=wd)
    if mod is None:
        return fused_experts_ref(hidden2d, topk_weights, topk_ids, wgu, wd)
    return mod.fused_experts(hidden2d, topk_weights, topk_ids, wgu, wd)


def _check_op(hidden2d, router_logits, topk_weights, topk_ids, args, top_k, renormalize, scoring, order,
              correction_bias, backend) -> int:
    check_hidden(OP, hidden2d)
    if hidden2d.dim() != 2:
        raise ValueError(f"{OP}: hidden must be 2-D [num_tokens, hidden_size], got shape {list(hidden2d.shape)}")
    wgu, wd, e, _ = experts_of(OP, args, hidden2d.shape[1], hidden2d.device)
    check_args(OP, hidden2d, router_logits, topk_weights, topk_ids, wgu, wd, top_k, renormalize, scoring, order,
               correction_bias, backend)
    return e


@torch.library.custom_op("kernswap::fused_moe", mutates_args=())
def _fused_moe_op(hidden2d: torch.Tensor, router_logits: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                  topk_ids: Optional[torch.Tensor], w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  gu_scale: Optional[torch.Tensor], gu_zero: Optional[torch.Tensor], d_scale: Optional[torch.Tensor],
                  d_zero: Optional[torch.Tensor], bits: int, gu_group: int, d_group: int, symmetric: bool,
                  dynamic_act: bool, top_k: int, renormalize: bool, scoring: str, order: str,
                  correction_bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    args = (w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group, symmetric, dynamic_act)
    e = _check_op(hidden2d, router_logits, topk_weights, topk_ids, args, top_k, renormalize, scoring, order,
                  correction_bias, backend)
    if topk_ids is not None:
        check_ids(OP, topk_ids, e)
    return _run(hidden2d, router_logits, topk_weights, topk_ids, *args, top_k, renormalize, scoring, order,
                correction_bias, backend)


@_fused_moe_op.register_fake
def _fused_moe_fake(hidden2d, router_logits, topk_weights, topk_ids, w_gate_up, w_down, gu_scale, gu_zero, d_scale,
                    d_zero, bits, gu_group, d_group, symmetric, dynamic_act, top_k, renormalize, scoring, order,
                    correction_bias, backend):
    args = (w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group, symmetric, dynamic_act)
    _check_op(hidden2d, router_logits, topk_weights, topk_ids, args, top_k, renormalize, scoring, order,
              correction_bias, backend)
    return torch.empty_like(hidden2d)


def _rows(x, t: int, k: int):
    """[..., k] routing tensors with t * k elements as [t, k] (anything else as given: check_routed says why)."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] == k and x.numel() == t * k:
        return x.reshape(t, k)
    return x


def fused_moe(hidden: torch.Tensor, router_logits: Optional[torch.Tensor], w_gate_up, w_down, top_k: int, *,
              renormalize: bool = True, scoring: str = "softmax", order: str = "softmax_topk",
              correction_bias: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
              topk_ids: Optional[torch.Tensor] = None, backend: Union[str, Backend, None] = "auto") -> torch.Tensor:
    """A mixture-of-experts layer: [..., H] -> [..., H] (same shape and dtype as hidden).

    router_logits [..., E]: routed with :func:`kernswap.ops.moe_route` semantics (renormalize, scoring, order,
    correction_bias). Or pass router_logits=None with the routing already done: topk_weights [T, top_k] and
    topk_ids [T, top_k] (any int dtype; T = hidden's leading elements) -- transformers' experts interface.
    w_gate_up [E, 2I, H], w_down [E, H, I]: fp32/bf16/fp16 tensors, or two kernswap.formats.QuantizedExperts
    of one format (int8, int4, W8A8, W4A8). Dropless: every token reaches its top_k experts.
    backend: "auto" | "cpu" | "cuda" | "triton" | "reference".
    """
    fn = "fused_moe"
    check_hidden(fn, hidden)
    h = hidden.shape[-1]
    e, _ = check_experts(fn, h, w_gate_up, w_down, hidden.device)
    hidden2d = hidden.reshape(-1, h)
    t = hidden2d.shape[0]
    if router_logits is not None:  # [..., E] with hidden's leading size -> [T, E]
        check_tensor(fn, "router_logits", router_logits, dtypes=FLOAT_DTYPES, device=hidden.device)
        if router_logits.shape[-1:] != (e,) or router_logits.numel() != t * e:
            raise ValueError(f"{fn}: router_logits must be [..., num_experts={e}] with the leading size of "
                             f"hidden ({t} tokens), got shape {list(router_logits.shape)}")
        router_logits = router_logits.reshape(t, e)
    topk_weights, topk_ids = _rows(topk_weights, t, top_k), _rows(topk_ids, t, top_k)
    req = check_args(fn, hidden2d, router_logits, topk_weights, topk_ids, w_gate_up, w_down, top_k, renormalize,
                     scoring, order, correction_bias, backend).value
    args = experts_to_args(w_gate_up, w_down)
    if eager_fast_path(hidden2d, router_logits, topk_weights, args[0], args[1], correction_bias):
        if topk_ids is not None:
            check_ids(fn, topk_ids, e)
        out = _run(hidden2d, router_logits, topk_weights, topk_ids, *args, top_k, renormalize, scoring, order,
                   correction_bias, req)
    else:
        out = torch.ops.kernswap.fused_moe(hidden2d, router_logits, topk_weights, topk_ids, *args, top_k,
                                           renormalize, scoring, order, correction_bias, req)
    return out.reshape(hidden.shape)
