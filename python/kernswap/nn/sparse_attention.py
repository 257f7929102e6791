"""The attention function that block-sparse attention plugs into transformers with (its attention registry).

``kernswap.patch(model, attention=...)`` registers :func:`sparse_attention_forward` under the name
``"kernswap_sparse"``, points the patched model's config at it and tags each attention module with its
:class:`~kernswap.SparseAttentionConfig`. Per call:
- prefill (several queries): a dynamic top-k block mask (sinks + local window + best pooled-score blocks up to
  the density) built from this call's q and k, then ``kernswap.ops.block_sparse_attention``;
- decode (one query against the KV cache): the same policy scored against per-block key means that are kept
  per module and extended as the cache grows, so choosing blocks does not read the whole cache;
- ``density=1.0`` (``attention="dense"``): every causal block, no mask to choose, for prefill; a decode step (one
  query) runs SDPA, which is faster there;
- dense SDPA (transformers' own function) whenever sparse attention would not be exact to the request: keys
  shorter than ``min_seq_len``, an attention mask with padding or anything but plain causal masking, sliding
  window layers, dropout in training, attention weights requested, modules that are not patched.
"""
import weakref
from typing import Optional

import torch

from ..ops.block_sparse_attention import block_sparse_attention
from ..sparse.masks import topk_block_mask

__all__ = ["ATTN_NAME", "MODULE_ATTR", "POOL_ATTR", "sparse_attention_forward", "register_with_transformers",
           "dense_reason", "attends_densely"]

ATTN_NAME = "kernswap_sparse"
MODULE_ATTR = "_kernswap_sparse_attention"  # per attention module: its SparseAttentionConfig
POOL_ATTR = "_kernswap_key_pool"  # per-module decode state, created on first use; unpatch removes it


