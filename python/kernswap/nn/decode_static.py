"""A patched layer's decode step over a static KV cache (kernswap.ops.decode_layer_step's implementation).

A transformers ``StaticLayer`` holds its keys and values in fixed [B, Hkv, capacity, D] buffers and counts the
cached positions in a 0-dim tensor; the model's decode step writes position n and attends every position the
mask allows (plain causal: 0..n). The decode-layer kernel does exactly that over the same buffers (kbuf = the
layer's keys, pos = n), so :func:`static_step` runs it whenever the mask is plain causal at n and the layer's plan
fits; otherwise (padding, a custom mask, a layer the kernel does not fit) it computes the step with the layer's
own modules in torch, as the model's attention would: SDPA over the whole buffer under the mask.
"""
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends.cpu import extent

__all__ = ["static_step", "mask_is_causal_at"]

FN = "torch.ops.kernswap.decode_layer_step"


def _allowed(mask: Optional[torch.Tensor], n: int, cap: int) -> torch.Tensor:
    """The mask as SDPA's attn_mask over the whole buffer: bool [B|1, 1, 1, cap] (True: attend), or the model's
    additive fp32 mask as it is."""
    causal = torch.arange(cap, device=mask.device if mask is not None else None) <= n
    if mask is None:
        return causal.view(1, 1, 1, cap)
    if mask.dim() == 2:  # a padding mask over the first L positions; positions past it are padding
        pad = torch.zeros(mask.shape[0], cap, dtype=torch.bool, device=mask.device)
        ln = min(cap, mask.shape[1])
        pad[:, :ln] = mask[:, :ln].bool()
        return (pad & causal).view(mask.shape[0], 1, 1, cap)
    return mask


_MEMO = [None, None, None]  # [weak ref to the mask, (its version, n), the answer]: a step's layers share one mask


def mask_is_causal_at(mask: Optional[torch.Tensor], n: int, cap: int) -> bool:
    """Whether ``mask`` lets position n attend exactly to positions 0..n (what the kernel computes); remembered
    for the mask object, its version and n, so each layer of a step does not recompute it."""
    if mask is None:
        return True
    key = (mask._version, n, cap)
    if _MEMO[0] is not None and _MEMO[0]() is mask and _MEMO[1] == key:
        return _MEMO[2]
    if mask.dim() == 2:
        ans = mask.shape[1] >= n + 1 and bool(mask[:, :n + 1].bool().all())
    elif mask.dtype == torch.bool:
        ans = bool(mask[..., :n + 1].all()) and not bool(mask[..., n + 1:].any())
    else:  # additive: 0 where attended, the dtype's lowest (or -inf) elsewhere
        ans = bool((mask[..., :n + 1] == 0).all()) and bool((mask[..., n + 1:] <= torch.finfo(mask.dtype).min).all())
    _MEMO[0], _MEMO[1], _MEMO[2] = weakref.ref(mask), key, ans
    return ans


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama layers apply it: t * cos + rotate_half(t) * sin, t [B, heads, 1, D]."""
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos[:, None, None, :] + rot * sin[:, None, None, :]


def _reference(layer, x, cos, sin, keys, values, n: int, mask) -> torch.Tensor:
    """The decode step with the layer's modules in torch: the model's own computation over the static buffers."""
    attn, mlp = layer.self_attn, layer.mlp
    b, d = x.shape[0], cos.shape[1]
    hs = layer.input_layernorm(x.view(b, 1, -1))
    q, k, v = (p(hs).view(b, 1, -1, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    keys[:, :, n] = k[:, :, 0]
    values[:, :, n] = v[:, :, 0]
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=_allowed(mask, n, keys.shape[2]),
                                       scale=attn.scaling, enable_gqa=True)
    h = x.view(b, 1, -1) + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
    return (h + mlp(layer.post_attention_layernorm(h))).view(b, -1)


def static_step(fwd, x, cos, sin, keys, values, position, mask) -> torch.Tensor:
    """``fwd`` (a layer's DecodeForward): one step at n = position over the static buffers, position += 1."""
    n, cap = int(position), keys.shape[2]
    if not 0 <= n < cap:
        raise ValueError(f"{FN}: position must be in [0, capacity={cap}) (the cache is full past it), got {n}")
    plan = fwd.layer_plan() if _ext.have_cpu_ext() else None
    b, h = x.shape
    if (plan is not None and plan.h == h and plan.d == cos.shape[1] and plan.hkv == keys.shape[1]
            and x.device.type == "cpu" and keys.stride(-1) == 1 and values.stride(-1) == 1
            and not (torch.is_grad_enabled() and x.requires_grad) and mask_is_causal_at(mask, n, cap)):
        x2, c, s = x.contiguous(), cos.contiguous(), sin.contiguous()
        out = torch.empty(b, h)
        plan.native.step(x2.data_ptr(), x2.numel(), b, c.data_ptr(), c.numel(), s.data_ptr(), s.numel(),
                         keys.data_ptr(), extent(keys), *keys.stride()[:3], values.data_ptr(), extent(values),
                         *values.stride()[:3], n, cap, out.data_ptr(), out.numel(), torch.get_num_threads())
    else:
        with torch.no_grad():
            out = _reference(fwd.layer, x, cos, sin, keys, values, n, mask)
    position.add_(1)
    return out
