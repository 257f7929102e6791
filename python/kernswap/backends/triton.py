"""Triton backend for kernswap::quantized_linear (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

The kernels live in <repo>/kernels/quantized_linear.py (installed as kernswap.kernels.quantized_linear) and read
the SPEC packed layouts directly; this file only checks availability and coverage and launches them.
"""
import contextlib
from typing import Optional, Tuple

import torch

from ._triton_common import interpret, kernel_module, triton_available

__all__ = ["available", "supports", "quantized_linear"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_module():
    return kernel_module('quantized_linear')


def available() -> Tuple[bool, str]:
    """(True, "") when triton imports and a CUDA device (or TRITON_INTERPRET=1) is there, else (False, reason)."""
    return triton_available('quantized_linear')
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    return True, ""


def supports(x2d: torch.Tensor, bits: int, group_size: int, dynamic_act: bool) -> bool:
    """Every SPEC format (int8 per-channel, int4 g32/64/128, weight-only or dynamic) for fp32/fp16/bf16 x.
    CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (where bf16 dots are not emulated correctly)."""
    if x2d.dtype not in _DTYPES or x2d.dim() != 2:
        return False
    if bits == 8:
        pass
    elif bits == 4:
        if group_size not in (32, 64, 128):
            return False
    else:
        return False
    if x2d.is_cuda:
        return True
    return interpret() and x2d.device.type == "cpu" and x2d.dtype != torch.bfloat16


def quantized_linear(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                     out_features: int, dynamic_act: bool) -> torch.Tensor:
    """(M, K) x packed weight -> (M, N) in x2d.dtype.  Inputs are validated by the op."""
    mod = _kernel_module()
    x2d = x2d.contiguous()
    if bias is not None:
        bias = bias.to(device=x2d.device, dtype=torch.float32).contiguous()
    dev = x2d.device
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        return mod.launch_quantized_linear(x2d, packed.contiguous(), scale.contiguous(),
                                           None if zero is None else zero.contiguous(), bias, int(bits),
                                           int(group_size), int(in_features), int(out_features), bool(dynamic_act))

