"""decode_layer_step: one decode step (one new token per sequence) of consecutive patched Llama-style decoder layers
over a static KV cache, in place (each layer's key and value written at its position, the position advanced by one).

    kernswap.ops.decode_layer_step(x, cos, sin, keys, values, positions, attention_mask, layer_ids)
      -> torch.ops.kernswap.decode_layer_step(...)   declared once here (schema + fake kernel): what a compiled
                                                     model with a static cache calls, one node for all its layers
           the layers' decode steps (kernswap.nn.decode_static.static_steps): per layer, the compiled decode-layer
           kernel when the mask is plain causal at the position, else the layer's modules in torch (the reference)

A layer id names a patched layer (``DecodeForward.uid``, given out by :func:`register_layer`): weights, norms
and head counts come from the layer itself, prepared once and re-checked per call, so a traced graph holds no
pointer and follows the layer's current weights.
"""
import itertools
import weakref
from typing import Dict, List, Optional

import torch

from ._checks import check_int, check_tensor, require

__all__ = ["decode_layer_step", "register_layer", "check_args", "mask_fits"]

OP = "torch.ops.kernswap.decode_layer_step"
_F32 = (torch.float32,)
_MASK_DTYPES = (torch.bool, torch.float32)

_LAYERS: Dict[int, "weakref.ref"] = {}
_IDS = itertools.count(1)


def register_layer(layer_forward) -> int:
    """A new id for ``layer_forward`` (an object whose ``static_steps(layers, ...)`` runs consecutive layers'
    steps), held weakly: the id dies with it."""
    uid = next(_IDS)
    _LAYERS[uid] = weakref.ref(layer_forward, lambda _, u=uid: _LAYERS.pop(u, None))
    return uid


def _layer(fn: str, layer_id: int):
    ref = _LAYERS.get(layer_id)
    obj = ref() if ref is not None else None
    if obj is None:
        raise ValueError(f"{fn}: layer_id must name a patched decoder layer of this process (DecodeForward.uid), "
                         f"got {layer_id} (unpatched, or never given out)")
    return obj


