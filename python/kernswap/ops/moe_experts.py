"""moe_experts: the SwiGLU MLPs of the experts for every (token, slot) pair, grouped by expert.

    kernswap.ops.moe_experts(hidden, sorted_pair_ids, expert_offsets, w_gate_up, w_down, top_k)
      -> torch.ops.kernswap.moe_experts(...)   declared once here (schema + fake kernel)
           cpu -> C++ (fp32 GEMM for float weights, the quantized-linear engine for QuantizedExperts)
           cuda -> "cuda", "triton" when they have the piece; reference otherwise
For pair p of expert e (token t = p // top_k): pair_out[p] = w_down[e] @ (silu(g) * u), [g; u] = w_gate_up[e] @ x_t
(g: the first intermediate_size rows of w_gate_up[e], u: the last; the layout of transformers' experts).
"""
from typing import Optional, Union

import torch

from ..backend import Backend
from ..formats.experts import experts_from_args, experts_to_args
from ..reference.moe import moe_experts_ref
from ._moe_common import (FLOAT_DTYPES, check_backend, check_experts, check_int, check_tensor, choose_piece,
                          eager_fast_path, experts_of, require)

__all__ = ["moe_experts", "check_hidden", "check_args", "check_alignment"]

OP = "torch.ops.kernswap.moe_experts"


def check_hidden(fn: str, hidden: torch.Tensor) -> None:
    check_tensor(fn, "hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: hidden must be [..., hidden_size > 0], got shape {list(hidden.shape)}")


def check_args(fn: str, hidden, sorted_pair_ids, expert_offsets, w_gate_up, w_down, top_k, backend) -> Backend:
    """The op's one checking function (wrapper: fn "moe_experts", the registered op and its fake kernel: fn OP,
    with the weights rebuilt from the op's arguments): shapes, dtypes and devices. The alignment's values are
    checked_alignment's (eager calls)."""
    check_hidden(fn, hidden)
    if hidden.dim() != 2:
        raise ValueError(f"{fn}: hidden must be 2-D [num_tokens, hidden_size], got shape {list(hidden.shape)}")
    check_int(fn, "top_k", top_k, 1)
    e, _ = check_experts(fn, hidden.shape[1], w_gate_up, w_down, hidden.device)
    for name, x in (("sorted_pair_ids", sorted_pair_ids), ("expert_offsets", expert_offsets)):
        check_tensor(fn, name, x, dtypes=(torch.int32, torch.int64), dim=1, device=hidden.device)
    require(expert_offsets.shape[0] == e + 1, ValueError,
            lambda: f"{fn}: expert_offsets must have shape [num_experts + 1 = {e + 1}], "
                    f"got {list(expert_offsets.shape)}")
    return check_backend(fn, backend)


def check_alignment(fn: str, sorted_pair_ids, expert_offsets, num_pairs: int) -> None:
    """The values: offsets from 0, not decreasing, ending inside sorted_pair_ids; ids in [0, num_pairs] (the last
    value is the padding sentinel). Reads the tensors (eager calls only; the fake kernel cannot)."""
    offs = expert_offsets.to(torch.int64)
    if int(offs[0]) != 0 or bool((offs[1:] < offs[:-1]).any()) or int(offs[-1]) > sorted_pair_ids.shape[0]:
        raise ValueError(f"{fn}: expert_offsets must start at 0, not decrease, and end at most at "
                         f"len(sorted_pair_ids)={sorted_pair_ids.shape[0]}, got {offs.tolist()[:8]}...")
    if sorted_pair_ids.numel():
        lo, hi = int(sorted_pair_ids.min()), int(sorted_pair_ids.max())
        if lo < 0 or hi > num_pairs:
            raise ValueError(f"{fn}: sorted_pair_ids must be in [0, num_tokens * top_k = {num_pairs}] "
                             f"(the last value is the padding sentinel), got values in [{lo}, {hi}]")


def _run(hidden2d, sorted_pair_ids, expert_offsets, w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits,
         gu_group, d_group, symmetric, dynamic_act, top_k, backend):
    wgu, wd = experts_from_args((w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group,
                                 symmetric, dynamic_act), hidden2d.shape[1])
    _, mod = choose_piece("experts", hidden2d.device.type, backend, hidden2d=hidden2d, w_gate_up=wgu, w_down=wd)
    if mod is None:
        return moe_experts_ref(hidden2d, sorted_pair_ids, expert_offsets, wgu, wd, top_k)
    return mod.experts(hidden2d, sorted_pair_ids, expert_offsets, wgu, wd, top_k)


def _check_op(hidden2d, sorted_pair_ids, expert_offsets, args, top_k, backend) -> None:
    check_hidden(OP, hidden2d)
    if hidden2d.dim() != 2:
        raise ValueError(f"{OP}: hidden must be 2-D [num_tokens, hidden_size], got shape {list(hidden2d.shape)}")
    wgu, wd, _, _ = experts_of(OP, args, hidden2d.shape[1], hidden2d.device)
    check_args(OP, hidden2d, sorted_pair_ids, expert_offsets, wgu, wd, top_k, backend)


@torch.library.custom_op("kernswap::moe_experts", mutates_args=())
def _moe_experts_op(hidden2d: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_offsets: torch.Tensor,
                    w_gate_up: torch.Tensor, w_down: torch.Tensor, gu_scale: Optional[torch.Tensor],
                    gu_zero: Optional[torch.Tensor], d_scale: Optional[torch.Tensor], d_zero: Optional[torch.Tensor],
                    bits: int, gu_group: int, d_group: int, symmetric: bool, dynamic_act: bool, top_k: int,
                    backend: str) -> torch.Tensor:
    args = (w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group, symmetric, dynamic_act)
    _check_op(hidden2d, sorted_pair_ids, expert_offsets, args, top_k, backend)
    check_alignment(OP, sorted_pair_ids, expert_offsets, hidden2d.shape[0] * top_k)
    return _run(hidden2d, sorted_pair_ids, expert_offsets, *args, top_k, backend)


@_moe_experts_op.register_fake
def _moe_experts_fake(hidden2d, sorted_pair_ids, expert_offsets, w_gate_up, w_down, gu_scale, gu_zero, d_scale,
                      d_zero, bits, gu_group, d_group, symmetric, dynamic_act, top_k, backend):
    args = (w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group, symmetric, dynamic_act)
    _check_op(hidden2d, sorted_pair_ids, expert_offsets, args, top_k, backend)
    return hidden2d.new_empty(hidden2d.shape[0] * top_k, hidden2d.shape[1])


def moe_experts(hidden: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_offsets: torch.Tensor, w_gate_up,
                w_down, top_k: int, *, backend: Union[str, Backend, None] = "auto") -> torch.Tensor:
    """pair_out [T * top_k, H] in hidden.dtype for hidden [T, H] and the output of moe_align.

    w_gate_up [E, 2I, H], w_down [E, H, I]: fp32/bf16/fp16 tensors, or two kernswap.formats.QuantizedExperts
    of one format (int8, int4, W8A8, W4A8). Rows of pairs that no expert segment lists are 0.
    """
    fn = "moe_experts"
    req = check_args(fn, hidden, sorted_pair_ids, expert_offsets, w_gate_up, w_down, top_k, backend).value
    args = experts_to_args(w_gate_up, w_down)
    if not eager_fast_path(hidden):
        return torch.ops.kernswap.moe_experts(hidden, sorted_pair_ids, expert_offsets, *args, top_k, req)
    check_alignment(fn, sorted_pair_ids, expert_offsets, hidden.shape[0] * top_k)
    return _run(hidden, sorted_pair_ids, expert_offsets, *args, top_k, req)
