"""A patched layer's decode step over a static KV cache (kernswap.ops.decode_layer_step's implementation).

A transformers ``StaticLayer`` holds its keys and values in fixed [B, Hkv, capacity, D] buffers and counts the
cached positions in a 0-dim tensor; the model's decode step writes position n and attends every position the
mask allows (plain causal: 0..n). The decode-layer kernel does exactly that over the same buffers (kbuf = the
layer's keys, pos = n), so :func:`static_steps` runs it whenever the mask is plain causal at n and the layer's plan
fits; otherwise (padding, a custom mask, a layer the kernel does not fit) it computes the step with the layer's
own modules in torch, as the model's attention would: SDPA over the whole buffer under the mask.
"""
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends.cpu import rope_args

__all__ = ["static_steps", "mask_is_causal_at"]

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


def static_steps(fwds, x, cos, sin, keys, values, positions, mask) -> torch.Tensor:
    """Consecutive layers' decode steps (``fwds``: their DecodeForwards) at n = positions[i] over their static
    buffers, each position += 1; returns the last layer's output. Every position is checked and every layer's
    plan and call arguments are prepared before the first kernel runs (layer i writes its preallocated output,
    which layer i + 1 reads), so back-to-back kernel layers run with nothing but the calls between them
    (~0.3 ms a SmolLM2 token faster than preparing each call between kernels); a layer the kernel does not take
    computes its step with its modules in torch, in order, into its output."""
    ns = [int(p) for p in positions]
    for i, (n, k) in enumerate(zip(ns, keys)):
        if not 0 <= n < k.shape[2]:
            raise ValueError(f"{FN}: position must be in [0, capacity={k.shape[2]}) (the cache is full past it), "
                             f"got {n} (positions[{i}])")
    b, h = x.shape
    d = cos.shape[1]
    kernel = (_ext.have_cpu_ext() and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad))
    impls = {}  # the layers' attention implementation, read once per config object
    plans = [fwd.layer_plan(impls) if kernel else None for fwd in fwds]
    c, s = cos.contiguous(), sin.contiguous()  # (held: the calls below point into them)
    rope = rope_args(c, s)
    x = x.contiguous()
    # layer i's output: row i of one block; the last layer's its own tensor (the op's result, not a view)
    outs = list(torch.empty(len(fwds) - 1, b, h).unbind(0)) + [torch.empty(b, h)]
    srcs = [x] + outs[:-1]  # layer i's input
    nt = torch.get_num_threads()
    calls = []  # per layer: (kernel step, its arguments), or None: the layer's modules
    for i, (plan, k, v, n) in enumerate(zip(plans, keys, values, ns)):
        cap = k.shape[2]
        if (plan is not None and plan.h == h and plan.d == d and plan.hkv == k.shape[1] and k.stride(-1) == 1
                and v.stride(-1) == 1 and mask_is_causal_at(mask, n, cap)):
            calls.append(plan.step_call(srcs[i], rope, k, v, n, outs[i], nt))
        else:
            calls.append(None)
    for i, call in enumerate(calls):
        if call is not None:
            call[0](*call[1])
        else:
            with torch.no_grad():
                outs[i].copy_(_reference(fwds[i].layer, srcs[i], cos, sin, keys[i], values[i], ns[i], mask).view(b, h))
    torch._foreach_add_(positions, 1)
    torch.autograd.graph.increment_version(keys + values)  # (written in place through their pointers)
    return outs[-1]
