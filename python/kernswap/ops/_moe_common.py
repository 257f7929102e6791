"""Shared pieces of the fused-MoE ops (moe_route, moe_align, moe_experts, moe_combine, fused_moe): the backend
table, the per-piece backend choice, and the argument checks with precise messages.

Backend modules: python/kernswap/backends/moe_<name>.py with ``available() -> (bool, reason)``,
``supports(piece, **kw) -> bool`` and any of the pieces
    route(router_logits, top_k, renormalize, scoring, order, correction_bias) -> (weights fp32, ids int32)
    align(topk_ids, num_experts, block_size) -> (sorted_pair_ids int32, expert_offsets int32)
    fused_experts(hidden2d, topk_weights, topk_ids, w_gate_up, w_down) -> out2d [T, H]
    experts(hidden2d, sorted_pair_ids, expert_offsets, w_gate_up, w_down, top_k) -> pair_out [T*top_k, H]
    combine(pair_out, topk_weights) -> out2d [T, H]
``supports`` gets the piece name and that piece's arguments by keyword (the names above); an optional
``supports_format(**fmt)`` says which formats the backend can ever run (configs check it at construction). With
backend="auto" a piece no backend has (or supports for these inputs) runs in the reference
(kernswap.reference.moe); a forced backend that lacks it raises.
"""
from types import ModuleType
from typing import Optional, Tuple, Union

import torch

from ..backend import Backend, normalize_backend
from ..formats.experts import QuantizedExperts, check_stacked, experts_from_args
from ._checks import FLOAT_DTYPES, check_backend, check_device, check_int, check_tensor, require
from ._dispatch import BackendTable, eager_fast_path

__all__ = ["MOE_TABLE", "choose_piece", "FLOAT_DTYPES", "check_tensor", "check_int", "check_experts",
           "check_backend", "check_device", "require", "num_experts_of", "experts_of", "eager_fast_path"]
PIECES = ("route", "align", "fused_experts", "experts", "combine")
MOE_TABLE = BackendTable(
    "fused_moe",
    {"cpu": "kernswap.backends.moe_cpu", "cuda": "kernswap.backends.moe_cuda",
     "triton": "kernswap.backends.moe_triton"},
    {"cpu": ("cpu",), "cuda": ("cuda", "triton")})


def choose_piece(piece: str, device_type: str, requested: Union[str, Backend], **kw
                 ) -> Tuple[str, Optional[ModuleType]]:
    """(backend name, module) for one piece; (\"reference\", None) when auto finds no backend with it.

    A forced backend (not auto/reference) never falls back: unavailable, it raises RuntimeError with its reason;
    lacking the piece, or not supporting these inputs, NotImplementedError (what BackendTable.choose does)."""
    req = normalize_backend(requested)
    if req is Backend.REFERENCE:
        return "reference", None
    if req is not Backend.AUTO:
        mod, _ = MOE_TABLE.module(req.value)
        if mod is not None and not hasattr(mod, piece):
            ok, reason = MOE_TABLE.available(req.value)
            if not ok:
                raise RuntimeError(f"fused_moe: backend={req.value!r} is unavailable: {reason}")
            has = [p for p in PIECES if hasattr(mod, p)]
            raise NotImplementedError(f"fused_moe: backend={req.value!r} has no {piece!r} piece (it has "
                                      f"{', '.join(has) or 'none'}); use backend='auto' or 'reference'")
    desc = f"{piece} on {device_type} ({', '.join(_describe(k, v) for k, v in kw.items())})"
    name, mod, _ = MOE_TABLE.choose(
        device_type, lambda m: hasattr(m, piece) and m.supports(piece, **kw), desc, req)
    return name, mod


def _describe(k, v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{k}={v.dtype} {list(v.shape)}"
    if isinstance(v, QuantizedExperts):
        return f"{k}={v.format_name} experts"
    return f"{k}={v!r}"


def num_experts_of(w) -> int:
    return w.num_experts if isinstance(w, QuantizedExperts) else int(w.shape[0])


def check_experts(fn: str, hidden_size: int, w_gate_up, w_down, device) -> Tuple[int, int]:
    """Validate the experts' weights against hidden_size; returns (num_experts, intermediate_size)."""
    if isinstance(w_gate_up, QuantizedExperts) or isinstance(w_down, QuantizedExperts):
        for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
            if not isinstance(w, QuantizedExperts):
                raise TypeError(f"{fn}: {name} must be a kernswap.formats.QuantizedExperts like the other weight, "
                                f"got {type(w).__name__}")
            check_stacked(f"{fn}: {name}", w)  # a QuantizedExperts edited after construction is caught here
            for part in ("packed", "scale", "zero"):
                check_tensor(fn, f"{name}.{part}", getattr(w, part), device=device, allow_none=True)
        e, n_gu, k_gu = w_gate_up.num_experts, w_gate_up.out_features, w_gate_up.in_features
        e_d, n_d, k_d = w_down.num_experts, w_down.out_features, w_down.in_features
        if (w_gate_up.bits, w_gate_up.symmetric, w_gate_up.dynamic_activations) != \
                (w_down.bits, w_down.symmetric, w_down.dynamic_activations):
            raise ValueError(f"{fn}: w_gate_up and w_down must share one format, got {w_gate_up.format_name} and "
                             f"{w_down.format_name}")
    else:
        for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
            check_tensor(fn, name, w, dtypes=FLOAT_DTYPES, dim=3, device=device)
        if w_down.dtype != w_gate_up.dtype:
            raise TypeError(f"{fn}: w_down.dtype must equal w_gate_up.dtype ({w_gate_up.dtype}), got {w_down.dtype}")
        (e, n_gu, k_gu), (e_d, n_d, k_d) = w_gate_up.shape, w_down.shape
    if e == 0 or n_gu == 0 or n_gu % 2:
        raise ValueError(f"{fn}: w_gate_up must be [num_experts > 0, 2 * intermediate_size > 0, hidden_size], got "
                         f"[{e}, {n_gu}, {k_gu}]")
    inter = n_gu // 2
    if k_gu != hidden_size:
        raise ValueError(f"{fn}: w_gate_up must be [num_experts, 2 * intermediate_size, hidden_size={hidden_size}], "
                         f"got [{e}, {n_gu}, {k_gu}]")
    if (e_d, n_d, k_d) != (e, hidden_size, inter):
        raise ValueError(f"{fn}: w_down must be [num_experts={e}, hidden_size={hidden_size}, intermediate_size="
                         f"{inter}], got [{e_d}, {n_d}, {k_d}]")
    return e, inter


def experts_of(fn: str, args: tuple, hidden_size: int, device) -> Tuple[object, object, int, int]:
    """The experts of a registered op's arguments (kernswap.formats.experts.experts_to_args) as the wrapper's
    weights, validated by check_experts: (w_gate_up, w_down, num_experts, intermediate_size)."""
    gu, d, gu_s, gu_z, d_s, d_z, bits, gu_g, d_g, sym, dyn = args
    if isinstance(bits, bool) or bits not in (0, 4, 8):
        raise ValueError(f"{fn}: bits must be 0 (float experts), 4 or 8, got {bits!r}")
    if bits:
        for name, t in (("gu_scale", gu_s), ("d_scale", d_s)):
            check_tensor(fn, name, t, dtypes=(torch.float32,), dim=3, device=device)
        for name, v in (("gu_group", gu_g), ("d_group", d_g)):
            check_int(fn, name, v, 1)
    wgu, wd = experts_from_args(args, hidden_size)
    e, inter = check_experts(fn, hidden_size, wgu, wd, device)
    return wgu, wd, e, inter
