"""CPU backend: the compiled kernswap._C module (AVX-512 VNNI / AVX2 / scalar picked at run time)."""
from typing import Optional, Tuple

import torch

from .. import _ext

__all__ = ["available", "supports", "quantized_linear", "prepare", "DTYPE_CODES"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available(entry: str = "qlinear") -> Tuple[bool, str]:
    """(True, "") when kernswap._C is importable and has the kernel ``entry``, else (False, reason). The other CPU
    backends (attention_cpu, moe_cpu) ask the same question for their own kernel."""
    reason = _ext.cpu_ext_reason(entry)
    return (not reason, reason)


def supports(x2d: torch.Tensor, bits: int, group_size: int, dynamic_act: bool) -> bool:
    """Every format on CPU tensors of fp32/bf16/fp16 whose rows are contiguous."""
    return (x2d.device.type == "cpu" and x2d.dtype in DTYPE_CODES and x2d.dim() == 2
            and (x2d.shape[1] <= 1 or x2d.stride(1) == 1) and bits in (4, 8))


def quantized_linear(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                     out_features: int, dynamic_act: bool) -> torch.Tensor:
    """(M, N) in x2d.dtype. Inputs validated by kernswap.ops; we only make the pointers safe to pass."""
    run = prepare(packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act)
    if run is None:
        raise RuntimeError(f"kernswap cpu backend unavailable: {_ext.cpu_ext_reason()}")
    return run(x2d)


def prepare(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            bits: int, group_size: int, in_features: int, out_features: int, dynamic_act: bool):
    """A runner ``run(x2d) -> y`` for one layer's packed weight (validated, on the CPU): the weight-side
    conversions and pointers are done once here instead of on every call (QuantLinear keeps the runner).
    ``x2d`` is an (M, K) fp32/bf16/fp16 CPU tensor. Returns None without the compiled module.
    The runner holds references to every tensor its pointers point into."""
    C = _ext.get_C()
    if C is None:
        return None
    packed = packed.contiguous()
    scale = scale.to(torch.float32).contiguous()
    zero = None if zero is None else zero.to(torch.uint8).contiguous()
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    ptrs = (packed.data_ptr(), int(bits), int(group_size), int(out_features), scale.data_ptr(),
            0 if zero is None else zero.data_ptr(), 0 if bias is None else bias.data_ptr())
    qlinear, codes, k, n, dyn = C.qlinear, DTYPE_CODES, int(in_features), int(out_features), bool(dynamic_act)

    def run(x2d: torch.Tensor) -> torch.Tensor:
        m = x2d.shape[0]
        y = torch.empty(m, n, dtype=x2d.dtype)
        if m == 0:
            return y
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        code = codes[x2d.dtype]
        qlinear(x2d.data_ptr(), code, m, k, x2d.stride(0), *ptrs, y.data_ptr(), code, n, dyn,
                torch.get_num_threads())
        return y

    run.keep = (packed, scale, zero, bias)
    return run
