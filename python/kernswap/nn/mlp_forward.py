"""The SiLU-gated MLP of a patched model in two quantized calls and one compiled SwiGLU.

A patched MLP (fused projections) runs: gate/up as one fused quantized call, then transformers' ``act_fn(gate) *
up`` (two elementwise torch ops over the (tokens, intermediate) activations: ~20 ms of a 512-token SmolLM2-135M
prefill on 2 cores, 8% of it) and ``down``. :class:`SwiGLUForward`, installed as the MLP instance's ``forward`` by
``kernswap.patch`` next to the decode path (patching/decode.py), computes silu(gate) * up in one pass over the fused
output (kernswap._C.swiglu_rows: the decode-layer kernel's SwiGLU, rows over threads). It takes fp32 CPU inference
calls of an MLP whose gate/up are one fused layer and whose activation is SiLU, with no hooks on those parts;
everything else (autograd, torch.compile, other dtypes, a replaced part) runs the class's forward unchanged.
"""
import torch
import torch.nn as nn

from .. import _ext
from ..backends.cpu import extent
from ._parts import hooked, is_silu
from .decode_layer import _fused_of

__all__ = ["MLP_CLASSES", "SwiGLUForward", "swiglu_parts"]

# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP")


def swiglu_parts(mlp: nn.Module):
    """(fused gate/up layer, down) of an MLP whose SwiGLU this path computes, else None (read from ``_modules``)."""
    mm = mlp._modules
    gate, up, act, down = (mm.get(n) for n in ("gate_proj", "up_proj", "act_fn", "down_proj"))
    fused = _fused_of(gate, up) if gate is not None and up is not None else None
    if (fused is None or down is None or not is_silu(act) or gate.out_features != up.out_features
            or any(hooked(m) for m in (gate, up, act))):
        return None
    return fused, down


class SwiGLUForward:
    """``mlp.forward``: down(swiglu(gate_up(x))) with the SiLU-mul compiled; other calls go to the class's forward."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp
        self.enabled = True  # kernswap.set_decode_path turns it off with the decode path

    def original(self, *args, **kwargs):
        return type(self.mlp).forward(self.mlp, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        if (not self.enabled or type(x) is not torch.Tensor or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.dim() < 1 or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)):
            return self.original(*args, **kwargs)
        parts = swiglu_parts(self.mlp)
        if parts is None:
            return self.original(*args, **kwargs)
        fused, down = parts
        gu = fused(x)
        inter = fused.out_features // 2
        if gu.dtype != torch.float32 or not gu.is_contiguous():
            return down(self.mlp.act_fn(gu[..., :inter]) * gu[..., inter:])
        m = gu.numel() // max(1, gu.shape[-1])
        out = torch.empty(*gu.shape[:-1], inter)
        _ext.get_C().swiglu_rows(m, inter, gu.data_ptr(), extent(gu), 2 * inter, out.data_ptr(), out.numel(), inter,
                                 torch.get_num_threads())
        return down(out)