def check_args(fn, x, cos, sin, keys, values, positions, attention_mask, layer_ids) -> None:
    """The op's one checking function (the wrapper, the registered op and its fake kernel): dtypes, ranks, devices
    and the size relations; each position's value (< its cache's capacity) is checked when its step runs."""
    check_tensor(fn, "x", x, dtypes=_F32, dim=2)
    dev = x.device
    b = x.shape[0]
    check_tensor(fn, "cos", cos, dtypes=_F32, dim=2, device=dev)
    check_tensor(fn, "sin", sin, dtypes=_F32, dim=2, device=dev)
    d = cos.shape[1]
    require(cos.shape[0] == b and sin.shape == cos.shape, ValueError,
            lambda: f"{fn}: cos and sin must be [batch={b}, head_dim], got {list(cos.shape)} and {list(sin.shape)}")
    for name, seq in (("keys", keys), ("values", values), ("positions", positions), ("layer_ids", layer_ids)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{fn}: {name} must be a list (one entry per layer), got {type(seq).__name__}")
    n = len(layer_ids)
    require(n >= 1 and len(keys) == n and len(values) == n and len(positions) == n, ValueError,
            lambda: f"{fn}: keys, values, positions and layer_ids must have one entry per layer (>= 1), got "
                    f"{len(keys)}, {len(values)}, {len(positions)} and {n}")
    # all layers' entries like the first (the usual model call): only the first goes through the checks
    rest = _like_first(keys, values, positions, layer_ids)
    for i, (k, v, p, uid) in enumerate(zip(keys[:1] if rest else keys, values, positions, layer_ids)):
        check_tensor(fn, f"keys[{i}]", k, dtypes=_F32, dim=4, device=dev)
        check_tensor(fn, f"values[{i}]", v, dtypes=_F32, dim=4, device=dev)
        require(k.shape[0] == b and k.shape[3] == d and k.shape[2] >= 1 and v.shape == k.shape, ValueError,
                lambda: f"{fn}: keys[{i}] and values[{i}] must be [batch={b}, kv_heads, capacity >= 1, "
                        f"head_dim={d}], got {list(k.shape)} and {list(v.shape)}")
        check_tensor(fn, f"positions[{i}]", p, dtypes=(torch.int64,), dim=0, device=dev)
        check_int(fn, f"layer_ids[{i}]", uid, 1)
    if attention_mask is not None:
        check_tensor(fn, "attention_mask", attention_mask, dtypes=_MASK_DTYPES + (torch.int64,), device=dev)
        m = attention_mask
        # (every layer's capacity, not a set of them: while torch.compile traces with a dynamic capacity, the
        # sizes are SymInts, which do not hash)
        require(all(mask_fits(m, b, k.shape[2]) for k in (keys[:1] if rest else keys)), ValueError,
                lambda: f"{fn}: attention_mask must be None, [batch={b}, length] or [batch={b} or 1, 1, 1, "
                        f"capacity={sorted({int(k.shape[2]) for k in keys})}] (bool or additive fp32), got "
                        f"{list(m.shape)} {m.dtype}")


def _like_first(keys, values, positions, layer_ids) -> bool:
    """Whether every layer's key, value and position tensors are plain tensors of the first layer's key's (for
    the values too) and position's type, dtype, shape and device, and every layer id an int >= 1: then the checks
    of the first layer's entries hold for all. (FakeTensors while torch.compile traces take the full checks.)"""
    k0, p0 = keys[0] if keys else None, positions[0] if positions else None
    if type(k0) is not torch.Tensor or type(p0) is not torch.Tensor:
        return False
    kd, ks, kdev, pd, ps, pdev = k0.dtype, k0.shape, k0.device, p0.dtype, p0.shape, p0.device
    return all(type(k) is torch.Tensor and type(v) is torch.Tensor and type(p) is torch.Tensor and type(u) is int
               and u >= 1 and k.dtype == kd and v.dtype == kd and p.dtype == pd and k.shape == ks and v.shape == ks
               and p.shape == ps and k.device == kdev and v.device == kdev and p.device == pdev
               for k, v, p, u in zip(keys, values, positions, layer_ids))


def mask_fits(m: torch.Tensor, b: int, cap: int) -> bool:
    """A mask of a form the op reads for batch b over caches of ``cap`` positions: a [b, L] padding mask, or the
    model's [b or 1, 1, 1, cap] bool / additive fp32 mask."""
    return (m.dim() == 2 and m.shape[0] == b) or (
        m.dim() == 4 and m.dtype in _MASK_DTYPES and m.shape[0] in (1, b) and m.shape[1] == 1 and m.shape[2] == 1
        and m.shape[3] == cap)


def _run(fn, x, cos, sin, keys, values, positions, attention_mask, layer_ids) -> torch.Tensor:
    layers = [_layer(fn, uid) for uid in layer_ids]
    return layers[0].static_steps(layers, x, cos, sin, keys, values, positions, attention_mask)


# Defined with a plain library fragment rather than torch.library.custom_op: custom_op's Python autograd and
# ADInplaceOrView layers (a version bump per mutated tensor, in Python) cost ~125 us a call with SmolLM2's 91
# mutated tensors, ~1.5% of a compiled decode step; this definition dispatches in ~25 us. The schema is the one
# custom_op derived (mutated lists annotated); the implementation bumps the versions itself (static_steps).
_LIB = torch.library.Library("kernswap", "FRAGMENT")  # (held here: the definition lives as long as the module)
_LIB.define("decode_layer_step(Tensor x, Tensor cos, Tensor sin, Tensor(a3!)[] keys, Tensor(a4!)[] values, "
            "Tensor(a5!)[] positions, Tensor? attention_mask, SymInt[] layer_ids) -> Tensor")


def _decode_layer_step_op(x, cos, sin, keys, values, positions, attention_mask, layer_ids) -> torch.Tensor:
    check_args(OP, x, cos, sin, keys, values, positions, attention_mask, layer_ids)
    return _run(OP, x, cos, sin, keys, values, positions, attention_mask, layer_ids)


_LIB.impl("decode_layer_step", _decode_layer_step_op, "CompositeExplicitAutograd")


@torch.library.register_fake("kernswap::decode_layer_step", lib=_LIB)
def _decode_layer_step_fake(x, cos, sin, keys, values, positions, attention_mask, layer_ids):
    check_args(OP, x, cos, sin, keys, values, positions, attention_mask, layer_ids)
    return torch.empty_like(x)


def decode_layer_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: List[torch.Tensor],
                      values: List[torch.Tensor], positions: List[torch.Tensor],
                      attention_mask: Optional[torch.Tensor], layer_ids: List[int]) -> torch.Tensor:
    """One decode step of consecutive patched decoder layers ``layer_ids`` over a static KV cache; returns the
    last layer's output (each layer's output is the next one's input).

    x: [B, H] fp32, the first layer's input (one token per sequence); cos, sin: [B, head_dim] fp32, RoPE rows of
    the token's position; per layer, keys[i], values[i]: [B, Hkv, capacity, head_dim] fp32, its cache layer's
    buffers (a transformers ``StaticLayer``'s ``keys`` / ``values``), written at positions[i] (0-dim int64, the
    number of positions cached, advanced by one); attention_mask: None (causal), a [B, L] padding mask, or the
    model's [B or 1, 1, 1, capacity] bool / additive mask. Under torch.compile the registered op runs instead.
    """
    if torch.compiler.is_compiling():
        return torch.ops.kernswap.decode_layer_step(x, cos, sin, keys, values, positions, attention_mask, layer_ids)
    fn = "kernswap.ops.decode_layer_step"
    check_args(fn, x, cos, sin, keys, values, positions, attention_mask, layer_ids)
    return _run(fn, x, cos, sin, keys, values, positions, attention_mask, layer_ids)
