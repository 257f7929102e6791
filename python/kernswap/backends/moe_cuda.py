"""CUDA C++ backend for the MoE alignment (kernswap._C_cuda.moe_align): count, scan and stable scatter of the
(token, slot) pairs by expert with block padding, three launches on the current stream, no host synchronisation.

The compiled module is torch-free; this file allocates the outputs and the workspace and passes data_ptr()
integers and the stream.  Same result as kernswap.backends.moe_triton.align (which the Triton experts read).
"""
from typing import Optional, Tuple

import torch

__all__ = ["available", "supports", "supports_align", "align", "MAX_EXPERTS", "MAX_BLOCK_SIZE"]

MAX_EXPERTS = 1024
MAX_BLOCK_SIZE = 4096
MAX_PAIRS = 1 << 30
_ID_DTYPES = (torch.int32, torch.int64)


def _module():
    from .. import _ext

    return _ext.get_C_cuda()


def available() -> Tuple[bool, str]:
    mod = _module()
    if mod is None:
        from .. import _ext

        return False, f"kernswap._C_cuda not built ({_ext.cuda_ext_reason()})"
    if not hasattr(mod, "moe_align"):
        return False, "kernswap._C_cuda has no 'moe_align' (stale build?)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def max_padded(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Length of the sorted array: min(P * bs, P + min(E, P) * (bs - 1)) (the C++ check uses the same bound)."""
    if num_pairs <= 0:
        return 0
    return min(num_pairs * block_size, num_pairs + min(num_experts, num_pairs) * (block_size - 1))


def supports_align(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int]) -> bool:
    """CUDA integer ids [T, top_k], 1 <= E <= 1024, block_size None or in [1, 4096], T * top_k <= 2**30."""
    if not isinstance(topk_ids, torch.Tensor) or not topk_ids.is_cuda or topk_ids.dtype not in _ID_DTYPES:
        return False
    if topk_ids.dim() != 2 or not 1 <= int(num_experts) <= MAX_EXPERTS:
        return False
    bs = 1 if block_size is None else int(block_size)
    if not 1 <= bs <= MAX_BLOCK_SIZE:
        return False
    p = topk_ids.numel()
    return p <= MAX_PAIRS and max_padded(p, int(num_experts), bs) < 2 ** 31


def supports(piece: str, **kw) -> bool:
    """Only the "align" piece (kernswap.ops._moe_common passes the piece's arguments by keyword)."""
    if piece == "align":
        return supports_align(kw["topk_ids"], kw["num_experts"], kw.get("block_size"))
    return False


def align(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int] = None, *,
          exact_length: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids int32, expert_offsets int32 [E + 1]); see moe_triton.align for the layout.
    Without block_size the array has exactly T * top_k entries; with it, offsets[E] entries (exact_length,
    one stream synchronisation) or max_padded(...) entries, the sentinel T * top_k after offsets[E].
    Ids outside [0, E) are left out."""
    mod = _module()
    if mod is None or not hasattr(mod, "moe_align"):
        raise RuntimeError(f"cuda backend unavailable: {available()[1]}")
    E = int(num_experts)
    bs = 1 if block_size is None else int(block_size)
    if not supports_align(topk_ids, E, block_size):
        raise ValueError(f"moe_cuda.align: unsupported arguments (topk_ids {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype} on {topk_ids.device}, num_experts={E}, block_size={block_size}); "
                         f"needs CUDA int ids [T, top_k], 1 <= num_experts <= {MAX_EXPERTS}, "
                         f"block_size in [1, {MAX_BLOCK_SIZE}]")
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    P = ids.numel()
    length = max_padded(P, E, bs)
    chunk = int(mod.MOE_ALIGN_CHUNK)
    ws_elems = -(-P // chunk) * E
    sorted_ids = torch.empty((length,), dtype=torch.int32, device=dev)
    offsets = torch.empty((E + 1,), dtype=torch.int32, device=dev)
    ws = torch.empty((max(ws_elems, 1),), dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        mod.moe_align(ids.data_ptr(), ids.numel(), P, E, bs, sorted_ids.data_ptr() if length else 0, length,
                      offsets.data_ptr(), offsets.numel(), ws.data_ptr(), ws_elems, stream)
    if block_size is not None and exact_length:
        sorted_ids = sorted_ids[:int(offsets[E])]
    return sorted_ids, offsets
