"""int4 group-wise format (sym: implicit zero 8; asym: uint8 or fp32 zeros), packed 16n x 8k nibble tiles (SPEC.md)."""
from typing import Optional

import torch

from .base import TILE_N, ZERO_DTYPES, QuantizedWeight, padded_n
from .int8 import _check_weight
from .scale_search import (check_method, group_weights, rtn_float_zero, search_asymmetric, search_float_zero,
                           search_symmetric)

__all__ = ["quantize_int4", "pack_int4", "unpack_int4", "int4_from_codes"]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: int [N, K] in 0..15 (K % 8 == 0) -> uint8 [Np//16, K*8].

    Byte (ko*16+nn)*4+j of tile row t: low nibble q[n, ko*8+j], high nibble q[n, ko*8+4+j], n = t*16+nn.
    """
    n, k = q.shape
    if k % 8:
        raise ValueError(f"pack_int4: in_features must be a multiple of 8, got {k}")
    np_ = padded_n(n)
    full = torch.zeros(np_, k, dtype=torch.uint8, device=q.device)
    full[:n] = q.to(torch.uint8)
    v = full.view(np_ // TILE_N, TILE_N, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [t, ko, nn, j, half]
    packed = v[..., 0] | (v[..., 1] << 4)
    return packed.reshape(np_ // TILE_N, k * 8).contiguous()


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_int4: int32 [N, K] in 0..15."""
    t = packed.shape[0]
    b = packed.view(t, k // 8, TILE_N, 4)  # [t, ko, nn, j]
    halves = torch.stack((b & 0xF, b >> 4), dim=-1)  # [t, ko, nn, j, half]
    full = halves.permute(0, 2, 1, 4, 3).reshape(t * TILE_N, k)
    return full[:n].to(torch.int32)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  dynamic_activations: bool = False, method: str = "rtn", float_zero: bool = False,
                  importance: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Quantize a float [N, K] weight group-wise along K (K % group_size == 0). method="rtn": max|w| (sym) or the
    [min, max] range (asym) onto the code range; "mse": per group the scale (and range) of least squared error
    (scale_search). float_zero (asymmetric only): fp32 zero-points, the group's own [min, max] onto 0..15 (GGUF
    Q4_1's grid) instead of an integer zero-point on a range widened to include 0. importance ([K], method="mse"
    only): per input channel weights of the squared error (scale_search.importance_of)."""
    _check_weight(w, "quantize_int4")
    check_method(method, "quantize_int4", importance)
    if float_zero and symmetric:
        raise ValueError("quantize_int4: float_zero=True needs symmetric=False (float zero-points are the "
                         "asymmetric form)")
    n, k = w.shape
    if group_size not in (32, 64, 128):
        raise ValueError(f"quantize_int4: group_size must be one of [32, 64, 128], got {group_size!r}")
    if k % group_size:
        raise ValueError(f"quantize_int4: in_features must be divisible by group_size={group_size}, got {k}")
    ng = k // group_size
    wg = w.detach().to(torch.float32).reshape(n, ng, group_size)
    cw = group_weights(importance, n, k, group_size)
    if float_zero:
        flat = wg.reshape(n * ng, group_size)
        scale, z, q = search_float_zero(flat, weights=cw) if method == "mse" else rtn_float_zero(flat)
        return int4_from_codes(q.reshape(n, k), scale.reshape(n, ng), z.reshape(n, ng), group_size,
                               dynamic_activations)
    if method == "mse" and symmetric:
        scale, q = search_symmetric(wg.reshape(n * ng, group_size), -8, 7, weights=cw)
        scale, q = scale.reshape(n, ng), q.reshape(n, ng, group_size) + 8
        zero_p = None
    elif method == "mse":
        scale, z, q = search_asymmetric(wg.reshape(n * ng, group_size), weights=cw)
        scale, z, q = scale.reshape(n, ng), z.reshape(n, ng), q.reshape(n, ng, group_size)
        zero_p = torch.zeros(ng, padded_n(n), dtype=torch.uint8, device=w.device)
        zero_p[:, :n] = z.t().to(torch.uint8)
    elif symmetric:
        scale = wg.abs().amax(dim=2) / 7.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(wg / safe[..., None]), -8, 7) + 8
        zero_p = None
    else:
        mn = wg.amin(dim=2).clamp(max=0.0)
        mx = wg.amax(dim=2).clamp(min=0.0)
        scale = (mx - mn) / 15.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = torch.clamp(torch.round(-mn / safe), 0, 15)
        q = torch.clamp(torch.round(wg / safe[..., None]) + z[..., None], 0, 15)
        zero_p = torch.zeros(ng, padded_n(n), dtype=torch.uint8, device=w.device)
        zero_p[:, :n] = z.t().to(torch.uint8)
    return int4_from_codes(q.reshape(n, k), scale, None if zero_p is None else zero_p[:, :n].t(), group_size,
                           dynamic_activations)


def int4_from_codes(q: torch.Tensor, scale: torch.Tensor, zero, group_size: int,
                    dynamic_activations: bool = False) -> QuantizedWeight:
    """The packed weight for codes q [N, K] in 0..15 (symmetric: signed code + 8), scale [N, K // group] and, for the
    asymmetric form, zero-points zero [N, K // group] (None: symmetric): integer ones in any integer dtype, float
    ones as a float tensor (stored fp32)."""
    n, k = q.shape
    ng = k // group_size
    zero_p = None
    if zero is not None:
        zdt = ZERO_DTYPES[int(zero.is_floating_point())]
        zero_p = torch.zeros(ng, padded_n(n), dtype=zdt, device=q.device)
        zero_p[:, :n] = zero.t().to(zdt)
    scale_p = torch.zeros(ng, padded_n(n), dtype=torch.float32, device=q.device)
    scale_p[:, :n] = scale.t()
    return QuantizedWeight(packed=pack_int4(q), scale=scale_p, zero=zero_p, bits=4, group_size=group_size,
                           symmetric=zero is None, in_features=k, out_features=n,
                           dynamic_activations=dynamic_activations)
