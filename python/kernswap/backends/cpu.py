"""CPU backend: the compiled kernswap._C module (AVX-512 VNNI / AVX2 / scalar picked at run time)."""
import threading
from typing import Optional, Tuple

import torch

from .. import _ext

__all__ = ["available", "supports", "quantized_linear", "prepare", "DTYPE_CODES", "dense_from_rows", "tier_note",
           "extent"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Weight-only formats: from this many rows on, the runner dequantizes panels of the weight (kernswap._C.qdequant)
# and runs torch's fp32 GEMM on them instead of kernswap's kernel. Per kernel tier of the quantized-linear op, per
# weight bits; None: never (the AVX-512 VNNI engine stays faster than the fp32 GEMM at every M). Measured on an
# AVX2 EPYC (2 threads, bench/qlinear_fma_sweep.py): the avx2 tier's fp32 FMA kernel (from 8 / 16 rows, below
# that the integer engine) beats the panels up to ~128 rows on 4096 x 4096 and the 576/1536-wide SmolLM2 shapes,
# at 256 the two are within noise; the scalar engine (plain loops) loses to the panels from 2 rows on but wins at
# 1 (no panel to dequantize).
# avx_vnni runs avx2's FMA kernel (same row count); avx512 (Skylake-SP) runs the 512-bit FMA kernel, which the
# panels beat only from ~512 rows (Xeon forced to the tier: 4096 x 4096 M = 512 panels 0.85-0.93x F.linear vs
# 0.77-0.85x for the FMA kernel; at M <= 256 the FMA kernel is ahead). amx runs weight-only calls on avx512_vnni's
# engine.
DENSE_FROM_ROWS = {"amx": {8: None, 4: None}, "avx512_vnni": {8: None, 4: None}, "avx512": {8: 512, 4: 512},
                   "avx_vnni": {8: 192, 4: 192}, "avx2": {8: 192, 4: 192}, "scalar": {8: 2, 4: 2}}
# fp32 bytes of one dequantized panel (kept in the last-level cache while the GEMM reads it)
_PANEL_BYTES = 4 << 20
_scratch = threading.local()


def _panel_buffer(numel: int) -> torch.Tensor:
    """A per-thread fp32 scratch of at least ``numel`` elements (<= one panel, 4 MiB), reused across calls and layers
    instead of a fresh multi-MiB allocation per call."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel)
    return buf[:numel]


def extent(t: Optional[torch.Tensor]) -> int:
    """The element count every kernswap._C binding receives with a buffer and checks sizes and strides against
    (0 for None): t.numel() for a contiguous tensor (it holds that many from t.data_ptr()), else the elements of
    t's dtype from t.data_ptr() to the end of its storage (a strided view addresses past its numel)."""
    if t is None:
        return 0
    if t.is_contiguous():
        return t.numel()
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def cache_buffer_args(t: torch.Tensor) -> tuple:
    """A KV-cache buffer [B, H, capacity, D] as the decode bindings take it: pointer, extent, and its first three
    strides (the last is 1)."""
    return (t.data_ptr(), extent(t), *t.stride()[:3])


def rope_args(cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Contiguous cos and sin rows as the decode bindings take them: pointer and element count of each."""
    return cos.data_ptr(), cos.numel(), sin.data_ptr(), sin.numel()


def dense_from_rows(bits: int, isa: Optional[str] = None) -> Optional[int]:
    """Rows from which a weight-only call on tier ``isa`` (default: the qlinear tier in use) runs dequantized
    panels through torch's fp32 GEMM; None when it never does."""
    isa = isa or _ext.op_isa("qlinear") or "scalar"
    return DENSE_FROM_ROWS.get(isa, DENSE_FROM_ROWS["avx2"])[bits]


def available(entry: str = "qlinear") -> Tuple[bool, str]:
    """(True, "") when kernswap._C is importable and has the kernel ``entry``, else (False, reason). The other CPU
    backends (attention_cpu, moe_cpu) ask the same question for their own kernel."""
    reason = _ext.cpu_ext_reason(entry)
    return (not reason, reason)


def tier_note(bits: int, dynamic_act: bool) -> Optional[str]:
    """What `auto` does on this CPU for a format, for patch()'s report (None without the compiled module)."""
    isa = _ext.op_isa("qlinear")
    if isa is None:
        return None
    fmt = f"{'w' if dynamic_act else 'int'}{bits}{'a8' if dynamic_act else ''}"
    note = f"quantized linear ({fmt}) runs kernswap's {isa} CPU kernels (best tier here: {_ext.cpu_isa()})"
    rows = None if dynamic_act else dense_from_rows(bits, isa)
    if rows is not None:
        note += (f"; calls with >= {rows} rows run torch's fp32 GEMM on weight panels dequantized by kernswap "
                 f"(faster there on this tier)")
    return note


def supports(x2d: torch.Tensor, bits: int, group_size: int, dynamic_act: bool) -> bool:
    """Every format on 2-D CPU tensors of fp32/bf16/fp16 (rows that are not contiguous are copied first)."""
    return x2d.device.type == "cpu" and x2d.dtype in DTYPE_CODES and x2d.dim() == 2 and bits in (4, 8)


def quantized_linear(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                     out_features: int, dynamic_act: bool) -> torch.Tensor:
    """(M, N) in x2d.dtype. Inputs validated by kernswap.ops; we only make the pointers safe to pass."""
    run = prepare(packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act)
    if run is None:
        raise RuntimeError(f"kernswap cpu backend unavailable: {_ext.cpu_ext_reason()}")
    return run(x2d)


def weight_args(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], bits: int, group_size: int, out_features: int):
    """The weight side of a qlinear call, each buffer with its element count (the bindings check the sizes against
    them): (packed, packed_numel, bits, group_size, N, scale, scale_numel, zero, zero_numel, zero_is_float, bias,
    bias_numel), and the tensors the pointers point into, as the kernels read them (contiguous, fp32 scale and bias,
    uint8 or fp32 zero-points: no copy when they already are)."""
    packed = packed.contiguous()
    scale = scale.to(torch.float32).contiguous()
    # integer zero-points stay uint8, float ones are read as fp32 (formats.base.zero_dtypes)
    zero = None if zero is None else zero.to(torch.float32 if zero.is_floating_point() else torch.uint8).contiguous()
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    wz = (0, 0, False) if zero is None else (zero.data_ptr(), extent(zero), zero.dtype == torch.float32)
    wb = (0, 0) if bias is None else (bias.data_ptr(), extent(bias))
    ptrs = (packed.data_ptr(), extent(packed), int(bits), int(group_size), int(out_features), scale.data_ptr(),
            extent(scale), *wz, *wb)
    return ptrs, (packed, scale, zero, bias)


def prepare(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            bits: int, group_size: int, in_features: int, out_features: int, dynamic_act: bool):
    """A runner ``run(x2d) -> y`` for one layer's packed weight (validated, on the CPU): the weight-side
    conversions and pointers are done once here instead of on every call (QuantLinear keeps the runner).
    ``x2d`` is an (M, K) fp32/bf16/fp16 CPU tensor. Returns None without the compiled module.
    The runner holds references to every tensor its pointers point into."""
    C = _ext.get_C()
    if C is None:
        return None
    ptrs, (packed, scale, zero, bias) = weight_args(packed, scale, zero, bias, bits, group_size, out_features)
    qlinear, codes, k, n, dyn = C.qlinear, DTYPE_CODES, int(in_features), int(out_features), bool(dynamic_act)
    panel = max(16, min((n + 15) // 16 * 16, _PANEL_BYTES // (4 * k) // 16 * 16))
    deq = (C.qdequant, *ptrs[:5], k, *ptrs[5:10])  # (packed, bits, group, N), K, (scale, zero)

    def dense(x2d: torch.Tensor) -> torch.Tensor:
        """fp32 GEMM on dequantized panels of at most `panel` weight rows."""
        xf = x2d.to(torch.float32)
        buf = _panel_buffer(min(panel, n) * k).view(-1, k)
        y = torch.empty(x2d.shape[0], n)
        for n0 in range(0, n, panel):
            n1 = min(n, n0 + panel)
            deq[0](*deq[1:], n0, n1, buf.data_ptr(), buf.numel(), k, torch.get_num_threads())
            w = buf[:n1 - n0].t()
            if n1 - n0 == n:
                torch.mm(xf, w, out=y) if bias is None else torch.addmm(bias, xf, w, out=y)
            else:
                y[:, n0:n1] = torch.mm(xf, w) if bias is None else torch.addmm(bias[n0:n1], xf, w)
        return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)

    def run(x2d: torch.Tensor) -> torch.Tensor:
        m = x2d.shape[0]
        if not dyn and m > 1:
            rows = dense_from_rows(bits)
            if rows is not None and m >= rows:
                return dense(x2d)
        y = torch.empty(m, n, dtype=x2d.dtype)
        if m == 0:
            return y
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        code = codes[x2d.dtype]
        qlinear(x2d.data_ptr(), extent(x2d), code, m, k, x2d.stride(0), *ptrs, y.data_ptr(), y.numel(), code, n, dyn,
                torch.get_num_threads())
        return y

    run.keep = (packed, scale, zero, bias)
    return run
