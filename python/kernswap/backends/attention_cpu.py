"""CPU backend of block_sparse_attention: kernswap._C.block_sparse_attention (AVX-512 / AVX2 / scalar picked at
run time). FlashAttention-style tiles over the kept key blocks only; decode (few query rows) splits the key
blocks of each head across threads."""
import math
from typing import Tuple

import torch

from .. import _ext
from . import cpu
from .cpu import DTYPE_CODES, extent

__all__ = ["available", "supports", "block_sparse_attention", "DTYPE_CODES", "HEAD_DIMS"]

HEAD_DIMS = (64, 128, 256)


def available() -> Tuple[bool, str]:
    """(True, "") when kernswap._C is importable and has block_sparse_attention, else (False, reason)."""
    return cpu.available('block_sparse_attention')


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int,
             causal: bool) -> bool:
    """CPU tensors of fp32/bf16/fp16, head_dim 64/128/256, block_size a multiple of 16 in [16, 256]."""
    return (all(t.device.type == "cpu" for t in (q, k, v, block_mask)) and q.dtype in DTYPE_CODES
            and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4 and q.shape[-1] in HEAD_DIMS
            and isinstance(block_size, int) and 16 <= block_size <= 256 and block_size % 16 == 0)


def _strides3(t: torch.Tensor):
    return (t.stride(0), t.stride(1), t.stride(2))


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block_size: int, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) float32). Inputs validated by kernswap.ops."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((b, hq, sq), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if sk == 0:
        out.zero_()
        lse.fill_(-math.inf)
        return out, lse
    C = _ext.get_C()
    if C is None:
        raise RuntimeError(f"kernswap cpu backend unavailable: {_ext.cpu_ext_reason('block_sparse_attention')}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = block_mask if block_mask.dtype == torch.bool else block_mask.bool()
    mask = mask.contiguous()
    mstride = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    C.block_sparse_attention(q.data_ptr(), extent(q), k.data_ptr(), extent(k), v.data_ptr(), extent(v),
                             DTYPE_CODES[q.dtype], b, hq, hkv, sq, sk, d, _strides3(q), _strides3(k), _strides3(v),
                             mask.data_ptr(), extent(mask), mstride, int(block_size), bool(causal), float(scale),
                             out.data_ptr(), out.numel(), lse.data_ptr(), lse.numel(), torch.get_num_threads())
    return out, lse
