"""Pure-PyTorch mixture-of-experts: the fallback on every device and the test oracle. Written for clarity.

    route   -> (topk_weights fp32 [T, k], topk_ids int32 [T, k])
    align   -> (sorted_pair_ids int32 [T*k], expert_offsets int32 [E+1]); pair p = t * k + slot
    experts -> pair_out [T*k, H]: W_down[e] (silu(g) * u), [g; u] = W_gate_up[e] x_t  (fp32 arithmetic)
    combine -> out[t] = sum_slot w[t, slot] * pair_out[t * k + slot]  (fp32)
Quantized experts (kernswap.formats.QuantizedExperts) go through the quantized-linear reference of their
format, expert by expert, with the intermediate activation in fp32 (what the kernels do).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..formats.experts import QuantizedExperts
from .quantized_linear import reference_linear

__all__ = ["moe_route_ref", "moe_align_ref", "moe_experts_ref", "moe_combine_ref", "fused_experts_ref",
           "fused_moe_ref"]


def _topk(key: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, best first, ties broken by the lowest index (a stable descending sort;
    torch.topk leaves the order of ties unspecified)."""
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    return key.gather(-1, ids), ids


def moe_route_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool = True, scoring: str = "softmax",
                  order: str = "softmax_topk", correction_bias: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = router_logits.to(torch.float32)
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits)
        choose = scores if correction_bias is None else scores + correction_bias.to(torch.float32)
        ids = _topk(choose, top_k)[1]
        weights = scores.gather(-1, ids)
    elif order == "softmax_topk":
        weights, ids = _topk(torch.softmax(logits, dim=-1), top_k)
    else:  # "topk_softmax"
        top, ids = _topk(logits, top_k)
        weights = torch.softmax(top, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).to(torch.int64)
    p = flat.numel()
    order = torch.sort(flat, stable=True).indices  # pairs by expert, token order within an expert
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    if block_size is None:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return order.to(torch.int32), offsets.to(torch.int32)
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(padded, 0)
    out = torch.full((int(offsets[-1]),), p, dtype=torch.int32, device=flat.device)
    start = 0
    for e in range(num_experts):
        n = int(counts[e])
        out[int(offsets[e]):int(offsets[e]) + n] = order[start:start + n].to(torch.int32)
        start += n
    return out, offsets.to(torch.int32)


def _expert_mlp(x: torch.Tensor, w_gate_up, w_down, e: int) -> torch.Tensor:
    """fp32 [n, H] rows of expert e."""
    if isinstance(w_gate_up, QuantizedExperts):
        gu = reference_linear(x, w_gate_up.expert(e))
        inter = gu.shape[1] // 2
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        return reference_linear(act, w_down.expert(e))
    gu = x @ w_gate_up[e].to(torch.float32).t()
    inter = gu.shape[1] // 2
    act = F.silu(gu[:, :inter]) * gu[:, inter:]
    return act @ w_down[e].to(torch.float32).t()


def moe_experts_ref(hidden: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_offsets: torch.Tensor, w_gate_up,
                    w_down, top_k: int) -> torch.Tensor:
    """pair_out [T*top_k, H] in hidden.dtype (rows of pairs absent from sorted_pair_ids are 0)."""
    t, h = hidden.shape
    x = hidden.to(torch.float32)
    out = torch.zeros(t * top_k, h, dtype=torch.float32, device=hidden.device)
    offs = expert_offsets.tolist()
    for e in range(len(offs) - 1):
        pairs = sorted_pair_ids[offs[e]:offs[e + 1]].to(torch.int64)
        pairs = pairs[pairs < t * top_k]  # block padding sentinels
        if pairs.numel():
            out[pairs] = _expert_mlp(x[pairs // top_k], w_gate_up, w_down, e)
    return out.to(hidden.dtype)


def moe_combine_ref(pair_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    t, k = topk_weights.shape
    rows = pair_out.to(torch.float32).view(t, k, pair_out.shape[1])  # (-1 is ambiguous for 0 tokens)
    return (rows * topk_weights.to(torch.float32)[..., None]).sum(dim=1).to(pair_out.dtype)


def fused_experts_ref(hidden2d: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up,
                      w_down) -> torch.Tensor:
    """Experts + combine (the backends' ``fused_experts``): [T, H] in hidden2d.dtype, fp32 inside."""
    e = w_gate_up.num_experts if isinstance(w_gate_up, QuantizedExperts) else w_gate_up.shape[0]
    k = topk_ids.shape[1]
    sorted_ids, offsets = moe_align_ref(topk_ids, e)
    pair_out = moe_experts_ref(hidden2d.to(torch.float32), sorted_ids, offsets, w_gate_up, w_down, k)
    return moe_combine_ref(pair_out, topk_weights).to(hidden2d.dtype)


def fused_moe_ref(hidden2d: torch.Tensor, router_logits: torch.Tensor, w_gate_up, w_down, top_k: int,
                  renormalize: bool = True, scoring: str = "softmax", order: str = "softmax_topk",
                  correction_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    weights, ids = moe_route_ref(router_logits, top_k, renormalize, scoring, order, correction_bias)
    return fused_experts_ref(hidden2d, weights, ids, w_gate_up, w_down)
