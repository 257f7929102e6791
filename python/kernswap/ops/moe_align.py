"""moe_align: sort the (token, slot) pairs by expert, with per-expert offsets (dropless).

    kernswap.ops.moe_align(topk_ids, num_experts, block_size=None)
      -> torch.ops.kernswap.moe_align(...)   declared once here; cpu -> C++ counting sort, cuda -> "cuda", "triton"
Pair p = t * top_k + slot; expert e owns sorted_pair_ids[offsets[e]:offsets[e + 1]], in token order
(stable). With block_size (GPU kernels), each expert's segment is padded to a multiple of block_size with
the sentinel T * top_k, and the offsets refer to the padded array.
"""
from typing import Optional, Tuple, Union

import torch

from ..backend import Backend
from ..reference.moe import moe_align_ref
from ._moe_common import check_backend, check_int, check_tensor, choose_piece, eager_fast_path

__all__ = ["moe_align", "check_args", "check_ids"]

_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
OP = "torch.ops.kernswap.moe_align"


def check_args(fn: str, topk_ids, num_experts, block_size, backend) -> Backend:
    """The op's one checking function (wrapper: fn "moe_align"; registered op and fake kernel: fn OP)."""
    check_tensor(fn, "topk_ids", topk_ids, dtypes=_INT_DTYPES)
    if topk_ids.dim() != 2:
        raise ValueError(f"{fn}: topk_ids must be 2-D [num_tokens, top_k], got shape {list(topk_ids.shape)}")
    check_int(fn, "num_experts", num_experts, 1)
    if block_size is not None:
        check_int(fn, "block_size", block_size, 1)
    return check_backend(fn, backend)


def check_ids(fn: str, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Every id in [0, num_experts): reads the values (eager calls only; the fake kernel cannot)."""
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{fn}: topk_ids must be in [0, num_experts={num_experts}), got values in [{lo}, {hi}]")


def _run(topk_ids, num_experts, block_size, backend):
    _, mod = choose_piece("align", topk_ids.device.type, backend, topk_ids=topk_ids, num_experts=num_experts,
                          block_size=block_size)
    if mod is None:
        return moe_align_ref(topk_ids, num_experts, block_size)
    return mod.align(topk_ids, num_experts, block_size)


@torch.library.custom_op("kernswap::moe_align", mutates_args=())
def _moe_align_op(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int], backend: str
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    check_args(OP, topk_ids, num_experts, block_size, backend)
    check_ids(OP, topk_ids, num_experts)
    s, o = _run(topk_ids, num_experts, block_size, backend)
    return s, o


@_moe_align_op.register_fake
def _moe_align_fake(topk_ids, num_experts, block_size, backend):
    check_args(OP, topk_ids, num_experts, block_size, backend)
    if block_size is None:
        n = topk_ids.numel()
    else:
        n = torch.library.get_ctx().new_dynamic_size()
    return (topk_ids.new_empty(n, dtype=torch.int32), topk_ids.new_empty(num_experts + 1, dtype=torch.int32))


def moe_align(topk_ids: torch.Tensor, num_experts: int, *, block_size: Optional[int] = None,
              backend: Union[str, Backend, None] = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids int32, expert_offsets int32 [num_experts + 1]) for topk_ids [T, top_k] (any int dtype)."""
    fn = "moe_align"
    req = check_args(fn, topk_ids, num_experts, block_size, backend).value
    if not eager_fast_path(topk_ids):
        return torch.ops.kernswap.moe_align(topk_ids, num_experts, block_size, req)
    check_ids(fn, topk_ids, num_experts)
    return _run(topk_ids, num_experts, block_size, req)
