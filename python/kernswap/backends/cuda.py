"""CUDA C++ backend (kernswap._C_cuda): fast small-M (decode, M <= 16) weight-only GEMV for bf16/fp16.

The compiled module is torch-free; this file passes data_ptr() integers, strides and the current stream.
"""
import importlib
from typing import Optional, Tuple

import torch

from .cpu import extent

__all__ = ["available", "supports", "quantized_linear", "MAX_M"]

MAX_M = 16
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}
_module = None
_import_error = ""


def _load():
    global _module, _import_error
    if _module is None and not _import_error:
        try:
            _module = importlib.import_module("kernswap._C_cuda")
        except Exception as exc:  # not built (no CUDA compiler at build time) or a broken build
            _import_error = f"{type(exc).__name__}: {exc}"
    return _module


def _aligned(t: torch.Tensor, align: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % align == 0 else t.clone()  # a fresh allocation is aligned


def available() -> Tuple[bool, str]:
    if _load() is None:
        return False, f"kernswap._C_cuda not built ({_import_error})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def supports_format(bits: int, group_size: int, dynamic_act: bool) -> bool:
    """weight-only formats only (dynamic_activations=False): int8, int4 g32/64/128"""
    return not dynamic_act and (bits == 8 or (bits == 4 and group_size in (32, 64, 128)))


def supports(x2d: torch.Tensor, bits: int, group_size: int, dynamic_act: bool) -> bool:
    """Weight-only int8 / int4 (g32/64/128), bf16/fp16 CUDA activations, M <= 16."""
    if not supports_format(bits, group_size, dynamic_act):
        return False
    if not x2d.is_cuda or x2d.dtype not in _DTYPE_CODE or x2d.dim() != 2:
        return False
    if x2d.shape[0] > MAX_M:
        return False
    return bits == 8 or x2d.shape[1] % group_size == 0


def quantized_linear(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                     out_features: int, dynamic_act: bool) -> torch.Tensor:
    """(M, K) x packed weight -> (M, N) in x2d.dtype.  Inputs are validated by the op."""
    if dynamic_act:
        raise NotImplementedError("cuda backend: dynamic_act=True is not supported (use the triton backend)")
    mod = _load()
    if mod is None:
        raise RuntimeError(f"cuda backend unavailable: kernswap._C_cuda not built ({_import_error})")
    x2d = x2d.contiguous()
    M, K = x2d.shape
    N = int(out_features)
    dev = x2d.device
    y = torch.empty((M, N), dtype=x2d.dtype, device=dev)
    if M == 0 or N == 0:
        return y
    packed = _aligned(packed, 16)  # 128-bit weight loads
    scale = _aligned(scale.to(torch.float32), 16)
    zero = None if zero is None else _aligned(zero, 16 if zero.is_floating_point() else 4)  # fp32: float4 loads
    if bias is not None:
        bias = bias.to(device=dev, dtype=torch.float32).contiguous()
    code = _DTYPE_CODE[x2d.dtype]
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        mod.qgemv(x2d.data_ptr(), extent(x2d), code, M, K, x2d.stride(0), packed.data_ptr(), extent(packed),
                  int(bits), int(group_size) if bits == 4 else K, N, scale.data_ptr(), extent(scale),
                  0 if zero is None else zero.data_ptr(), extent(zero), zero is not None and zero.is_floating_point(),
                  0 if bias is None else bias.data_ptr(),
                  extent(bias), y.data_ptr(), extent(y), code, y.stride(0), stream)
    return y
