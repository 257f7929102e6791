"""CPU backend: the compiled kernswap._C module (AVX-512 VNNI / AVX2 / scalar picked at run time)."""
from typing import Optional, Tuple

import torch

from .. import _ext

__all__ = ["available", "supports", "quantized_linear", "prepare", "DTYPE_CODES"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> Tuple[bool, str]:
    """(True, "") when kernswap._C is importable and has qlinear, else (False, reason)."""
    reason = _ext.cpu_ext_reason()
    return (not reason, reason)


def supports(x2d: torch.Tensor, bits: int, group_size: int, dynamic_act: bool) -> bool:
    """Every format on CPU tensors of fp32/bf16/fp16 whose rows are contiguous."""
    return (x2d.device.type == "cpu" and x2d.dtype in DTYPE_CODES and x2d.dim() == 2
            and (x2d.shape[1] <= 1 or x2d.stride(1) == 1) and bits in (4, 8))


def quantized_linear(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                     out_features: int, dynamic_act: bool) -> torch.Tensor:
    """(M, N) in x2d.dtype. Inputs validated by kernswap.ops; we only make the pointers safe to pass."""
    C = _ext.get_C()
    if C is None:
        raise RuntimeError(f"kernswap cpu backend unavailable: {_ext.cpu_ext_reason()}")
    m = x2d.shape[0]
    y = torch.empty(m, out_features, dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    packed = packed.contiguous()
    scale = scale.to(torch.float32).contiguous()
    zero_c = None if zero is None else zero.to(torch.uint8).contiguous()
    bias_c = None if bias is None else bias.to(torch.float32).contiguous()
    code = DTYPE_CODES[x2d.dtype]
    C.qlinear(
        x2d.data_ptr(), code, m, in_features, x2d.stride(0),
        packed.data_ptr(), int(bits), int(group_size), out_features,
        scale.data_ptr(), 0 if zero_c is None else zero_c.data_ptr(),
        0 if bias_c is None else bias_c.data_ptr(),
        y.data_ptr(), code, y.stride(0), bool(dynamic_act), int(torch.get_num_threads()),
    )
    return y


def prepare(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            bits: int, group_size: int, in_features: int, out_features: int, dynamic_act: bool):
    """A runner ``run(x2d) -> y`` for one layer's packed weight (already validated, contiguous, on the CPU):
    the weight-side conversions and pointers are done once here instead of on every call. ``x2d`` must be a
    contiguous (M, K) fp32/bf16/fp16 CPU tensor with M >= 1. Returns None without the compiled module.
    The caller keeps the tensors alive and builds a new runner when any of them changes."""
    C = _ext.get_C()
    if C is None:
        return None
    bias_c = None if bias is None else bias.detach().to(torch.float32).contiguous()
    ptrs = (packed.data_ptr(), int(bits), int(group_size), int(out_features), scale.data_ptr(),
            0 if zero is None else zero.data_ptr(), 0 if bias_c is None else bias_c.data_ptr())
    qlinear, codes, k, n, dyn = C.qlinear, DTYPE_CODES, int(in_features), int(out_features), bool(dynamic_act)
    keep = (packed, scale, zero, bias_c)

    def run(x2d: torch.Tensor) -> torch.Tensor:
        m = x2d.shape[0]
        y = torch.empty(m, n, dtype=x2d.dtype)
        code = codes[x2d.dtype]
        qlinear(x2d.data_ptr(), code, m, k, k, ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], ptrs[6],
                y.data_ptr(), code, n, dyn, torch.get_num_threads())
        return y

    run.keep = keep  # the runner owns references to everything its pointers point into
    return run
