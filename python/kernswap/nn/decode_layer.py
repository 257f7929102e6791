"""The decode step of a Llama-style decoder layer in one compiled call (kernswap._C.DecodeLayerPlan.step; two,
kernswap._C.decode_attn_in / _out, around a cache layer that appends its keys itself).

A decode step (one new token per sequence) of a patched layer otherwise makes ~60 torch ops and module calls around
its 4 quantized matmuls: two RMSNorms, RoPE, SDPA and its reshapes, SiLU-mul, two residual adds. :class:`DecodeForward`,
installed as the layer instance's ``forward`` by ``kernswap.patch`` (fused projections on, patching/decode.py), runs
instead: norm -> fused q/k/v -> RoPE in one call, the keys and values go into the model's own cache (in place:
kv_append.py), then attention over the cache -> o_proj -> residual -> norm -> fused gate/up -> SiLU-mul -> down ->
residual in a second. Every call that is not such a step (prefill, a mask, bf16, autograd, torch.compile, another
cache or attention kernel, layers not quantized the way the kernel reads them) runs the layer's own forward unchanged.
"""
import operator
from typing import Optional

import torch
import torch.nn as nn

from .. import _ext
from ..backends.cpu import cache_buffer_args, rope_args, weight_args
from ..ops.decode_layer_step import register_layer
from ._parts import hook_dicts, is_silu
from ._state import tensor_key
from .decode_static import static_steps
from .fused_linear import QuantLinearSlice
from .kv_append import KVAppender
from .quant_linear import QuantLinear
from .sparse_attention import MODULE_ATTR, attends_densely

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
    if gate_up.bias is not None or down.bias is not None or not all(
            m.bias is None or (m.bias.dtype == torch.float32 and m.bias.is_contiguous()) for m in (qkv, o)):
        return None  # (the kernel reads the biases in place: fp32, contiguous)
    qk_norms = [getattr(attn, a, None) for a in ("q_norm", "k_norm")]
    if any(n is not None for n in qk_norms) and not (
            all(_is_rmsnorm(n, attn.head_dim) for n in qk_norms)
            and qk_norms[0].variance_epsilon == qk_norms[1].variance_epsilon):  # the kernel takes one epsilon
        return None
    if not all(_is_rmsnorm(getattr(layer, n, None), qkv.in_features)
               for n in ("input_layernorm", "post_attention_layernorm")):
        return None
    if not is_silu(getattr(mlp, "act_fn", None)):
        return None
    return qkv, o, gate_up, down, attn, mlp


def _weight(mod: QuantLinear) -> tuple:
    """The binding's weight tuple for a QuantLinear: qlinear's weight side (backends.cpu.weight_args), then K and
    dynamic_act; and the tensors it points into (the buffers themselves: decode_parts admits only fp32 contiguous
    biases, and the buffers are stored as the kernels read them)."""
    qw = mod.qweight
    ptrs, keep = weight_args(qw.packed, qw.scale, qw.zero, mod.bias, qw.bits, qw.group_size, qw.out_features)
    return (*ptrs, qw.in_features, qw.dynamic_activations), keep


def _attn_impl(config, impls: Optional[dict]):
    """config._attn_implementation (a config attribute read costs ~5 us through transformers' __getattribute__),
    read once per config object into ``impls`` when the caller checks several layers in one go."""
    if impls is None:
        return getattr(config, "_attn_implementation", None)
    key = id(config)  # (the configs stay alive while the caller holds the layers)
    if key not in impls:
        impls[key] = getattr(config, "_attn_implementation", None)
    return impls[key]


# where a layer keeps what its plan reads: (the owner's dict, key) for the parts below, the fused modules' configs,
# buffers and biases, and the norms' weights (_sources)
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "qkv_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn", "gate_up_proj")


def _replaced_parts(layer: nn.Module, attn: nn.Module, mlp: nn.Module, mods: tuple) -> list:
    """The modules whose computation one kernel call stands for: the layer's parts above and the fused layers."""
    found = [d.get(n) for d, names in ((layer._modules, _LAYER_PARTS), (attn._modules, _ATTN_PARTS),
                                       (mlp._modules, _MLP_PARTS)) for n in names] + list(mods)
    out = []
    for m in found:
        if isinstance(m, nn.Module) and all(m is not o for o in out):
            out.append(m)
    return out


