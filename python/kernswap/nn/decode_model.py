"""The decode step of a whole Llama-style base model (LlamaModel, MistralModel, Qwen2Model, Qwen3Model) without
transformers' per-call machinery.

A decode step through the model's own forward spends ~1 ms of a 12 ms token (SmolLM2-135M, 2 cores) outside its
layers: the forward's decorators (kwarg deprecation, config defaults, output capture), the causal-mask builder, and
``nn.Module.__call__`` plus the gradient-checkpointing wrapper around each of its 30 layers.
:class:`DecodeModelForward`, installed as the base model instance's ``forward`` next to the layers'
:class:`DecodeForward` (patching/decode.py), runs such a step as: embedding lookup -> rotary embedding -> each
layer's decode forward -> final norm. It takes only calls whose result is provably the model's own: token ids of one
position per sequence, a dynamic cache (or a static one: every layer in one kernswap.ops.decode_layer_step), no mask
or an all-ones one (a decode step then attends every cached position, which is what the model's mask builder says
too, and within any sliding window), no hooks on the model or its layers (under torch.compile read when the step is
traced, as Dynamo reads a compiled module's own), no outputs asked beyond the last hidden state.
Anything else runs the class's forward unchanged.
"""
import dataclasses
import functools
import itertools
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module

from ..backends.cpu import rope_args
from ..ops.decode_layer_step import decode_layer_step, mask_fits
from ._parts import hooked
from .decode_layer import DecodeForward, _rope_rows, rope_rows
from .sparse_attention import ATTN_NAME

__all__ = ["DecodeModelForward", "MODEL_CLASSES", "decode_model_ready"]

