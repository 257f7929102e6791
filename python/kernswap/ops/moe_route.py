"""moe_route: top-k expert choice per token from router logits (the first step of a mixture-of-experts layer).

    kernswap.ops.moe_route(router_logits, top_k, ...)  checks inputs, flattens to [T, E]
      -> torch.ops.kernswap.moe_route(...)              declared once here (schema + fake kernel)
           backend table (ops/_moe_common.py): cpu -> "cpu" (C++), cuda -> "cuda", "triton"; else reference
"""
from typing import Optional, Tuple, Union

import torch

from ..backend import Backend
from ..reference.moe import moe_route_ref
from ._moe_common import FLOAT_DTYPES, check_backend, check_int, check_tensor, choose_piece, eager_fast_path

__all__ = ["moe_route", "SCORINGS", "ORDERS", "check_args", "check_route_args"]

OP = "torch.ops.kernswap.moe_route"

SCORINGS = ("softmax", "sigmoid")
ORDERS = ("softmax_topk", "topk_softmax")


def _run(router_logits, top_k, renormalize, scoring, order, correction_bias, backend):
    _, mod = choose_piece("route", router_logits.device.type, backend, router_logits=router_logits, top_k=top_k,
                          scoring=scoring, order=order, correction_bias=correction_bias)
    if mod is None:
        return moe_route_ref(router_logits, top_k, renormalize, scoring, order, correction_bias)
    return mod.route(router_logits, top_k, renormalize, scoring, order, correction_bias)


def check_args(fn, router_logits, top_k, renormalize, scoring, order, correction_bias, backend) -> Backend:
    """The op's one checking function, on its 2-D logits: the wrapper (fn "moe_route", after flattening), the
    registered op and its fake kernel (fn OP: torch.compile, opcheck and users call it directly)."""
    check_tensor(fn, "router_logits", router_logits, dtypes=FLOAT_DTYPES, dim=2)
    if router_logits.shape[1] == 0:
        raise ValueError(f"{fn}: router_logits must be [tokens, num_experts > 0], got {list(router_logits.shape)}")
    check_route_args(fn, router_logits.shape[1], top_k, renormalize, scoring, order, correction_bias,
                     router_logits.device)
    return check_backend(fn, backend)


@torch.library.custom_op("kernswap::moe_route", mutates_args=())
def _moe_route_op(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str, order: str,
                  correction_bias: Optional[torch.Tensor], backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    check_args(OP, router_logits, top_k, renormalize, scoring, order, correction_bias, backend)
    w, ids = _run(router_logits, top_k, renormalize, scoring, order, correction_bias, backend)
    return w, ids


@_moe_route_op.register_fake
def _moe_route_fake(router_logits, top_k, renormalize, scoring, order, correction_bias, backend):
    check_args(OP, router_logits, top_k, renormalize, scoring, order, correction_bias, backend)
    t = router_logits.shape[0]
    return (router_logits.new_empty(t, top_k, dtype=torch.float32),
            router_logits.new_empty(t, top_k, dtype=torch.int32))


def check_route_args(fn: str, num_experts: int, top_k, renormalize, scoring, order, correction_bias, device):
    check_int(fn, "top_k", top_k, 1, num_experts)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{fn}: renormalize must be a bool, got {type(renormalize).__name__} {renormalize!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"{fn}: scoring must be one of {list(SCORINGS)}, got {scoring!r}")
    if order not in ORDERS:
        raise ValueError(f"{fn}: order must be one of {list(ORDERS)}, got {order!r}")
    if correction_bias is not None:
        if scoring != "sigmoid":
            raise ValueError(f"{fn}: correction_bias is only used with scoring='sigmoid', got scoring={scoring!r}")
        check_tensor(fn, "correction_bias", correction_bias, dtypes=FLOAT_DTYPES, dim=1, device=device)
        if correction_bias.shape[0] != num_experts:
            raise ValueError(f"{fn}: correction_bias must have shape [num_experts={num_experts}], "
                             f"got {list(correction_bias.shape)}")


def moe_route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax",
              order: str = "softmax_topk", correction_bias: Optional[torch.Tensor] = None,
              backend: Union[str, Backend, None] = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: returns (topk_weights fp32 [..., top_k], topk_ids int32 [..., top_k]).

    router_logits: [..., E] fp32/bf16/fp16. scoring "softmax": order "softmax_topk" (softmax over all experts,
    then top-k: Mixtral, Qwen-MoE, OLMoE) or "topk_softmax" (top-k logits, softmax over those k).
    scoring "sigmoid": scores = sigmoid(logits), chosen by scores + correction_bias (the bias only chooses),
    weights = the chosen unbiased scores. renormalize: weights /= their sum. Ties: lowest expert id first.
    """
    fn = "moe_route"
    check_tensor(fn, "router_logits", router_logits, dtypes=FLOAT_DTYPES)
    if router_logits.dim() == 0 or router_logits.shape[-1] == 0:
        raise ValueError(f"moe_route: router_logits must be [..., num_experts > 0], got shape "
                         f"{list(router_logits.shape)}")
    e = router_logits.shape[-1]
    lead = router_logits.shape[:-1]
    logits2d = router_logits.reshape(-1, e)
    req = check_args(fn, logits2d, top_k, renormalize, scoring, order, correction_bias, backend).value
    op = _run if eager_fast_path(logits2d, correction_bias) else torch.ops.kernswap.moe_route
    w, ids = op(logits2d, top_k, renormalize, scoring, order, correction_bias, req)
    return w.reshape(*lead, top_k), ids.reshape(*lead, top_k)
