"""block_sparse_attention: public functional API, the single torch op declaration and the backend table.

    kernswap.ops.block_sparse_attention(q, k, v, block_mask, ...)   checks inputs
      -> torch.ops.kernswap.block_sparse_attention(...)              declared once here (schema + fake kernel)
           "cpu"  -> backends/attention_cpu.py (kernswap._C: tiled online softmax, pruned blocks skipped)
           "cuda" -> backends/attention_triton.py (FlashAttention-style Triton kernel with block skipping)
           else   -> reference/block_sparse_attention.py (dense SDPA-like attention with the element mask)
"""
import math
from typing import Optional, Tuple, Union

import torch

from ..backend import Backend
from ..reference.block_sparse_attention import block_sparse_attention_ref
from ._checks import check_backend, require
from ._dispatch import BackendTable, eager_fast_path

__all__ = ["block_sparse_attention", "choose_attention_backend", "HEAD_DIMS", "check_args", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128, 256)
TABLE = BackendTable(
    "block_sparse_attention",
    {"cpu": "kernswap.backends.attention_cpu", "triton": "kernswap.backends.attention_triton"},
    {"cpu": ("cpu",), "cuda": ("triton",)})
BACKENDS = TABLE.names()  # what SparseAttentionConfig.backend may be


def choose_attention_backend(q, k, v, block_mask, block_size: int, causal: bool,
                             requested: Union[str, Backend] = Backend.AUTO):
    """(backend name, module or None for the reference, reasons earlier candidates were skipped)."""
    desc = (f"q {list(q.shape)} {q.dtype} on {q.device.type}, k {list(k.shape)}, block_size={block_size}, "
            f"causal={causal}")
    return TABLE.choose(q.device.type, lambda mod: mod.supports(q, k, v, block_mask, block_size, causal), desc,
                        requested)


# ------------------------------------------------------------------------------------------ the checks
OP = "torch.ops.kernswap.block_sparse_attention"


def _check(cond, msg: str, exc=ValueError, fn: str = "block_sparse_attention") -> None:
    require(cond, exc, lambda: f"{fn}: {msg}")


def check_args(fn: str, q, k, v, block_mask, block_size, causal, scale, backend) -> Backend:
    """The op's one checking function (wrapper: fn "block_sparse_attention"; registered op and fake kernel: fn OP):
    every shape, dtype, device and size relation the kernels rely on. Returns the backend."""
    for name, t in (("q", q), ("k", k), ("v", v), ("block_mask", block_mask)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError, fn)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.dim() == 4, f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {list(t.shape)}",
               fn=fn)
        _check(t.dtype in _FLOAT_DTYPES, f"{name}.dtype must be torch.float32, torch.bfloat16 or torch.float16, "
               f"got {t.dtype}", TypeError, fn)
    _check(k.dtype == q.dtype and v.dtype == q.dtype,
           f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError, fn)
    _check(k.device == q.device and v.device == q.device and block_mask.device == q.device,
           f"q, k, v and block_mask must be on one device, got {q.device}, {k.device}, {v.device}, "
           f"{block_mask.device}", fn=fn)
    b, hq, sq, d = q.shape
    _check(k.shape == v.shape, f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}",
           fn=fn)
    _check(k.shape[0] == b and k.shape[3] == d,
           f"k must be (B={b}, Hkv, Sk, D={d}) to match q {list(q.shape)}, got {list(k.shape)}", fn=fn)
    hkv, sk = k.shape[1], k.shape[2]
    _check(hkv > 0 and hq % hkv == 0, f"q heads ({hq}) must be a multiple of k/v heads ({hkv})", fn=fn)
    _check(isinstance(block_size, int) and not isinstance(block_size, bool) and 16 <= block_size <= 256
           and block_size % 16 == 0, f"block_size must be an int in [16, 256] that is a multiple of 16, "
           f"got {block_size!r}", fn=fn)
    _check(isinstance(causal, bool), f"causal must be a bool, got {causal!r}", TypeError, fn)
    _check(not causal or sq <= sk, f"causal attention needs Sq <= Sk (queries are aligned to the end of the "
           f"keys), got Sq={sq}, Sk={sk}", fn=fn)
    _check(isinstance(scale, (int, float, torch.SymFloat)) and not isinstance(scale, bool)
           and (torch.compiler.is_compiling() or math.isfinite(scale)),  # (traced: the op's run checks it)
           f"scale must be a finite float or None, got {scale!r}", TypeError, fn)
    _check(block_mask.dtype == torch.bool, f"block_mask.dtype must be torch.bool, got {block_mask.dtype}",
           TypeError, fn)
    nqb, nkb = -(-sq // block_size), -(-sk // block_size)
    ok = block_mask.dim() == 4 and block_mask.shape[0] in (1, b) and block_mask.shape[1] in (1, hq) \
        and block_mask.shape[2] == nqb and block_mask.shape[3] == nkb
    _check(ok, f"block_mask must have shape (1 or {b}, 1 or {hq}, {nqb}, {nkb}) for Sq={sq}, Sk={sk}, "
           f"block_size={block_size}, got {list(block_mask.shape)}", fn=fn)
    return check_backend(fn, backend)


# ------------------------------------------------------------------------------------------ the op
@torch.library.custom_op("kernswap::block_sparse_attention", mutates_args=())
def _bsa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int,
            causal: bool, scale: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _checked_run(q, k, v, block_mask, block_size, causal, scale, backend)


def _checked_run(q, k, v, block_mask, block_size, causal, scale, backend):
    check_args(OP, q, k, v, block_mask, block_size, causal, scale, backend)
    return _run(q, k, v, block_mask, block_size, causal, scale, backend)


def _run(q, k, v, block_mask, block_size, causal, scale, backend):
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to attend: zeros and -inf, NaN for a non-finite q row
        bad = ~torch.isfinite(q).all(-1)
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device).masked_fill(bad.unsqueeze(-1), math.nan)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device).masked_fill(bad, math.nan)
        return out, lse
    _, mod, _ = choose_attention_backend(q, k, v, block_mask, block_size, causal, backend)
    if mod is None:
        return block_sparse_attention_ref(q, k, v, block_mask, block_size, causal, scale)
    return mod.block_sparse_attention(q, k, v, block_mask, block_size, causal, scale)