def _sources(layer: nn.Module, attn: nn.Module, mlp: nn.Module, mods: tuple, norm_mods: tuple, parts: list) -> list:
    """(dict, key) of every object a plan is made from, straight from the modules' own dicts (no
    nn.Module.__getattr__): the plan holds while each entry still holds the same object. Covers a replaced part
    (a child module), a part's ``forward`` set on the instance (a wrapper the kernel would skip), attention config
    or sparse-attention setting, quantization config, buffer (``mod.packed = t``) or norm weight
    (``norm.weight = nn.Parameter(t)``); data moved (``.data = t``) or written in place shows in the objects'
    pointers and versions (_versions)."""
    return ([(layer._modules, n) for n in _LAYER_PARTS] + [(attn._modules, n) for n in _ATTN_PARTS]
            + [(attn.__dict__, "config"), (attn.__dict__, MODULE_ATTR)] + [(mlp._modules, n) for n in _MLP_PARTS]
            + [(m.__dict__, "forward") for m in parts] + [(m.__dict__, "config") for m in mods]
            + [(m._buffers, n) for m in mods for n in ("packed", "scale", "zero")]
            + [(m._parameters, "bias") for m in mods] + [(n._parameters, "weight") for n in norm_mods])


def _own_forward(f) -> bool:
    """No instance ``forward``, or one kernswap installed (the MLP's SwiGLUForward): the kernel computes what it
    would. Anything else (a user's or another library's wrapper) must run, so the kernel does not take the layer."""
    return f is None or type(f).__module__.startswith("kernswap.")


_DATA_PTR, _VERSION, _IS = torch.Tensor.data_ptr, operator.attrgetter("_version"), operator.is_  # (mapped over
# a layer's entries: C loops, well under 0.1 us an entry)


def _versions(tensors) -> tuple:
    """Where the tensors' data is now and how often it was written in place: the plan's pointers stay valid
    while this does not change (the plan holds the tensors, so their memory is never reused by another)."""
    try:
        return list(map(_DATA_PTR, tensors)), list(map(_VERSION, tensors))
    except RuntimeError:  # inference tensors keep no version counter
        return [tensor_key(t) for t in tensors], None


class _Plan:
    """What one layer's decode step passes to the kernels, prepared once per structure and weight state."""

    def __init__(self, layer: nn.Module, parts: tuple):
        qkv, o, gate_up, down, attn, mlp = parts
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        cfg = self.cfg = attn.config
        self.mods = (qkv, o, gate_up, down)
        self.idx = getattr(attn, "layer_idx", None)
        self.impl = getattr(cfg, "_attn_implementation", None)
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        self.h, self.inter, self.scaling = qkv.in_features, down.in_features, float(attn.scaling)
        self.configs = tuple(m.config for m in self.mods)
        ws = [_weight(m) for m in self.mods]
        self.weights = [w for w, _ in ws]
        norm_mods = (n1, n2) + ((qn, kn) if qn is not None else ())
        norms = [n.weight.detach() for n in norm_mods]
        # the tensors the pointers point into (held, so their memory stays theirs)
        self.tensors = [t for _, keep in ws for t in keep if t is not None] + norms
        parts = _replaced_parts(layer, attn, mlp, self.mods)
        # their hooks (forward, pre-forward, backward): while any is registered the layer takes its modules' path
        self.hook_dicts = [d for m in parts for d in hook_dicts(m)]
        sources = _sources(layer, attn, mlp, self.mods, norm_mods, parts)
        self.dicts, self.keys = tuple(d for d, _ in sources), tuple(k for _, k in sources)
        self.objects = list(map(dict.get, self.dicts, self.keys))
        self.weight_objects = [t for t in self.objects if isinstance(t, torch.Tensor)]
        self.state = _versions(self.weight_objects)
        self.norms = [(w.data_ptr(), w.numel(), n.variance_epsilon) for w, n in zip(norms[:2], (n1, n2))]
        self.qk = (norms[2].data_ptr(), self.d, norms[3].data_ptr(), self.d, kn.variance_epsilon) if qn is not None \
            else (0, 0, 0, 0, 0.0)
        self.valid = (self.idx is not None and attends_densely(attn, self.impl)
                      and all(_own_forward(m.__dict__.get("forward")) for m in parts)
                      and all(c.backend.value in ("auto", "cpu") for c in self.configs)
                      and all(m.packed.device.type == "cpu" for m in self.mods)
                      and qkv.out_features == (self.hq + 2 * self.hkv) * self.d and o.in_features == self.hq * self.d)
        # built (and checked by the binding) only for a layer the kernel runs: a mismatch falls back, never raises
        self.native = _ext.get_C().DecodeLayerPlan(
            self.h, self.hq, self.hkv, self.d, self.inter, *self.norms[0], *self.norms[1], *self.qk, self.scaling,
            *self.weights) if self.valid else None

    def current(self, impls: Optional[dict] = None) -> bool:
        """Still the plan of this layer: the same objects where it read them (_sources), the same attention
        implementation, the weights' memory where it was and nothing written in place (C loops over the ~55
        entries of a SmolLM2 layer)."""
        return (all(map(_IS, map(dict.get, self.dicts, self.keys), self.objects))
                and _attn_impl(self.cfg, impls) == self.impl and _versions(self.weight_objects) == self.state)

    def step_call(self, src: torch.Tensor, rope: tuple, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int,
                  out: torch.Tensor, nt: int) -> tuple:
        """(the kernel's step, its arguments) for one decode step: ``src`` and ``out`` contiguous [B, H] fp32, rope
        from ``backends.cpu.rope_args``, the key and value written at position n of the cache buffers (capacity:
        their third size). The caller holds every tensor the arguments point into until the step has run."""
        b = src.shape[0]
        return self.native.step, (src.data_ptr(), src.numel(), b, *rope, *cache_buffer_args(kbuf),
                                  *cache_buffer_args(vbuf), n, kbuf.shape[2], out.data_ptr(), out.numel(), nt)


