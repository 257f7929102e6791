"""moe_combine: the weighted sum of each token's expert outputs, back in token order (fp32 accumulation).

    kernswap.ops.moe_combine(pair_out [T * top_k, H], topk_weights [T, top_k]) -> [T, H] in pair_out.dtype
      -> torch.ops.kernswap.moe_combine(...)   declared once here; cpu -> C++, else reference
"""
from typing import Union

import torch

from ..backend import Backend
from ..reference.moe import moe_combine_ref
from ._moe_common import FLOAT_DTYPES, check_backend, check_tensor, choose_piece, eager_fast_path, require

__all__ = ["moe_combine", "check_args"]

OP = "torch.ops.kernswap.moe_combine"


def check_args(fn: str, pair_out, topk_weights, backend) -> Backend:
    """The op's one checking function (wrapper: fn "moe_combine"; registered op and fake kernel: fn OP)."""
    check_tensor(fn, "pair_out", pair_out, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(fn, "topk_weights", topk_weights, dtypes=FLOAT_DTYPES, dim=2, device=pair_out.device)
    t, k = topk_weights.shape
    require(k > 0 and pair_out.shape[0] == t * k, ValueError,
            lambda: f"{fn}: pair_out must have num_tokens * top_k = {t} * {k} = {t * k} rows (top_k > 0), "
                    f"got {pair_out.shape[0]}")
    return check_backend(fn, backend)


def _run(pair_out, topk_weights, backend):
    _, mod = choose_piece("combine", pair_out.device.type, backend, pair_out=pair_out, topk_weights=topk_weights)
    if mod is None:
        return moe_combine_ref(pair_out, topk_weights)
    return mod.combine(pair_out, topk_weights)


@torch.library.custom_op("kernswap::moe_combine", mutates_args=())
def _moe_combine_op(pair_out: torch.Tensor, topk_weights: torch.Tensor, backend: str) -> torch.Tensor:
    check_args(OP, pair_out, topk_weights, backend)
    return _run(pair_out, topk_weights, backend)


@_moe_combine_op.register_fake
def _moe_combine_fake(pair_out, topk_weights, backend):
    check_args(OP, pair_out, topk_weights, backend)
    return pair_out.new_empty(topk_weights.shape[0], pair_out.shape[1])


def moe_combine(pair_out: torch.Tensor, topk_weights: torch.Tensor, *,
                backend: Union[str, Backend, None] = "auto") -> torch.Tensor:
    """out[t] = sum_slot topk_weights[t, slot] * pair_out[t * top_k + slot]."""
    req = check_args("moe_combine", pair_out, topk_weights, backend).value
    op = _run if eager_fast_path(pair_out, topk_weights) else torch.ops.kernswap.moe_combine
    return op(pair_out, topk_weights, req)