@_bsa_op.register_fake
def _bsa_fake(q, k, v, block_mask, block_size, causal, scale, backend):
    check_args(OP, q, k, v, block_mask, block_size, causal, scale, backend)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, block_mask, block_size, causal, scale, _ = inputs
    ctx.save_for_backward(q, k, v, block_mask)
    ctx.meta = (block_size, causal, scale)


def _backward(ctx, grad_out, grad_lse):
    """Gradients through the reference (dense masked attention in fp32): correct, not fast; training with
    block-sparse attention is not what this op is built for."""
    q, k, v, block_mask = ctx.saved_tensors
    block_size, causal, scale = ctx.meta
    with torch.enable_grad():
        qs, ks, vs = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        out, lse = block_sparse_attention_ref(qs, ks, vs, block_mask, block_size, causal, scale)
        outs, grads = [out], [grad_out.float()]
        if grad_lse is not None:
            fin = torch.isfinite(lse)
            outs.append(torch.where(fin, lse, torch.zeros_like(lse)))
            grads.append(torch.where(fin, grad_lse.float(), torch.zeros_like(grad_lse, dtype=torch.float32)))
        gq, gk, gv = torch.autograd.grad(outs, (qs, ks, vs), grads, allow_unused=True)
    cast = lambda g, t: None if g is None else g.to(t.dtype)  # noqa: E731
    return cast(gq, q), cast(gk, k), cast(gv, v), None, None, None, None, None


_bsa_op.register_autograd(_backward, setup_context=_setup_context)
_bsa_op.register_kernel("cpu")(_checked_run)
_bsa_op.register_kernel("cuda")(_checked_run)


# ------------------------------------------------------------------------------------------ public API
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                           block_size: int = 64, causal: bool = True, scale: Optional[float] = None,
                           backend: Optional[Union[str, Backend]] = "auto", return_lse: bool = False):
    """Attention over the kept (query block, key block) pairs only; pruned pairs are never computed.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq a multiple of Hkv (grouped-query heads); D in 64/128/256
      (other sizes run on the reference); fp32, bf16 or fp16, all the same dtype and device.
    block_mask: bool (B or 1, Hq or 1, ceil(Sq / block_size), ceil(Sk / block_size)); entry [b, h, i, j] keeps
      query block i (rows i*block_size ... in q's own index) against key block j.
    causal: mask inside the kept blocks too, with the queries aligned to the END of the keys: query row i sits
      at position i + Sk - Sq, so decoding with a KV cache (Sq < Sk) works. Needs Sq <= Sk.
    scale: softmax scale, default 1/sqrt(D).
    A query row whose kept blocks hold no visible key returns zeros (and lse = -inf). A row whose q row, or the
      k or v row of a key it sees, holds a NaN or an Inf returns NaN (and lse = NaN); keys a row does not see
      never affect it.
    Returns out (B, Hq, Sq, D) in q.dtype, or (out, lse) with ``return_lse=True`` (lse: (B, Hq, Sq) float32,
    natural log of the softmax denominator).
    backend: "auto" | "cpu" | "triton" | "reference".
    """
    fn = "block_sparse_attention"
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] > 0 else 1.0
    req = check_args(fn, q, k, v, block_mask, block_size, causal, scale, backend)
    _check(isinstance(return_lse, bool), f"return_lse must be a bool, got {return_lse!r}", TypeError)
    q, k, v = (t if t.numel() == 0 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_mask = block_mask.contiguous()
    op = _run if eager_fast_path(q, k, v) else torch.ops.kernswap.block_sparse_attention
    out, lse = op(q, k, v, block_mask, block_size, causal, float(scale), req.value)
    return (out, lse) if return_lse else out
