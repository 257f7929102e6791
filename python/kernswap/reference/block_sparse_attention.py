"""Pure-PyTorch block-sparse attention: the fallback on any device and the test oracle.

Written for clarity, not speed: the block mask is expanded to an element mask and dense masked attention runs
in ``compute_dtype`` (float32 by default; float64 for the oracle the tests compare against).
"""
import math
from typing import Optional, Tuple

import torch

__all__ = ["block_sparse_attention_ref", "element_mask", "poisoned_rows"]


def element_mask(block_mask: torch.Tensor, sq: int, sk: int, block_size: int, causal: bool) -> torch.Tensor:
    """(Bm, Hm, Sq, Sk) bool: key j is attended by query row i iff its block pair is kept and, when causal,
    j <= i + (Sk - Sq) (queries aligned to the end of the keys)."""
    qb = torch.arange(sq, device=block_mask.device) // block_size
    kb = torch.arange(sk, device=block_mask.device) // block_size
    mask = block_mask.bool()[:, :, qb][:, :, :, kb]
    if causal:
        i = torch.arange(sq, device=block_mask.device).view(sq, 1) + (sk - sq)
        j = torch.arange(sk, device=block_mask.device).view(1, sk)
        mask = mask & (j <= i)
    return mask


def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                               block_size: int, causal: bool, scale: float,
                               compute_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out in q.dtype, lse float32): see kernswap.ops.block_sparse_attention for the semantics.

    Rows with no attended key give a zero output row and lse = -inf. A poisoned row (see ``poisoned_rows``)
    gives NaN in every element and in lse."""
    cdt = compute_dtype or torch.float32
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    qc, kc, vc = (_finite_or_zero(t.to(cdt)) for t in (q, k, v))
    kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    mask = element_mask(block_mask, sq, sk, block_size, causal)  # broadcasts over (B, Hq)
    s = (qc @ kc.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = p.masked_fill(~mask, 0.0)
    out = p @ vc
    bad = poisoned_rows(q, k, v, mask)
    out = out.masked_fill(bad.unsqueeze(-1), math.nan)
    lse = lse.masked_fill(bad, math.nan)
    return out.to(q.dtype), lse.to(torch.float32)


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def poisoned_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Sq) bool, the NaN / Inf policy: row i of head h is poisoned when its q row, or the k or v row of a
    key it attends (``mask``: the element mask, broadcastable to (B, Hq, Sq, Sk)), holds a NaN or an Inf. Keys a
    row does not attend never affect it."""
    group = q.shape[1] // k.shape[1]
    bad_q = ~torch.isfinite(q).all(-1)
    bad_kv = (~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))).repeat_interleave(group, dim=1)
    return bad_q | (mask & bad_kv.unsqueeze(2)).any(-1)