def register_with_transformers() -> None:
    """Make ``"kernswap_sparse"`` a known attention implementation (and give it SDPA's mask format)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, sparse_attention_forward)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


class _CausalCheck:
    """Is an attention mask plain causal (no padding)? Cached for the last mask tensor: every layer of one
    forward pass receives the same one."""

    def __init__(self):
        self.ref, self.answer = None, False

    def __call__(self, mask: Optional[torch.Tensor], sq: int, sk: int) -> bool:
        if mask is None:
            return True
        if self.ref is not None and self.ref() is mask:
            return self.answer
        if mask.dim() != 4 or mask.shape[-2:] != (sq, sk):
            answer = False
        else:
            allowed = mask if mask.dtype == torch.bool else mask == 0
            i = torch.arange(sq, device=mask.device).view(sq, 1) + (sk - sq)
            causal = torch.arange(sk, device=mask.device).view(1, sk) <= i
            answer = bool((allowed == causal).all())
        self.ref, self.answer = weakref.ref(mask), answer
        return answer


_plain_causal = _CausalCheck()


def attends_densely(module, impl: Optional[str]) -> bool:
    """Whether attention module ``module`` under attention implementation ``impl`` attends every causal position
    (what the decode kernels compute): torch's own implementations, or kernswap's at density 1."""
    if impl in ("sdpa", "eager", None):
        return True
    cfg = getattr(module, MODULE_ATTR, None)
    return impl == ATTN_NAME and cfg is not None and cfg.density >= 1.0


def dense_reason(module, query, key, attention_mask, dropout: float, kwargs) -> Optional[str]:
    """Why this call runs dense SDPA instead of block-sparse attention, or None."""
    cfg = getattr(module, MODULE_ATTR, None)
    if cfg is None:
        return "module not patched"
    if key.shape[2] < cfg.min_seq_len:
        return "short sequence"
    if cfg.density >= 1.0 and query.shape[2] == 1:
        # dense causal attention through kernswap's kernel against torch's SDPA, fp32, SmolLM2's heads (Hq 9, Hkv 3,
        # D 64), 2 threads, Xeon: 1.0x / 1.4x / 1.9x for 128 / 256 / 512-token prefills (so "dense" starts at 256
        # keys), 0.2-0.5x for one query against 64-2048 cached keys
        return "decode step of dense attention (torch's SDPA is faster for one query)"
    if dropout and module.training:
        return "dropout in training"
    if kwargs.get("output_attentions") or kwargs.get("softcap") is not None or \
            kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return "unsupported attention option"
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        return "sliding-window layer"
    if getattr(module, "is_causal", True) is False:
        return "not a causal layer"
    if query.shape[2] > key.shape[2] or not _plain_causal(attention_mask, query.shape[2], key.shape[2]):
        return "attention mask with padding"
    if query.device.type == "cpu" and cfg.backend.value == "auto":
        if scalar_cpu_tier():
            return "kernswap's CPU attention runs its portable scalar tier here, slower than torch's SDPA"
        if query.dtype != torch.float32 and cfg.density >= AMX_DENSE_FROM and torch_sdpa_uses_amx():
            return AMX_REASON
    return None


# On a CPU with AMX, torch's SDPA runs bf16/fp16 on the tile unit (no kernswap tier does): measured on a 2-core Xeon
# (S = 4096, bf16, 2 threads), kernswap's kernel is 2.5x / 1.9x / 0.99x / 0.55x / 0.31x dense SDPA at densities
# 0.05 / 0.1 / 0.25 / 0.5 / 1, so from 0.25 on `auto` runs dense SDPA there: faster, and exact.
AMX_DENSE_FROM = 0.25
AMX_REASON = ("torch's SDPA runs bf16/fp16 on AMX on this CPU, faster than kernswap's kernel at densities >= "
              f"{AMX_DENSE_FROM}")


def torch_sdpa_uses_amx() -> bool:
    """True when this torch can run its CPU attention on AMX tiles (the CPU has them and the OS enabled them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - an older torch without the probe
        return False


def scalar_cpu_tier() -> bool:
    """True when kernswap's CPU attention kernel would run its portable scalar tier (no x86 SIMD tier on this
    CPU, or forced): there `auto` leaves attention to torch's SDPA, which is faster."""
    from .. import _ext

    return _ext.op_isa("block_sparse_attention") == "scalar"


class _KeyPool:
    """Per-block key means of one module's KV cache, extended as the cache grows. The stored last key of each
    completed block is compared with the cache on every call, so a new sequence (or an edited cache) starts
    the pool again instead of reusing stale means."""

    def __init__(self):
        self.sums = None  # (B, Hkv, n, D) float32 sums of the n completed blocks
        self.tails = None  # (B, Hkv, n, D) the last key of each completed block

    def means(self, key: torch.Tensor, bs: int) -> torch.Tensor:
        b, h, sk, d = key.shape
        nfull = sk // bs
        n = 0 if self.sums is None else self.sums.shape[2]
        if n and (self.sums.shape[:2] != (b, h) or self.sums.shape[3] != d or n > nfull
                  or not torch.equal(self.tails, key[:, :, bs - 1:n * bs:bs])):
            n, self.sums, self.tails = 0, None, None
        if nfull > n:
            new = key[:, :, n * bs:nfull * bs].float().reshape(b, h, nfull - n, bs, d).sum(dim=3)
            tails = key[:, :, n * bs + bs - 1:nfull * bs:bs]
            self.sums = new if self.sums is None else torch.cat([self.sums, new], dim=2)
            self.tails = tails.clone() if self.tails is None else torch.cat([self.tails, tails], dim=2)
        parts = [] if self.sums is None else [self.sums / bs]
        if sk % bs:
            parts.append(key[:, :, nfull * bs:].float().mean(dim=2, keepdim=True))
        return torch.cat(parts, dim=2)


def _pool_of(module) -> _KeyPool:
    pool = module.__dict__.get(POOL_ATTR)
    if pool is None:
        pool = module.__dict__[POOL_ATTR] = _KeyPool()
    return pool


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function: (B, Hq, Sq, D) query, (B, Hkv, Sk, D) key/value (the whole cache when
    decoding) -> ((B, Sq, Hq, D) output, None)."""
    if dense_reason(module, query, key, attention_mask, dropout, kwargs) is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    cfg = getattr(module, MODULE_ATTR)
    bs, sq, sk = cfg.block_size, query.shape[2], key.shape[2]
    policy = dict(density=cfg.density, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks)
    if cfg.density >= 1.0:  # every block: the kernel's causal masking does the rest
        mask = torch.ones(1, 1, -(-sq // bs), -(-sk // bs), dtype=torch.bool, device=query.device)
    elif sq == 1:  # decode: score against the cached per-block key means, one block set per kv head
        pooled = _pool_of(module).means(key, bs)
        mask = topk_block_mask(query, None, bs, pooled_k=pooled, sk=sk, per_kv_head=True, **policy)
    else:
        mask = topk_block_mask(query, key, bs, **policy)
    out = block_sparse_attention(query, key, value, mask, block_size=bs, causal=True, scale=scaling,
                                 backend=cfg.backend)
    return out.transpose(1, 2).contiguous(), None