class DecodeForward:
    """``layer.forward`` for decode steps of a patched Llama-style layer; everything else goes to the class's
    forward. Holds no tensors of its own beyond the prepared plan (rebuilt when a module or buffer changes)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.enabled = True  # kernswap.set_decode_path(model, False) sends every call to the class's forward
        self._plan = None
        self._kv = KVAppender()
        self.uid = register_layer(self)  # what a static-cache step names this layer by (ops.decode_layer_step)

    def __getstate__(self):  # pickling / deepcopy of the model: the plan (raw pointers) and the id stay behind
        return {"layer": self.layer, "enabled": self.enabled, "_plan": None, "_kv": KVAppender()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.uid = register_layer(self)

    # consecutive layers' decode steps over static cache layers (kernswap.ops.decode_layer_step, nn/decode_static.py)
    static_steps = staticmethod(static_steps)

    def original(self, *args, **kwargs):
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, hidden_states, *args, **kwargs):
        plan = None if args or not self.enabled else self._prepared(hidden_states, kwargs)
        if plan is None:
            return self.original(hidden_states, *args, **kwargs)
        return self._step(hidden_states, kwargs, plan)

    # ------------------------------------------------------------------ checks
    def _layer_plan(self, impls: Optional[dict] = None) -> Optional[_Plan]:
        plan = self._plan
        if plan is None or not plan.current(impls):
            parts = decode_parts(self.layer)
            plan = self._plan = None if parts is None else _Plan(self.layer, parts)
        return plan if plan is not None and plan.valid and not any(plan.hook_dicts) else None

    def _prepared(self, x: torch.Tensor, kwargs, impls: Optional[dict] = None) -> Optional[_Plan]:
        """The layer's plan when this call is a decode step the kernel runs, else None."""
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or type(x) is not torch.Tensor
                or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3 or x.shape[1] != 1
                or kwargs.get("attention_mask") is not None or kwargs.get("output_attentions")
                or not _ext.have_cpu_ext()):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pe = kwargs.get("position_embeddings")
        if type(cache).__name__ != "DynamicCache" or type(pe) not in (tuple, list) or len(pe) != 2:
            return None
        plan = self._layer_plan(impls)
        if plan is None or x.shape[-1] != plan.h:
            return None
        layers = getattr(cache, "layers", None)
        if layers is None or (plan.idx < len(layers) and type(layers[plan.idx]).__name__ not in CACHE_LAYERS):
            return None
        cos, sin = pe
        d = plan.d
        if (type(cos) is not torch.Tensor or type(sin) is not torch.Tensor or cos.dtype != torch.float32
                or sin.dtype != torch.float32 or cos.dim() != 3 or cos.shape[0] not in (1, x.shape[0])
                or cos.shape[1:] != (1, d) or sin.shape != cos.shape):
            return None
        return plan

    def layer_plan(self, impls: Optional[dict] = None) -> Optional[_Plan]:
        """This layer's current plan (None: its parts do not fit the kernel, or the path is off); ``impls``: a dict
        shared by the layers a caller checks in one go (see _attn_impl)."""
        return self._layer_plan(impls) if self.enabled else None

    def after_checks(self, x: torch.Tensor, kwargs, d: int, plan: Optional[_Plan]):
        """This layer's forward for the base model's decode loop, which checked the call (grad, compile, the cache,
        the mask, RoPE rows of head size ``d``) on its first layer with :meth:`_prepared`, and took ``plan`` from
        :meth:`layer_plan` at the start of this step (all layers' checks in one go, while their objects are still
        in cache): only the plan's fit and this layer's cache layer are checked here."""
        if plan is None or plan.d != d or x.shape[-1] != plan.h or x.dtype != torch.float32:
            return self(x, **kwargs)
        layers = kwargs["cache"].layers
        if plan.idx < len(layers) and type(layers[plan.idx]).__name__ not in CACHE_LAYERS:
            return self(x, **kwargs)
        return self._step(x, kwargs, plan)

    # ------------------------------------------------------------------ the step
    def _step(self, x, kwargs, plan: _Plan):
        hq, hkv, d = plan.hq, plan.hkv, plan.d
        b, h = x.shape[0], x.shape[-1]
        x2 = x.reshape(b, h).contiguous()
        cos, sin = _rope_rows(kwargs["position_embeddings"], b, d)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        nt = torch.get_num_threads()
        slot = self._kv.reserve(cache, plan.idx, b, hkv, d)
        out = torch.empty(b, h)
        if slot is not None:  # one call: the kernel writes the new key and value into the cache's buffer
            layer, kbuf, vbuf, n = slot
            step, args = plan.step_call(x2, rope_args(cos, sin), kbuf, vbuf, n, out, nt)
            step(*args)
            self._kv.commit(layer, kbuf, vbuf, n)
            return out.view(b, 1, h)
        # two calls around the cache's own update (a sliding-window layer, the first step of a new cache layer)
        C = _ext.get_C()
        w_qkv, w_o, w_gu, w_down = plan.weights
        nq = (hq + 2 * hkv) * d
        qkv = torch.empty(b, nq)
        (n1_ptr, n1_numel, n1_eps), (n2_ptr, n2_numel, n2_eps) = plan.norms
        C.decode_attn_in(x2.data_ptr(), x2.numel(), b, h, n1_ptr, n1_numel, n1_eps, w_qkv, cos.data_ptr(),
                         cos.numel(), sin.data_ptr(), sin.numel(), hq, hkv, d, *plan.qk, qkv.data_ptr(), qkv.numel(),
                         nt)
        k = qkv[:, hq * d:(hq + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
        v = qkv[:, (hq + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
        keys, values = self._kv.append(cache, plan.idx, k, v)
        if (keys.dtype != torch.float32 or values.dtype != torch.float32 or keys.dim() != 4
                or keys.shape[:2] != (b, hkv) or keys.shape[-1] != d or values.shape != keys.shape
                or keys.stride(-1) != 1 or values.stride(-1) != 1):
            raise RuntimeError(f"kernswap decode path: the cache returned keys {tuple(keys.shape)} {keys.dtype} / "
                               f"values {tuple(values.shape)} {values.dtype}, expected [{b}, {hkv}, L, {d}] fp32")
        C.decode_attn_out(x2.data_ptr(), x2.numel(), qkv.data_ptr(), qkv.numel(), nq, *cache_buffer_args(keys),
                          *cache_buffer_args(values), keys.shape[2], b, h, hq, hkv, d, plan.scaling, w_o, n2_ptr,
                          n2_numel, n2_eps, w_gu, w_down, plan.inter, out.data_ptr(), out.numel(), nt)
        return out.view(b, 1, h)


def rope_rows(pe, b: int, d: int):
    """cos and sin of ``pe`` ([1 or b, 1, d] each) as contiguous [b, d] rows (traceable: no memo)."""
    return tuple(t.expand(b, 1, d).reshape(b, d).contiguous() for t in pe)


_ROPE_MEMO = [None, None]  # [(position_embeddings tuple, batch), (cos rows, sin rows)]: one step's layers share it


def _rope_rows(pe, b: int, d: int):
    """cos and sin as contiguous [b, d] rows (one position for the whole batch broadcasts, as in the layer's RoPE);
    made once per step: every layer of a step gets the same position_embeddings object."""
    memo = _ROPE_MEMO
    if memo[0] is not None and memo[0][0] is pe and memo[0][1] == b:
        return memo[1]
    rows = rope_rows(pe, b, d)
    memo[0], memo[1] = (pe, b), rows
    return rows
