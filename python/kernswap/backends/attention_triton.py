"""Triton backend for kernswap::block_sparse_attention (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

The kernel lives in <repo>/kernels/block_sparse_attention.py (installed as kernswap.kernels.block_sparse_attention).
This file checks availability and coverage, compresses the block mask into per-(batch, head, query block) lists
of kept key blocks (torch ops) and launches the kernel.
"""
import contextlib
import weakref
from typing import Tuple

import torch

from ._triton_common import interpret, kernel_module, triton_available

__all__ = ["available", "supports", "block_sparse_attention", "compress_block_mask"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128, 256)


def _kernel_module():
    return kernel_module('block_sparse_attention')


def available() -> Tuple[bool, str]:
    """(True, "") when triton imports and a CUDA device (or TRITON_INTERPRET=1) is there, else (False, reason)."""
    return triton_available('block_sparse_attention')
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    return True, ""


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int,
             causal: bool) -> bool:
    """fp32 / fp16 / bf16, D in 64/128/256, block_size a multiple of 16, last dims contiguous.  CUDA tensors;
    CPU tensors only under TRITON_INTERPRET=1 (where bf16 dots are not emulated correctly)."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[-1] not in _HEAD_DIMS:
        return False
    if block_size < 16 or block_size % 16 != 0:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if q.is_cuda:
        return k.device == q.device and v.device == q.device
    return interpret() and q.device.type == "cpu" and q.dtype != torch.bfloat16


def compress_block_mask(block_mask: torch.Tensor, block_size: int, sq: int, sk: int, causal: bool):
    """(counts, n_full, indices): per (Bm, Hm, query block), the number of kept key blocks, how many of them need
    no element mask, and their numbers in increasing order (int32, padded with unkept numbers).

    Under causal, key blocks wholly in the future of the query block's last row are dropped.  A kept key block
    needs no element mask when it ends before the first row's position (causal) and before Sk; as the lists
    are sorted, those are the first n_full entries."""
    dev = block_mask.device
    nqb, nkb = block_mask.shape[-2], block_mask.shape[-1]
    kb = torch.arange(nkb, device=dev, dtype=torch.int32)
    qb = torch.arange(nqb, device=dev, dtype=torch.int32)
    keep = block_mask.bool()
    off = sk - sq
    thr = torch.full((nqb,), sk // block_size, device=dev, dtype=torch.int32)  # blocks below: inside Sk
    if causal:
        last = torch.clamp((qb + 1) * block_size, max=sq) - 1 + off      # last row's position per query block
        keep = keep & (kb.view(1, nkb) * block_size <= last.view(nqb, 1))
        thr = torch.minimum(thr, (qb * block_size + off + 1) // block_size)
    counts = keep.sum(-1, dtype=torch.int32)
    n_full = (keep & (kb.view(1, nkb) < thr.view(nqb, 1))).sum(-1, dtype=torch.int32)
    order = torch.where(keep, kb, kb + nkb)  # kept blocks first, each group in increasing order
    indices = torch.sort(order, dim=-1).values.remainder_(nkb).to(torch.int32)
    return counts, n_full, indices.contiguous()


_CACHE = {"ref": None, "key": None, "val": None}


def _compressed(block_mask, block_size, sq, sk, causal):
    """compress_block_mask, remembered for the last mask object (layers of one forward share their mask)."""
    key = (block_mask._version, block_mask.data_ptr(), tuple(block_mask.shape), block_size, sq, sk, causal)
    ref = _CACHE["ref"]
    if ref is not None and ref() is block_mask and _CACHE["key"] == key:
        return _CACHE["val"]
    val = compress_block_mask(block_mask, block_size, sq, sk, causal)
    try:
        _CACHE.update(ref=weakref.ref(block_mask), key=key, val=val)
    except TypeError:  # not weak-referenceable (should not happen for tensors): no caching
        pass
    return val


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block_size: int, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) fp32).  Inputs are validated by the op."""
    mod = _kernel_module()
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    if q.numel() == 0 or sk == 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
                torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device))
    counts, n_full, indices = _compressed(block_mask, int(block_size), sq, sk, bool(causal))
    if counts.shape[0] == 1:  # broadcast batch / head dims of the mask: stride 0
        counts, n_full, indices = (t.expand(b, *t.shape[1:]) for t in (counts, n_full, indices))
    if counts.shape[1] == 1:
        counts, n_full, indices = (t.expand(t.shape[0], hq, *t.shape[2:]) for t in (counts, n_full, indices))
    dev = q.device
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        return mod.launch_block_sparse_attention(q, k, v, counts, n_full, indices, int(block_size), bool(causal),
                                                 float(scale))
