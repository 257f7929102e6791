"""Pure-PyTorch quantized linear: the fallback on every device and the test oracle (SPEC.md, "Reference semantics")."""
from typing import Optional

import torch

from ..formats.base import QuantizedWeight

__all__ = ["quantized_linear_ref", "reference_linear", "quantize_activations"]

# elements of the [groups, M, N] fp64 partial-sum block computed at once (bounds memory)
_BLOCK_ELEMS = 1 << 22


def quantize_activations(x2d: torch.Tensor):
    """Per-row symmetric int8: returns (a fp32 holding integers in [-127,127], a_scale fp32 [M], finite bool [M])."""
    xf = x2d.to(torch.float32)
    amax = xf.abs().amax(dim=1) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    finite = torch.isfinite(amax)
    a_scale = amax / 127.0
    nz = (amax > 0) & finite
    # fp32 division 127/amax (not `127.0 / t`, which torch evaluates as reciprocal(t) * 127: another rounding)
    inv = torch.full_like(amax, 127.0) / torch.where(nz, amax, torch.ones_like(amax))
    a = torch.clamp(torch.round(xf * inv[:, None]), -127, 127)  # torch.round: half to even
    a = torch.where(nz[:, None], a, torch.zeros_like(a))
    return a, a_scale, finite


def _dynamic(x2d: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    m, n, g = x2d.shape[0], qw.out_features, qw.group_size
    ng = qw.in_features // g
    a, a_scale, finite = quantize_activations(x2d)
    q, scale, zero = qw.unpack()  # [N,K] int32, [N,ng] fp32, [N,ng] int32 (fp32: float zero-points)
    qz = (q.to(torch.float64) - zero.to(torch.float64).repeat_interleave(g, dim=1))
    qz = qz.view(n, ng, g).permute(1, 2, 0)  # [ng, G, N]
    a64 = a.to(torch.float64).view(m, ng, g).permute(1, 0, 2)  # [ng, M, G]
    scale_t = scale.t()  # [ng, N]
    acc = torch.zeros(m, n, dtype=torch.float32, device=x2d.device)
    step = max(1, _BLOCK_ELEMS // max(1, m * n))
    for g0 in range(0, ng, step):
        isum = torch.bmm(a64[g0:g0 + step], qz[g0:g0 + step])  # exact sums (integer ones for integer zeros), [gs, M, N]
        acc += (isum.to(torch.float32) * scale_t[g0:g0 + step, None, :]).sum(dim=0)
    y = a_scale[:, None] * acc
    return torch.where(finite[:, None], y, torch.full_like(y, float("nan")))


def reference_linear(x2d: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                     dynamic_act: Optional[bool] = None) -> torch.Tensor:
    """y = x2d @ W^T + bias for a QuantizedWeight; (M, N) in x2d.dtype. Inputs are assumed validated."""
    dyn = qw.dynamic_activations if dynamic_act is None else dynamic_act
    if dyn:
        y = _dynamic(x2d, qw)
    else:
        y = x2d.to(torch.float32) @ qw.dequantize().t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x2d.dtype)


def quantized_linear_ref(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                         zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group_size: int,
                         in_features: int, out_features: int, dynamic_act: bool) -> torch.Tensor:
    """Same argument list as the backends' quantized_linear."""
    qw = QuantizedWeight(packed=packed, scale=scale, zero=zero, bits=bits, group_size=group_size,
                         symmetric=zero is None, in_features=in_features, out_features=out_features,
                         dynamic_activations=dynamic_act)
    return reference_linear(x2d, qw, bias, dynamic_act)
