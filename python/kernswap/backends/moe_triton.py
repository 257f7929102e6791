"""Triton backend for the fused MoE ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``fused_experts`` = block alignment (``align``, torch ops, no host synchronisation) + the grouped SwiGLU
kernels of <repo>/kernels/fused_moe.py (gate_up with the silu(gate) * up epilogue, down times the routing
weight, combine).  Float weights in the activation dtype (fp32 / fp16 / bf16); transformers 5.x layout:
w_gate_up [E, 2I, H] (gate = rows [0, I), up = rows [I, 2I)), w_down [E, H, I].
"""
import contextlib
from typing import Optional, Tuple

import torch

from ._triton_common import interpret, kernel_module, triton_available

__all__ = ["available", "supports", "supports_align", "supports_fused_experts", "align", "fused_experts",
           "block_size_for"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)


def _kernel_module():
    return kernel_module('fused_moe')


def available() -> Tuple[bool, str]:
    """(True, "") when triton imports and a CUDA device (or TRITON_INTERPRET=1) is there, else (False, reason)."""
    return triton_available('fused_moe')
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    return True, ""


def _device_ok(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return True
    return interpret() and t.device.type == "cpu"


def supports_align(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int]) -> bool:
    """int32 / int64 ids [T, top_k] on a CUDA device (any device under TRITON_INTERPRET=1)."""
    return (isinstance(topk_ids, torch.Tensor) and topk_ids.dtype in _ID_DTYPES and topk_ids.dim() == 2
            and _device_ok(topk_ids) and int(num_experts) >= 1 and (block_size is None or int(block_size) >= 1))


def supports_format(quantized: bool) -> bool:
    """float experts only (quantized experts run on the cpu backend or the reference)"""
    return not quantized


def supports_fused_experts(hidden2d: torch.Tensor, topk_weights: Optional[torch.Tensor] = None,
                           topk_ids: Optional[torch.Tensor] = None, w_gate_up=None, w_down=None) -> bool:
    """Float (not quantized) weights in hidden2d's dtype (fp32 / fp16 / bf16) on its device; CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1 except bf16 (the interpreter's bf16 dot is wrong).  Shape checks are
    the op's; arguments left None are not looked at."""
    if not isinstance(hidden2d, torch.Tensor) or hidden2d.dtype not in _DTYPES or hidden2d.dim() != 2:
        return False
    if not _device_ok(hidden2d) or (not hidden2d.is_cuda and hidden2d.dtype == torch.bfloat16):
        return False
    for w in (w_gate_up, w_down):
        if w is None:
            continue
        if not supports_format(not isinstance(w, torch.Tensor)):
            return False
        if w.dtype != hidden2d.dtype or w.device != hidden2d.device or w.dim() != 3:
            return False
    if topk_ids is not None and (topk_ids.dtype not in _ID_DTYPES or topk_ids.device != hidden2d.device):
        return False
    if topk_weights is not None and (not topk_weights.is_floating_point() or topk_weights.device != hidden2d.device):
        return False
    return True


def supports(piece: str, **kw) -> bool:
    """Whether this backend runs `piece` ("align" or "fused_experts") for these keyword arguments (the
    piece's own argument names, as kernswap.ops._moe_common passes them)."""
    if piece == "align":
        return supports_align(kw["topk_ids"], kw["num_experts"], kw.get("block_size"))
    if piece == "fused_experts":
        return supports_fused_experts(kw["hidden2d"], kw.get("topk_weights"), kw.get("topk_ids"),
                                      kw.get("w_gate_up"), kw.get("w_down"))
    return False


def align(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int] = None, *,
          exact_length: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sort pairs p = t * top_k + slot by expert (stable), padding each expert's segment to a multiple of
    block_size with the sentinel P = T * top_k.

    Returns (sorted_pair_ids int32, expert_offsets int32 [E + 1]); expert e owns
    sorted_pair_ids[offsets[e]:offsets[e + 1]].  Without block_size the array has exactly P entries.  With it
    and exact_length, offsets[E] entries (the reference's layout; reading offsets[E] synchronises a GPU
    stream); with exact_length=False, max_padded_pairs(P, E, block_size) entries (an upper bound known
    without a synchronisation), the sentinel from offsets[E] on -- what fused_experts uses.  Ids outside
    [0, E) belong to no expert and are left out (like transformers' "expert index == num_experts" masking).
    """
    E = int(num_experts)
    bm = 1 if block_size is None else int(block_size)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    P = ids.numel()
    ids = torch.where((ids >= 0) & (ids < E), ids, E)  # bucket E = no expert
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts[:E] + bm - 1) // bm * bm
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    torch.cumsum(padded, 0, out=offsets[1:])
    unpadded_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(ids, stable=True).indices
    sorted_e = ids[order]
    rank = torch.arange(P, device=dev) - unpadded_start[sorted_e]
    if block_size is None:
        length = P
    else:
        length = _kernel_module().max_padded_pairs(P, E, bm)
    # pairs without an expert go to one extra trailing slot, cut off below
    dest = torch.where(sorted_e < E, offsets[sorted_e] + rank, length)
    out = torch.full((length + 1,), P, dtype=torch.int32, device=dev)
    out.scatter_(0, dest, order.to(torch.int32))
    offsets = offsets.to(torch.int32)
    if block_size is not None and exact_length:
        length = int(offsets[E])
    return out[:length], offsets


def block_size_for(num_pairs: int, num_experts: int, dtype: torch.dtype) -> int:
    """The row block (= alignment block) fused_experts uses for this many pairs."""
    return _kernel_module().pick_config(num_pairs, num_experts, dtype == torch.float32).block_m


def fused_experts(hidden2d: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor, config=None) -> torch.Tensor:
    """out [T, H] = sum_slot topk_weights[t, slot] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, slot].

    Inputs are validated by the op (shapes, dtypes, E / I consistent).  config: a kernels.fused_moe
    MoEKernelConfig to force tiles (tests); default from the table by pairs per expert.
    """
    mod = _kernel_module()
    T, H = hidden2d.shape
    E = w_gate_up.shape[0]
    top_k = topk_ids.shape[1]
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    if w_gate_up.stride(-1) != 1:
        w_gate_up = w_gate_up.contiguous()
    if w_down.stride(-1) != 1:
        w_down = w_down.contiguous()
    topk_weights = topk_weights.to(torch.float32).contiguous()
    topk_ids = topk_ids.to(torch.int32).contiguous()
    cfg = config or mod.pick_config(T * top_k, E, hidden2d.dtype == torch.float32)
    dev = hidden2d.device
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        sorted_ids, offsets = align(topk_ids, E, cfg.block_m, exact_length=False)
        return mod.launch_fused_experts(hidden2d, topk_weights, topk_ids, sorted_ids, offsets, w_gate_up, w_down,
                                        cfg)
