"""Triton kernels for kernswap's int8 / int4 quantized linear (see SPEC "Quantized weight formats").

One parameterised GEMM kernel family, ``qlinear_kernel``, reads the packed layouts directly:

* int8 ("16n x 4k" VNNI tiles): byte ``t*stride_wt + (k//4)*64 + (n%16)*4 + k%4`` holds q[n, k], t = n//16.
* int4: byte ``t*stride_wt + (k//8)*64 + (n%16)*4 + j`` holds q[n, (k//8)*8 + j] (low nibble) and
  q[n, (k//8)*8 + 4 + j] (high nibble).  The kernel loads a byte tile [BLOCK_K/2, BLOCK_N] once, stacks
  (low nibbles; high nibbles) into a [BLOCK_K, BLOCK_N] operand and loads x at the matching permuted k
  (the order of the reduction over k is irrelevant, only the pairing matters); one dot with K >= 32,
  which int8 x int8 dots need.

Constexpr flags select weight-only (x in fp16/bf16/fp32, ``dot`` in x's dtype with fp32 accumulation;
``q - z`` is exact in every activation dtype, so the group scale is applied once per group to the
fp32 partial sum) or dynamic-activation (x already quantized by ``quantize_rows_kernel`` to int8 +
per-row scale; int8 x int8 -> int32 dots, exact int32 per-group sums rescaled by the group scale,
then by the row scale, exactly the reference's order).  BLOCK_K divides the group size for int4
(groups are processed one at a time), int8 has a single group = the whole row with a K tail mask.

The module imports without triton: ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from ._triton_common import HAS_TRITON, TRITON_IMPORT_ERROR, AOTVariant, tl, triton  # noqa: F401
from ._triton_common import PTR_TYPES as _DT

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "KernelConfig", "pick_config", "launch_quantized_linear",
           "aot_variants"]


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Autotune-free defaults, chosen by M.  BLOCK_N is a multiple of 16 (one packed tile row = 16 n).
# BLOCK_K = 64 (int4: min(64, G), so it divides the group) keeps the number of compiled variants small.
_SMALL_M = KernelConfig(16, 32, 64, 4, 4)     # decode, M <= 16: narrow N tiles -> many programs, deep pipeline
_LARGE_M = KernelConfig(128, 128, 64, 8, 3)   # prefill / batched, M > 16
_LARGE_M_FP32 = KernelConfig(64, 64, 32, 4, 2)  # fp32 activations: ieee fp32 dots (FMA), smaller tiles
QUANT_BLOCK = 1024                            # activation quantization: elements per step of a row


def pick_config(M: int, bits: int, group_size: int, fp32_dot: bool = False) -> KernelConfig:
    """Default tiles by M (no autotuning); fp32_dot: weight-only with fp32 activations."""
    cfg = _SMALL_M if M <= 16 else (_LARGE_M_FP32 if fp32_dot else _LARGE_M)
    if bits == 4:  # BLOCK_K must divide the group (G in 32/64/128)
        cfg = cfg._replace(block_k=min(cfg.block_k, group_size))
    return cfg


if HAS_TRITON:

    @triton.jit
    def _round_half_even(v):
        # exact for |v| < 2**23 (v - floor(v) is exact); no libdevice, so it also runs in the interpreter
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def quantize_rows_kernel(x_ptr, a_ptr, a_scale_ptr, K, stride_xm, stride_am, BLOCK: tl.constexpr):
        """Per row m: a = round_half_even(x * 127/amax) clamped to [-127, 127]; a_scale = amax/127.
        A row with a non-finite value gets a = 0 and a_scale = NaN (SPEC NaN policy for A8 paths)."""
        m = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, K, BLOCK):
            k = k0 + offs
            v = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            av = tl.abs(v)
            bad += ((v != v) | (av == float("inf"))).to(tl.int32)
            amax = tl.maximum(amax, tl.where(av == av, av, 0.0))
        row_amax = tl.max(amax, axis=0)
        nonfinite = tl.sum(bad, axis=0) > 0
        ok = (row_amax > 0.0) & (nonfinite == 0)
        safe = tl.where(ok, row_amax, 1.0)
        c127 = tl.full([], 127.0, tl.float32)
        inv = tl.where(ok, tl.math.div_rn(c127, safe), 0.0)
        a_scale = tl.math.div_rn(tl.where(ok, row_amax, 0.0), c127)
        a_scale = tl.where(nonfinite, float("nan"), a_scale)
        tl.store(a_scale_ptr + m, a_scale)
        for k0 in range(0, K, BLOCK):
            k = k0 + offs
            v = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            r = _round_half_even(tl.where(tl.abs(v) < float("inf"), v, 0.0) * inv)
            r = tl.minimum(tl.maximum(r, -127.0), 127.0)
            tl.store(a_ptr + m * stride_am + k, r.to(tl.int8), mask=k < K)

    @triton.jit
    def _dot(a, b, acc, DYNAMIC: tl.constexpr, X_FP32: tl.constexpr):
        if DYNAMIC:
            return tl.dot(a, b, acc, out_dtype=tl.int32)
        elif X_FP32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def qlinear_kernel(
        x_ptr, a_scale_ptr, w_ptr, scale_ptr, zero_ptr, zero_f_ptr, bias_ptr, y_ptr,
        M, N, K, group_size, has_zero, has_bias,
        stride_xm, stride_wt, stride_sg, stride_ym,
        BITS: tl.constexpr, DYNAMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[M, N] = dequant(x) @ dequant(W).T (+ bias).  x_ptr: activations (weight-only) or the int8
        rows of quantize_rows_kernel (DYNAMIC, with a_scale_ptr).  BITS=4: BLOCK_K divides group_size.
        has_zero: 0 symmetric (zero 8), 1 uint8 zero-points (zero_ptr), 2 fp32 float zero-points (zero_f_ptr:
        the dot runs on the raw codes and z * sum(x) is subtracted per group)."""
        X_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # packed tile row of n, and the byte offset of n inside a 64-byte (16 n x 4 bytes) k-step
        w_row = w_ptr + (offs_n // 16).to(tl.int64) * stride_wt + (offs_n % 16) * 4
        x_row = x_ptr + offs_m.to(tl.int64) * stride_xm
        if BITS == 8:
            KB: tl.constexpr = BLOCK_K
        else:
            KB: tl.constexpr = BLOCK_K // 2
        offs_i = tl.arange(0, KB)
        if DYNAMIC:
            OP_TY: tl.constexpr = tl.int8
            ACC_TY: tl.constexpr = tl.int32
        else:
            OP_TY: tl.constexpr = x_ptr.dtype.element_ty
            ACC_TY: tl.constexpr = tl.float32
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        num_groups = K // group_size
        for g in range(0, num_groups):
            s = tl.load(scale_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)
            zf = tl.zeros([1, BLOCK_N], dtype=tl.float32)
            if BITS == 4:  # has_zero is a run-time flag (one compiled variant for sym and both asym forms)
                z = tl.full([1, BLOCK_N], 8, tl.int32)
                if has_zero == 1:
                    z = tl.load(zero_ptr + g * stride_sg + offs_n, mask=n_mask, other=8).to(tl.int32)[None, :]
                if has_zero == 2:
                    z = tl.zeros([1, BLOCK_N], dtype=tl.int32)
                    zf = tl.load(zero_f_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)[None, :]
            xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_TY)
            for k0 in range(g * group_size, g * group_size + group_size, BLOCK_K):
                if BITS == 8:
                    k = k0 + offs_i
                    k_mask = k < K
                    xt = tl.load(x_row[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
                    wq = tl.load(w_row[None, :] + ((k // 4) * 64 + k % 4)[:, None],
                                 mask=k_mask[:, None] & n_mask[None, :], other=0)
                    part = _dot(xt, wq.to(OP_TY), part, DYNAMIC, X_FP32)
                else:
                    # byte i of a k-step pair holds k = ko*8 + j (low) and ko*8 + 4 + j (high), i = ko'*4 + j.
                    # Unpack to [BLOCK_K, BLOCK_N] as (lows; highs) and load x at the matching k.
                    byte_off = (k0 // 8) * 64 + (offs_i // 4) * 64 + offs_i % 4
                    wb = tl.load(w_row[None, :] + byte_off[:, None], mask=n_mask[None, :], other=0).to(tl.int32)
                    wq = tl.join((wb & 15) - z, (wb >> 4) - z).permute(2, 0, 1).reshape(BLOCK_K, BLOCK_N)
                    offs_p = tl.arange(0, BLOCK_K)
                    k = k0 + ((offs_p % KB) // 4) * 8 + offs_p % 4 + (offs_p // KB) * 4
                    xt = tl.load(x_row[:, None] + k[None, :], mask=m_mask[:, None], other=0)
                    part = _dot(xt, wq.to(OP_TY), part, DYNAMIC, X_FP32)
                    if has_zero == 2:
                        xsum += tl.sum(xt.to(tl.float32), axis=1)
            acc += (part.to(tl.float32) - xsum[:, None] * zf) * s[None, :]
        if DYNAMIC:
            a_s = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
            acc = acc * a_s[:, None]
        if has_bias != 0:
            b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
            acc = acc + b[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def launch_quantized_linear(x2d, packed, scale, zero, bias, bits: int, group_size: int, in_features: int,
                            out_features: int, dynamic_act: bool, config: Optional[KernelConfig] = None):
    """Allocate the output and launch (the backend validated the inputs).  bias: fp32 [N] or None."""
    import torch

    if not HAS_TRITON:
        raise RuntimeError(f"triton is not available: {TRITON_IMPORT_ERROR}")
    M, K = x2d.shape
    N = out_features
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    cfg = config or pick_config(M, bits, group_size, x2d.dtype == torch.float32 and not dynamic_act)
    a_scale = scale  # dummy pointer when not dynamic
    xin = x2d
    if dynamic_act:
        xin = torch.empty((M, K), dtype=torch.int8, device=x2d.device)
        a_scale = torch.empty((M,), dtype=torch.float32, device=x2d.device)
        quantize_rows_kernel[(M,)](x2d, xin, a_scale, K, x2d.stride(0), xin.stride(0),
                                   BLOCK=min(QUANT_BLOCK, triton.next_power_of_2(K)))
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    has_zero = 0 if zero is None else (2 if zero.dtype == torch.float32 else 1)
    qlinear_kernel[grid](
        xin, a_scale, packed, scale, zero if has_zero == 1 else packed.view(torch.uint8),
        zero if has_zero == 2 else scale, bias if bias is not None else scale, y,
        M, N, K, group_size if bits == 4 else K, has_zero, int(bias is not None),
        xin.stride(0), packed.stride(0), scale.stride(0), y.stride(0),
        BITS=bits, DYNAMIC=bool(dynamic_act),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y



def aot_variants(dtypes=("fp16", "bf16", "fp32")) -> Iterator[AOTVariant]:
    """Every (kernel, constexpr) combination launch_quantized_linear can use, for ahead-of-time compiles."""
    if not HAS_TRITON:
        return
    for dt in dtypes:
        yield AOTVariant(f"quantize_rows[{dt}]", quantize_rows_kernel,
                         {"x_ptr": _DT[dt], "a_ptr": "*i8", "a_scale_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                          "stride_am": "i32", "BLOCK": "constexpr"}, {"BLOCK": QUANT_BLOCK}, 4, 1)
    seen = set()
    for bits in (8, 4):
        for dynamic in (False, True):
            for group in ((None,) if bits == 8 else (32, 64, 128)):
                for M in (1, 17):  # one representative M per default config
                    for dt in dtypes:
                        cfg = pick_config(M, bits, group or 0, dt == "fp32" and not dynamic)
                        const = dict(BITS=bits, DYNAMIC=dynamic, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                     BLOCK_K=cfg.block_k)
                        key = (dt, tuple(const.values()))
                        if key in seen:
                            continue
                        seen.add(key)
                        sig = {"x_ptr": "*i8" if dynamic else _DT[dt], "a_scale_ptr": "*fp32",
                               "w_ptr": "*i8" if bits == 8 else "*u8", "scale_ptr": "*fp32", "zero_ptr": "*u8", "zero_f_ptr": "*fp32",
                               "bias_ptr": "*fp32", "y_ptr": _DT[dt], "M": "i32", "N": "i32", "K": "i32",
                               "group_size": "i32", "has_zero": "i32", "has_bias": "i32", "stride_xm": "i32",
                               "stride_wt": "i32", "stride_sg": "i32", "stride_ym": "i32"}
                        sig.update({k: "constexpr" for k in const})
                        name = f"qlinear[w{bits}{'a8' if dynamic else ''},{dt},{cfg.block_m}x{cfg.block_n}x{cfg.block_k}]"
                        yield AOTVariant(name, qlinear_kernel, sig, const, cfg.num_warps, cfg.num_stages)