MODEL_CLASSES = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")
# the keyword arguments a decode step from generate() passes (anything else, when set, goes to the class's forward)
_KNOWN = frozenset(("input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                    "use_cache", "return_dict"))
# attention implementations whose mask a decode step without padding may skip (kernswap's takes SDPA's format and
# treats no mask as plain causal; each layer's plan checks that its own attention is dense before its kernel runs)
_IMPLS = ("sdpa", "eager", ATTN_NAME)


@functools.lru_cache(maxsize=None)
def _output_class():
    """transformers' BaseModelOutputWithPast when it names its cache field ``cache`` (the version this path is
    written against), else None."""
    try:
        from transformers.modeling_outputs import BaseModelOutputWithPast
    except ImportError:
        return None
    names = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return BaseModelOutputWithPast if "cache" in names else None


def decode_model_ready(model: nn.Module) -> bool:
    """Whether ``model`` (a base model) has the parts the path reads, and every layer a DecodeForward."""
    layers = getattr(model, "layers", None)
    emb = getattr(model, "embed_tokens", None)
    return (type(model).__name__ in MODEL_CLASSES and _output_class() is not None and isinstance(layers, nn.ModuleList)
            and len(layers) > 0 and type(emb) is nn.Embedding and isinstance(getattr(model, "norm", None), nn.Module)
            and isinstance(getattr(model, "rotary_emb", None), nn.Module)
            and _layers_decode(layers))


def _layers_decode(layers) -> bool:
    """Every layer has its DecodeForward."""
    return all(isinstance(layer.__dict__.get("forward"), DecodeForward) for layer in layers)


def _any_hooked(model: nn.Module) -> bool:
    """Whether a hook is set that the step would skip: a global module hook, or one on the base model, its
    embedding (the step looks the ids up with F.embedding) or a decoder layer (the hooks on a layer's parts are its
    plan's to check, per call)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or hooked(model)
                or hooked(model.embed_tokens) or any(map(hooked, model.layers)))


# Under torch.compile the hooks are read as Dynamo reads a compiled module's own (torch._dynamo.config.
# skip_nnmodule_hook_guards, on by default): once, when the step is traced, without a guard per hook dict (~180
# guards evaluated before every compiled step otherwise): a hook set or removed later is not seen by the compiled
# step until it is compiled again, as with any compiled module. With that setting off, every call reads them.
# (The model's forward is named by an int: older Dynamo passes only constants to such a function.)
_FORWARDS: "weakref.WeakValueDictionary[int, DecodeModelForward]" = weakref.WeakValueDictionary()
_UIDS = itertools.count(1)


@torch.compiler.assume_constant_result
def _hooked_when_traced(uid: int) -> bool:
    fwd = _FORWARDS.get(uid)
    return fwd is None or _any_hooked(fwd.model)


@torch.compiler.assume_constant_result
def _hook_guards_skipped() -> bool:
    from torch._dynamo import config
    return bool(getattr(config, "skip_nnmodule_hook_guards", False))


class DecodeModelForward:
    """``forward`` of a patched base model: decode steps as a plain loop over the layers' decode forwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.enabled = True  # kernswap.set_decode_path
        self.output_class = _output_class()  # (read here: torch.compile traces the step, not through lru_cache)
        self._register()

    def _register(self):
        self.uid = next(_UIDS)  # (what a traced step names this forward by: _hooked_when_traced)
        _FORWARDS[self.uid] = self

    def __getstate__(self):  # pickling / deepcopy of the model: the id stays behind, the copy gets its own
        return {k: v for k, v in self.__dict__.items() if k != "uid"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._register()

    def original(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if args or not self.enabled:
            return self.original(*args, **kwargs)
        common = self._common(kwargs)
        if common is None:
            return self.original(*args, **kwargs)
        ids, cache, mask, pos = common
        if type(cache).__name__ == "StaticCache":
            layers = self._static_layers(ids, cache, mask)
            return self.original(*args, **kwargs) if layers is None else self._static(ids, cache, layers, mask, pos)
        step = None if torch.compiler.is_compiling() else self._inputs(ids, cache, mask, pos)
        if step is None:
            return self.original(*args, **kwargs)
        return self._step(*step)

    def _common(self, kwargs):
        """(ids, cache, mask, position_ids) when this call is an inference decode step (token ids of one position
        per sequence, a cache, nothing asked beyond the last hidden state, no hooks, every layer with its decode
        forward), else None. Only types, shapes and attributes: torch.compile traces it."""
        if torch.is_grad_enabled() or not _KNOWN.issuperset(kwargs):
            return None
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache", kwargs.get("past_key_values"))
        if (type(ids) is not torch.Tensor or ids.dim() != 2 or ids.shape[1] != 1 or ids.dtype != torch.long
                or ids.device.type != "cpu" or kwargs.get("inputs_embeds") is not None
                or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False or cache is None):
            return None
        model = self.model
        cfg = model.config
        if (getattr(cfg, "output_hidden_states", False) or getattr(cfg, "output_attentions", False)
                or getattr(cfg, "_attn_implementation", None) not in _IMPLS):
            return None
        layers = model.layers
        hooks = (_hooked_when_traced(self.uid) if torch.compiler.is_compiling() and _hook_guards_skipped()
                 else _any_hooked(model))
        if hooks or not _layers_decode(layers):
            return None
        mask = kwargs.get("attention_mask")
        if type(mask) is dict:  # per layer type (generate's masks for a static cache): all full attention here
            types = getattr(cfg, "layer_types", None) or ("full_attention",)
            if any(t != "full_attention" for t in types[:len(layers)]):
                return None
            mask = mask.get("full_attention")
        if mask is not None and type(mask) is not torch.Tensor:
            return None
        pos = kwargs.get("position_ids")
        if pos is not None and (type(pos) is not torch.Tensor or pos.dim() != 2 or pos.shape[1] != 1
                                or pos.shape[0] not in (1, ids.shape[0])):
            return None
        return ids, cache, mask, pos

    def _inputs(self, ids, cache, mask, pos):
        """(ids, cache, position_ids) when this step (on a dynamic cache) is one the plain loop computes exactly."""
        if type(cache).__name__ != "DynamicCache":
            return None
        past = cache.get_seq_length()
        window = getattr(self.model.config, "sliding_window", None)
        if window is not None and past + 1 > window:
            return None
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != (ids.shape[0], past + 1)
                                 or not bool(mask.all())):
            return None
        return ids, cache, pos

    def _static_layers(self, ids, cache, mask):
        """The cache layers of a static cache this step runs over (kernswap.ops.decode_layer_step: plain static
        layers, initialised by a prefill, fp32 [B, Hkv, capacity, D] buffers), else None. Masks are the op's to
        read: a plain causal one takes the kernel, any other the layer's modules."""
        n_layers = self.model.config.num_hidden_layers
        layers = getattr(cache, "layers", None)
        b = ids.shape[0]
        if getattr(cache, "offloading", False) or type(layers) is not list or len(layers) < n_layers:
            return None
        layers = layers[:n_layers]
        for layer in layers:  # (an uninitialised layer's keys are None)
            if type(layer).__name__ != "StaticLayer":
                return None
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if (type(k) is not torch.Tensor or type(v) is not torch.Tensor or k.dtype != torch.float32
                    or k.device.type != "cpu" or k.dim() != 4 or k.shape[0] != b or v.shape != k.shape
                    or v.dtype != k.dtype or v.device != k.device):
                return None
        cap = layers[0].keys.shape[2]
        window = getattr(self.model.config, "sliding_window", None)
        if window is not None and window < cap:  # (without a mask the model's own would slide; the op's would not)
            return None
        if mask is not None and not mask_fits(mask, b, cap):
            return None
        return layers

    def _static(self, ids, cache, layers, mask, pos):
        """A decode step over a static cache: every layer in one kernswap.ops.decode_layer_step (under
        torch.compile, one graph node), the positions written in place as the cache's own update would."""
        model = self.model
        emb = model.embed_tokens
        h = F.embedding(ids, emb.weight, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq,
                        emb.sparse)
        b, hsz = h.shape[0], h.shape[-1]
        if pos is None:
            pos = layers[0].cumulative_length.view(1, 1)
        pe = model.rotary_emb(h, position_ids=pos)
        cos, sin = rope_rows(pe, b, pe[0].shape[-1])
        x = decode_layer_step(h.view(b, hsz), cos, sin, [cl.keys for cl in layers], [cl.values for cl in layers],
                              [cl.cumulative_length for cl in layers], mask,
                              [layer.__dict__["forward"].uid for layer, _ in zip(model.layers, layers)])
        return self.output_class(last_hidden_state=model.norm(x.view(b, 1, hsz)), cache=cache)

    def _step(self, ids: torch.Tensor, cache, pos: Optional[torch.Tensor]):
        model = self.model
        emb = model.embed_tokens
        h = F.embedding(ids, emb.weight, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq,
                        emb.sparse)
        if pos is None:
            pos = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long)
        pe = model.rotary_emb(h, position_ids=pos)
        kw = dict(attention_mask=None, position_embeddings=pe, position_ids=pos, cache=cache, use_cache=True)
        # (zip, not a slice: slicing a ModuleList builds a new one, ~50 us a step)
        fwds = [layer.__dict__["forward"] for layer, _ in zip(model.layers, range(model.config.num_hidden_layers))]
        first = fwds[0]
        impls = {}  # (the layers' attention implementation, read once per config object)
        plan = first._prepared(h, kw, impls)  # the call-level checks, once: the other layers check their own parts
        if plan is None:
            for fwd in fwds:
                h = fwd(h, **kw)
        else:
            plans = [plan] + [fwd.layer_plan(impls) for fwd in fwds[1:]]  # all checks before any kernel evicts them
            out = _one_call_per_layer(fwds, plans, h, kw, cache)
            if out is not None:
                h = out
            else:
                h = first._step(h, kw, plan)
                for fwd, p in zip(fwds[1:], plans[1:]):
                    h = fwd.after_checks(h, kw, plan.d, p)
        return self.output_class(last_hidden_state=model.norm(h), cache=cache)


def _one_call_per_layer(fwds, plans, h: torch.Tensor, kw, cache) -> Optional[torch.Tensor]:
    """The whole step as one compiled call per layer with every argument prepared up front (the hidden states of
    each layer in one preallocated block, each layer's cache slot reserved), so nothing but the calls runs between
    the kernels; None (nothing written) when a layer needs more than that (no plan, another cache layer)."""
    d = plans[0].d
    b, hsz = h.shape[0], h.shape[-1]
    if any(p is None or p.d != d or p.h != hsz for p in plans):
        return None
    slots = [fwd._kv.reserve(cache, p.idx, b, p.hkv, d) for fwd, p in zip(fwds, plans)]
    if any(s is None for s in slots):
        return None
    cos, sin = _rope_rows(kw["position_embeddings"], b, d)
    x = h.reshape(b, hsz).contiguous()
    outs = torch.empty(len(plans), b, hsz)
    nt = torch.get_num_threads()
    calls = []
    rope = rope_args(cos, sin)
    for i, (p, (_, kbuf, vbuf, n)) in enumerate(zip(plans, slots)):
        calls.append(p.step_call(x if i == 0 else outs[i - 1], rope, kbuf, vbuf, n, outs[i], nt))
    for step, args in calls:
        step(*args)
    for fwd, (layer, kbuf, vbuf, n) in zip(fwds, slots):
        fwd._kv.commit(layer, kbuf, vbuf, n)
    return outs[-1].view(b, 1, hsz)
