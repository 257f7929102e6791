"""Block-mask builders for kernswap.ops.block_sparse_attention.

A block mask is a bool tensor (B or 1, H or 1, ceil(Sq / bs), ceil(Sk / bs)); entry [b, h, i, j] keeps query
block i (rows i*bs ... of q, in q's own index) against key block j. Queries are aligned to the end of the keys:
query row r sits at position r + Sk - Sq. Each builder returns only block pairs that hold at least one visible
key when causal, and never drops a query's own (diagonal) key blocks, so no query row is left without keys.

    causal_block_mask       every block pair a causal query can see (dense causal attention)
    sink_window_block_mask  attention sinks (first key blocks) + a sliding window of key blocks (StreamingLLM)
    topk_block_mask         sinks + window + the best-scoring blocks by pooled q . pooled k, up to a density
    pool_key_blocks         per-block key means (cache them for decoding: see topk_block_mask(pooled_k=...))
    block_mask_density      the fraction of causal block pairs a mask keeps
"""
import math
from typing import Optional, Tuple

import torch

__all__ = ["causal_block_mask", "sink_window_block_mask", "topk_block_mask", "pool_key_blocks",
           "block_mask_density", "block_ranges"]


def _nblocks(n: int, bs: int) -> int:
    return -(-n // bs)


def _check_sizes(sq: int, sk: int, block_size: int, causal: bool, where: str) -> None:
    for name, v in (("sq", sq), ("sk", sk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be an int >= 1, got {v!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 16 <= block_size <= 256 \
            or block_size % 16:
        raise ValueError(f"{where}: block_size must be an int in [16, 256] that is a multiple of 16, "
                         f"got {block_size!r}")
    if causal and sq > sk:
        raise ValueError(f"{where}: causal masks need sq <= sk (queries aligned to the end of the keys), "
                         f"got sq={sq}, sk={sk}")


def block_ranges(sq: int, sk: int, block_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) int64 per query block: the key blocks holding the first and the last query row's own position
    (the diagonal blocks). With causal masking, key blocks > hi are entirely in the future."""
    nqb = _nblocks(sq, block_size)
    off = sk - sq
    first = torch.arange(nqb, device=device) * block_size
    last = torch.clamp(first + block_size, max=sq) - 1
    return (first + off).clamp(min=0) // block_size, (last + off).clamp(min=0) // block_size


def causal_block_mask(sq: int, sk: int, block_size: int = 64, *, device=None) -> torch.Tensor:
    """(1, 1, NQB, NKB): every key block a causal query block can see (dense causal attention)."""
    _check_sizes(sq, sk, block_size, True, "causal_block_mask")
    _, hi = block_ranges(sq, sk, block_size, device)
    kb = torch.arange(_nblocks(sk, block_size), device=device)
    return (kb.view(1, -1) <= hi.view(-1, 1)).view(1, 1, len(hi), -1)


def _sink_window(sq: int, sk: int, block_size: int, sink_blocks: int, local_blocks: int, device) -> torch.Tensor:
    lo, hi = block_ranges(sq, sk, block_size, device)
    kb = torch.arange(_nblocks(sk, block_size), device=device).view(1, -1)
    window = (kb >= (lo - (local_blocks - 1)).view(-1, 1)) & (kb <= hi.view(-1, 1))
    sinks = (kb < sink_blocks) & (kb <= hi.view(-1, 1))
    return window | sinks


def sink_window_block_mask(sq: int, sk: int, block_size: int = 64, *, sink_blocks: int = 1,
                           local_blocks: int = 2, device=None) -> torch.Tensor:
    """(1, 1, NQB, NKB), causal: the first ``sink_blocks`` key blocks (attention sinks) plus a sliding window of
    ``local_blocks`` key blocks ending at each query block's diagonal (the diagonal blocks always included)."""
    _check_sizes(sq, sk, block_size, True, "sink_window_block_mask")
    _check_counts(sink_blocks, local_blocks, "sink_window_block_mask")
    return _sink_window(sq, sk, block_size, sink_blocks, local_blocks, device).view(1, 1, _nblocks(sq, block_size),
                                                                                     -1)


def _check_counts(sink_blocks: int, local_blocks: int, where: str) -> None:
    if isinstance(sink_blocks, bool) or not isinstance(sink_blocks, int) or sink_blocks < 0:
        raise ValueError(f"{where}: sink_blocks must be an int >= 0, got {sink_blocks!r}")
    if isinstance(local_blocks, bool) or not isinstance(local_blocks, int) or local_blocks < 1:
        raise ValueError(f"{where}: local_blocks must be an int >= 1, got {local_blocks!r}")


def pool_key_blocks(k: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """(B, Hkv, ceil(Sk / bs), D) float32: the mean key of each key block (the last block over its own rows).
    During decoding, keep these for the cached keys and pass them to ``topk_block_mask(pooled_k=...)`` so a
    step does not read the whole cache to choose its blocks."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"pool_key_blocks: k must be a 4-D tensor (B, Hkv, Sk, D), got "
                         f"{getattr(k, 'shape', type(k).__name__)}")
    b, h, sk, d = k.shape
    nfull = sk // block_size
    parts = []
    if nfull:  # complete blocks: a view, no padded copy
        parts.append(k[:, :, :nfull * block_size].float().reshape(b, h, nfull, block_size, d).mean(dim=3))
    if sk % block_size:
        parts.append(k[:, :, nfull * block_size:].float().mean(dim=2, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def topk_block_mask(q: torch.Tensor, k: Optional[torch.Tensor] = None, block_size: int = 64, *, density: float,
                    sink_blocks: int = 1, local_blocks: int = 2, causal: bool = True,
                    pooled_k: Optional[torch.Tensor] = None, sk: Optional[int] = None,
                    per_kv_head: bool = False) -> torch.Tensor:
    """(B, Hq, NQB, NKB) dynamic mask: per head and query block, the sinks, the local window and the key blocks
    with the highest pooled score (mean q of the query block . mean k of the key block), up to ``density`` of the
    block pairs the query block can see (the sinks and the window count towards the budget and are always kept;
    a row keeps max(mandatory, ceil(density * visible)) blocks).

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D), or ``pooled_k`` (B, Hkv, NKB, D) from :func:`pool_key_blocks` with
    ``sk`` = the key length (decoding: the pooled keys are cached, so choosing blocks does not read the cache).
    per_kv_head: choose one set of blocks per kv head (scores summed over its query heads): the query heads
    that share a kv head then read the same key blocks (less memory traffic when decoding with GQA).
    """
    where = "topk_block_mask"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{where}: q must be a 4-D tensor (B, Hq, Sq, D), got {getattr(q, 'shape', type(q))}")
    d_ok = isinstance(density, (int, float)) and not isinstance(density, bool)
    if not d_ok or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{where}: density must be a float in (0, 1], got {density!r}")
    _check_counts(sink_blocks, local_blocks, where)
    if pooled_k is None:
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"{where}: pass k (B, Hkv, Sk, D) or pooled_k with sk")
        sk = k.shape[2]
        pooled_k = pool_key_blocks(k, block_size)
    elif sk is None:
        raise ValueError(f"{where}: pooled_k needs sk (the number of keys it pools)")
    b, hq, sq, d = q.shape
    _check_sizes(sq, sk, block_size, causal, where)
    hkv, nkb = pooled_k.shape[1], pooled_k.shape[2]
    if pooled_k.shape[0] != b or pooled_k.shape[3] != d or hq % hkv or nkb != _nblocks(sk, block_size):
        raise ValueError(f"{where}: pooled keys {list(pooled_k.shape)} do not match q {list(q.shape)} with "
                         f"sk={sk}, block_size={block_size}")
    nqb = _nblocks(sq, block_size)
    pq = pool_key_blocks(q, block_size)  # (B, Hq, NQB, D) mean query of each query block
    g = hq // hkv
    scores = (pq.reshape(b, hkv, g * nqb, d) @ pooled_k.float().transpose(-1, -2)).view(b, hkv, g, nqb, nkb)
    if per_kv_head:
        scores = scores.sum(dim=2, keepdim=True).expand(b, hkv, g, nqb, nkb)
    scores = scores.reshape(b, hq, nqb, nkb)
    if causal:
        visible = causal_block_mask(sq, sk, block_size, device=q.device)[0, 0]
        must = _sink_window(sq, sk, block_size, sink_blocks, local_blocks, q.device)
    else:
        visible = torch.ones(nqb, nkb, dtype=torch.bool, device=q.device)
        kb = torch.arange(nkb, device=q.device)
        must = (kb < sink_blocks).view(1, -1).expand(nqb, nkb).clone()
    must = must & visible
    n_visible = visible.sum(dim=1)
    budget = torch.maximum(torch.ceil(n_visible.double() * float(density)).long(), must.sum(dim=1))
    big = torch.finfo(torch.float32).max
    scores = scores.masked_fill(must, big).masked_fill(~visible, -math.inf)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(nkb, device=q.device).expand_as(order))
    return (ranks < budget.view(1, 1, nqb, 1)) & visible


def block_mask_density(block_mask: torch.Tensor, sq: int, sk: int, block_size: int = 64,
                       causal: bool = True) -> float:
    """Kept block pairs / the block pairs dense (causal) attention computes, averaged over batch and heads."""
    _check_sizes(sq, sk, block_size, causal, "block_mask_density")
    nqb, nkb = _nblocks(sq, block_size), _nblocks(sk, block_size)
    if block_mask.dim() != 4 or tuple(block_mask.shape[2:]) != (nqb, nkb):
        raise ValueError(f"block_mask_density: block_mask must be (B, H, {nqb}, {nkb}), got "
                         f"{list(block_mask.shape)}")
    visible = causal_block_mask(sq, sk, block_size, device=block_mask.device)[0, 0] if causal else \
        torch.ones(nqb, nkb, dtype=torch.bool, device=block_mask.device)
    kept = (block_mask.bool() & visible).sum(dim=(2, 3)).double()
    return float((kept / visible.sum()).mean())
