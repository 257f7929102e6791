"""The decode step of a Llama-style decoder layer in two compiled calls (kernswap._C.decode_attn_in / _out).

A decode step (one new token per sequence) of a patched layer otherwise makes ~60 torch ops and module calls around
its 4 quantized matmuls: two RMSNorms, RoPE, SDPA and its reshapes, SiLU-mul, two residual adds. :class:`DecodeForward`,
installed as the layer instance's ``forward`` by ``kernswap.patch`` (fused projections on, patching/decode.py), runs
instead: norm -> fused q/k/v -> RoPE in one call, the model's own cache appends the keys and values, then attention
over the cache -> o_proj -> residual -> norm -> fused gate/up -> SiLU-mul -> down -> residual in a second. Every call
that is not such a step (prefill, a mask, bf16, autograd, torch.compile, another cache or attention kernel, layers not
quantized the way the kernel reads them) runs the layer's own forward unchanged.
"""
from typing import Optional

import torch
import torch.nn as nn

from .. import _ext
from ..backends.cpu import extent
from ._state import tensor_key
from .fused_linear import QuantLinearSlice
from .quant_linear import QuantLinear

__all__ = ["DecodeForward", "LAYER_CLASSES", "decode_parts"]

# decoder layers whose forward is: x + attn(norm(x)), then h + mlp(norm(h)), with RoPE'd attention and SiLU-gated MLP
# (Qwen3's also RMS-normalises each q and k head before RoPE: q_norm / k_norm over head_dim)
LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
# cache layers whose update() appends and returns every key the new token attends to when the model passes no mask
# (a sliding-window layer returns its window plus the new key: what SDPA without a mask attends to as well)
CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _fused_of(*slices) -> Optional[QuantLinear]:
    """The fused layer the consecutive ``slices`` cover row by row, in order, from row 0 to its last row."""
    if not all(isinstance(s, QuantLinearSlice) for s in slices):
        return None
    fused = slices[0].fused
    start = 0
    for s in slices:
        if s.fused is not fused or s.start != start:
            return None
        start = s.stop
    return fused if start == fused.out_features else None


def _is_rmsnorm(norm, size: int) -> bool:
    """An RMSNorm the kernel computes: fp32 weight of ``size`` elements, a float epsilon, the Llama-style class."""
    w = getattr(norm, "weight", None)
    return (type(norm).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dtype == torch.float32
            and w.device.type == "cpu" and tuple(w.shape) == (size,)
            and isinstance(getattr(norm, "variance_epsilon", None), float))


