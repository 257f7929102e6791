"""int8 per-output-channel symmetric format, packed in 16n x 4k VNNI tiles (SPEC.md)."""
from typing import Optional

import torch

from .base import TILE_N, QuantizedWeight, padded_n
from .scale_search import check_method, group_weights, search_symmetric

__all__ = ["quantize_int8", "pack_int8", "unpack_int8", "int8_from_codes"]


def _check_weight(w: torch.Tensor, fn: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{fn}: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{fn}: w must be a non-empty 2-D [out_features, in_features] tensor, "
                         f"got shape {list(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{fn}: w must be floating point (fp32/bf16/fp16), got {w.dtype}")


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q: int [N, K] in [-127, 127] -> int8 [Np//16, Kp*16]; byte (kq*16+nn)*4+kk = q[t*16+nn, kq*4+kk]."""
    n, k = q.shape
    np_, kp = padded_n(n), (k + 3) // 4 * 4
    full = torch.zeros(np_, kp, dtype=torch.int8, device=q.device)
    full[:n, :k] = q.to(torch.int8)
    tiles = full.view(np_ // TILE_N, TILE_N, kp // 4, 4).permute(0, 2, 1, 3)  # [t, kq, nn, kk]
    return tiles.reshape(np_ // TILE_N, kp * TILE_N).contiguous()


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_int8: int32 [N, K]."""
    t, row = packed.shape
    kp = row // TILE_N
    full = packed.view(t, kp // 4, TILE_N, 4).permute(0, 2, 1, 3).reshape(t * TILE_N, kp)
    return full[:n, :k].to(torch.int32)


def quantize_int8(w: torch.Tensor, dynamic_activations: bool = False, method: str = "rtn",
                  importance: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Quantize a float [N, K] weight per output row. method="rtn": scale[n] = max|w[n,:]|/127,
    q = clamp(round(w/scale), -127, 127); "mse": the scale and codes of least squared error (scale_search), the
    error weighted per input channel by ``importance`` [K] when given."""
    _check_weight(w, "quantize_int8")
    check_method(method, "quantize_int8", importance)
    n, k = w.shape
    wf = w.detach().to(torch.float32)
    if method == "mse":
        scale, q = search_symmetric(wf, -127, 127, weights=group_weights(importance, n, k, k))
    else:
        scale = wf.abs().amax(dim=1) / 127.0
        nz = scale > 0
        safe = torch.where(nz, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(wf / safe[:, None]), -127, 127)
        q = torch.where(nz[:, None], q, torch.zeros_like(q))
    return int8_from_codes(q, scale, dynamic_activations)


def int8_from_codes(q: torch.Tensor, scale: torch.Tensor, dynamic_activations: bool = False) -> QuantizedWeight:
    """The packed weight for codes q [N, K] in -127..127 and per-row scales scale [N]."""
    n, k = q.shape
    scale_p = torch.zeros(1, padded_n(n), dtype=torch.float32, device=q.device)
    scale_p[0, :n] = scale.reshape(-1)
    return QuantizedWeight(packed=pack_int8(q), scale=scale_p, zero=None, bits=8, group_size=k, symmetric=True,
                           in_features=k, out_features=n, dynamic_activations=dynamic_activations)