def decode_parts(layer: nn.Module):
    """(qkv, o, gate_up, down, attn, mlp) of a patched layer the decode kernel can run, else None."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return None
    try:
        qkv = _fused_of(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = _fused_of(mlp.gate_proj, mlp.up_proj)
        o, down = attn.o_proj, mlp.down_proj
    except AttributeError:
        return None
    if qkv is None or gate_up is None or type(o) is not QuantLinear or type(down) is not QuantLinear:
        return None
    if gate_up.bias is not None or down.bias is not None:
        return None
    qk_norms = [getattr(attn, a, None) for a in ("q_norm", "k_norm")]
    if any(n is not None for n in qk_norms) and not (
            all(_is_rmsnorm(n, attn.head_dim) for n in qk_norms)
            and qk_norms[0].variance_epsilon == qk_norms[1].variance_epsilon):  # the kernel takes one epsilon
        return None
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        return None
    return qkv, o, gate_up, down, attn, mlp


def _weight(mod: QuantLinear) -> tuple:
    """The binding's 14-tuple for a QuantLinear's buffers (fp32 bias), and the tensors it points into."""
    qw = mod.qweight
    zero, bias = qw.zero, mod.bias
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    t = (qw.packed.data_ptr(), extent(qw.packed), qw.bits, qw.group_size, qw.out_features, qw.in_features,
         qw.scale.data_ptr(), extent(qw.scale), 0 if zero is None else zero.data_ptr(), extent(zero),
         zero is not None and zero.is_floating_point(), 0 if bias is None else bias.data_ptr(), extent(bias),
         qw.dynamic_activations)
    return t, (qw.packed, qw.scale, zero, bias)


class DecodeForward:
    """``layer.forward`` for decode steps of a patched Llama-style layer; everything else goes to the class's
    forward. Holds no tensors of its own beyond a cache of the weights' pointers (rebuilt when a buffer changes)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.enabled = True  # kernswap.set_decode_path(model, False) sends every call to the class's forward
        self._cache = None

    def __getstate__(self):  # pickling / deepcopy of the model: the pointer cache stays behind
        return {"layer": self.layer, "enabled": self.enabled, "_cache": None}

    def original(self, *args, **kwargs):
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, hidden_states, *args, **kwargs):
        prepared = None if args or not self.enabled else self._prepared(hidden_states, kwargs)
        if prepared is None:
            return self.original(hidden_states, *args, **kwargs)
        return self._step(hidden_states, kwargs, *prepared)

    # ------------------------------------------------------------------ checks
    def _prepared(self, x: torch.Tensor, kwargs):
        """The prepared weights when this call is a decode step the kernel runs, else None."""
        if (torch.compiler.is_compiling() or torch.is_grad_enabled() or not isinstance(x, torch.Tensor)
                or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3 or x.shape[1] != 1
                or kwargs.get("attention_mask") is not None or kwargs.get("output_attentions")
                or not _ext.have_cpu_ext() or not hasattr(_ext.get_C(), "decode_attn_out")):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pe = kwargs.get("position_embeddings")
        if type(cache).__name__ != "DynamicCache" or not isinstance(pe, (tuple, list)) or len(pe) != 2:
            return None
        layer = self.layer
        parts = decode_parts(layer)
        if parts is None:
            return None
        qkv, o, gate_up, down, attn, mlp = parts
        idx = getattr(attn, "layer_idx", None)
        layers = getattr(cache, "layers", None)
        if idx is None or layers is None or (idx < len(layers) and type(layers[idx]).__name__ not in CACHE_LAYERS):
            return None
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        if impl not in ("sdpa", "eager", None):
            return None
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        mods = (qkv, o, gate_up, down)
        if any(m.config.backend.value not in ("auto", "cpu") or m.packed.device.type != "cpu" for m in mods):
            return None
        if not (_is_rmsnorm(n1, x.shape[-1]) and _is_rmsnorm(n2, x.shape[-1])):
            return None
        cos, sin = pe
        d = attn.head_dim
        if (cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.dim() != 3
                or cos.shape[0] not in (1, x.shape[0]) or cos.shape[1:] != (1, d) or sin.shape != cos.shape):
            return None
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        key = tensor_key(n1.weight, n2.weight, *(n.weight for n in (qn, kn) if n is not None), *(t for m in mods for t in (m.packed, m.scale, m.zero, m.bias))) + \
            tuple(id(m.config) for m in mods) + (id(_ext.get_C()),)
        if self._cache is None or self._cache[0] != key:
            ws = [_weight(m) for m in mods]
            self._cache = (key, [w for w, _ in ws], [k for _, k in ws] + [n1.weight.detach(), n2.weight.detach()])
        hq = attn.config.num_attention_heads
        hkv = attn.config.num_key_value_heads
        if qkv.in_features != x.shape[-1] or qkv.out_features != (hq + 2 * hkv) * d or o.in_features != hq * d:
            return None
        return self._cache[1], idx, hq, hkv, d

    # ------------------------------------------------------------------ the step
    def _step(self, x, kwargs, weights, idx, hq, hkv, d):
        C, layer = _ext.get_C(), self.layer
        w_qkv, w_o, w_gu, w_down = weights
        b, h = x.shape[0], x.shape[-1]
        x2 = x.reshape(b, h).contiguous()
        # one position for the whole batch (position_ids of one row) broadcasts like it does in the layer's RoPE
        cos, sin = (t.expand(b, 1, d).reshape(b, d).contiguous() for t in kwargs["position_embeddings"])
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        nq = (hq + 2 * hkv) * d
        nt = torch.get_num_threads()
        qkv = torch.empty(b, nq)
        qn, kn = getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)
        qk = (qn.weight.data_ptr(), d, kn.weight.data_ptr(), d, kn.variance_epsilon) if qn is not None else (0, 0, 0, 0, 0.)
        C.decode_attn_in(x2.data_ptr(), x2.numel(), b, h, n1.weight.data_ptr(), n1.weight.numel(),
                         n1.variance_epsilon, w_qkv, cos.data_ptr(), cos.numel(), sin.data_ptr(), sin.numel(), hq,
                         hkv, d, *qk, qkv.data_ptr(), qkv.numel(), nt)
        k = qkv[:, hq * d:(hq + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
        v = qkv[:, (hq + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        keys, values = cache.update(k, v, idx)
        if (keys.dtype != torch.float32 or values.dtype != torch.float32 or keys.dim() != 4
                or keys.shape[:2] != (b, hkv) or keys.shape[-1] != d or values.shape != keys.shape
                or keys.stride(-1) != 1 or values.stride(-1) != 1):
            raise RuntimeError(f"kernswap decode path: the cache returned keys {tuple(keys.shape)} {keys.dtype} / "
                               f"values {tuple(values.shape)} {values.dtype}, expected [{b}, {hkv}, L, {d}] fp32")
        inter = layer.mlp.down_proj.in_features
        out = torch.empty(b, h)
        attn = layer.self_attn
        C.decode_attn_out(x2.data_ptr(), x2.numel(), qkv.data_ptr(), qkv.numel(), nq, keys.data_ptr(), extent(keys),
                          *keys.stride()[:3], values.data_ptr(), extent(values), *values.stride()[:3],
                          keys.shape[2], b, h, hq, hkv, d, float(attn.scaling), w_o, n2.weight.data_ptr(),
                          n2.weight.numel(), n2.variance_epsilon, w_gu, w_down, inter, out.data_ptr(), out.numel(), nt)
        return out.view(b, 1, h)
