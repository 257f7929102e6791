"""FusedExperts: a drop-in for transformers' stacked experts modules (MixtralExperts, Qwen2MoeExperts,
Qwen3MoeExperts, OlmoeExperts), running all experts through kernswap.ops.fused_moe.

Same call as transformers' experts interface: ``forward(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`` (routing stays in the model's own router). Weights:
  * float: Parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (transformers' names and layout;
    from_experts shares the original Parameters, no copy);
  * quantized: buffers ``gate_up_packed/_scale/_zero``, ``down_packed/_scale/_zero`` (stacked formats of
    kernswap.formats.QuantizedExperts) and ``qformat`` (int64 metadata checked on load).
"""
from typing import Optional, Union

import torch
import torch.nn as nn

from .. import _ext
from ..backend import Backend, normalize_backend
from ..config import QuantConfig, bad_backend, moe_backend_problem
from ..formats.base import layout
from ..formats.experts import QuantizedExperts, quantize_experts
from ..ops._dispatch import eager_fast_path
from ..ops._moe_common import check_experts
from ._parts import is_silu
from ._state import CachedRunnerModule, tensor_key
from ..ops.fused_moe import check_routed, fused_moe

__all__ = ["FusedExperts", "experts_quant_config"]

_FORMAT_VERSION = 1
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def experts_quant_config(cfg: QuantConfig, in_features: int) -> Optional[QuantConfig]:
    """The config one stacked projection with in_features gets: ``cfg``, or for int4 when in_features is not a
    multiple of its group size, the largest smaller group size (64, 32) dividing it; None when none does. Stacked
    experts store integer zero-points: zero_point="float" becomes "int" (the report names the format they got)."""
    import dataclasses

    if cfg.float_zero:
        cfg = dataclasses.replace(cfg, zero_point="int")
    if cfg.weight_bits != 4 or in_features % cfg.group_size == 0:
        return cfg
    for g in (64, 32):
        if g < cfg.group_size and in_features % g == 0:
            return dataclasses.replace(cfg, group_size=g)
    return None


def _meta(cfg_gu: QuantConfig, cfg_d: QuantConfig, e: int, h: int, i: int) -> torch.Tensor:
    return torch.tensor([_FORMAT_VERSION, cfg_gu.weight_bits, cfg_gu.group_size or 0, cfg_d.group_size or 0,
                         int(cfg_gu.symmetric), int(cfg_gu.dynamic_activations), e, h, i], dtype=torch.int64)


class FusedExperts(CachedRunnerModule):
    """All experts of one MoE layer in one fused op (see module doc). ``quant``: None (float weights) or a
    QuantConfig/shortcut; int4 group sizes are lowered per projection when they do not divide its in_features."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 quant: Union[None, str, QuantConfig] = None, backend: str = "auto", device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"FusedExperts: {name} must be an int > 0, got {v!r}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        e, h, i = num_experts, hidden_size, intermediate_size
        self.quant = None if quant is None else QuantConfig.from_any(quant)
        self.backend = backend  # validated (see the property)
        if self.quant is None:
            dt = dtype or torch.get_default_dtype()
            self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h, dtype=dt, device=device), requires_grad=False)
            self.down_proj = nn.Parameter(torch.zeros(e, h, i, dtype=dt, device=device), requires_grad=False)
            return
        cfg_gu, cfg_d = experts_quant_config(self.quant, h), experts_quant_config(self.quant, i)
        if cfg_gu is None or cfg_d is None:
            raise ValueError(f"FusedExperts: {self.quant.name} needs hidden_size and intermediate_size divisible by "
                             f"an int4 group size (32, 64 or 128), got hidden_size={h}, intermediate_size={i}")
        self.cfg_gate_up, self.cfg_down = cfg_gu, cfg_d
        for prefix, cfg, n, k in (("gate_up", cfg_gu, 2 * i, h), ("down", cfg_d, h, i)):
            spec = layout(cfg.weight_bits, cfg.group_size if cfg.weight_bits == 4 else k, cfg.symmetric, n, k)
            for part in ("packed", "scale", "zero"):
                if spec[part] is None:
                    self.register_buffer(f"{prefix}_{part}", None)
                else:
                    shape, dt = spec[part]
                    self.register_buffer(f"{prefix}_{part}", torch.zeros((e,) + tuple(shape), dtype=dt,
                                                                         device=device))
        self.register_buffer("qformat", _meta(cfg_gu, cfg_d, e, h, i).to(device))

    @property
    def backend(self) -> Backend:
        b = self.__dict__.get("_backend")
        return b if b is not None else normalize_backend(self.__dict__.get("backend"))  # (a module pickled before)

    @backend.setter
    def backend(self, value) -> None:
        """A known backend that has the fused experts for this module's format, else ValueError at once (not at
        the first forward)."""
        b = normalize_backend(value, "FusedExperts.backend")
        why = moe_backend_problem(b, self.__dict__.get("quant") is not None)
        if why:
            raise bad_backend("FusedExperts.backend", "these experts", b, why)
        self.__dict__["_backend"] = b

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(cls, experts: nn.Module, quant: Union[None, str, QuantConfig] = None,
                     backend: str = "auto") -> "FusedExperts":
        """From a transformers experts module with ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.
        Float: shares its Parameters. Quantized: quantizes them (the original is left untouched)."""
        why = unsupported_reason(experts)
        if why is not None:
            raise ValueError(f"FusedExperts.from_experts: {why}")
        gu, d = experts.gate_up_proj, experts.down_proj
        e, two_i, h = gu.shape
        mod = cls(e, h, two_i // 2, quant=quant, backend=backend, device="meta" if quant is None else gu.device,
                  dtype=gu.dtype)
        if quant is None:
            mod.gate_up_proj, mod.down_proj = gu, d  # the very same Parameters
            return mod
        mod.load_quantized(quantize_experts(gu.detach(), mod.cfg_gate_up), quantize_experts(d.detach(), mod.cfg_down))
        return mod

    def load_quantized(self, q_gate_up: QuantizedExperts, q_down: QuantizedExperts) -> None:
        with torch.no_grad():
            for prefix, q in (("gate_up", q_gate_up), ("down", q_down)):
                for part in ("packed", "scale", "zero"):
                    buf = getattr(self, f"{prefix}_{part}")
                    src = getattr(q, part)
                    if (buf is None) != (src is None) or (buf is not None and buf.shape != src.shape):
                        raise ValueError(f"FusedExperts.load_quantized: {prefix}.{part} does not match this module's "
                                         f"format ({self.quant.name}, {self.num_experts} experts)")
                    if buf is not None:
                        buf.copy_(src)

    # ------------------------------------------------------------------ weights
    def weights(self):
        """(w_gate_up, w_down): float tensors or QuantizedExperts views of the buffers."""
        if self.quant is None:
            params = self._parameters  # (the Module's own dict: cheaper than two attribute look-ups per call)
            return params["gate_up_proj"], params["down_proj"]
        bufs = self._buffers
        key = tensor_key(*(bufs[f"{p}_{q}"] for p in ("gate_up", "down") for q in ("packed", "scale", "zero"))) + (
            self.num_experts, self.hidden_dim, self.intermediate_dim, id(self.cfg_gate_up), id(self.cfg_down))
        cached = self.__dict__.get("_weights_cache")
        if cached is None or cached[0] != key:
            e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim

            def q(prefix, cfg, n, k):
                return QuantizedExperts(getattr(self, f"{prefix}_packed"), getattr(self, f"{prefix}_scale"),
                                        getattr(self, f"{prefix}_zero"), cfg.weight_bits,
                                        cfg.group_size if cfg.weight_bits == 4 else k, cfg.symmetric, k, n,
                                        cfg.dynamic_activations)
            cached = self.__dict__["_weights_cache"] = (
                key, (q("gate_up", self.cfg_gate_up, 2 * i, h), q("down", self.cfg_down, h, i)))
            del e
        return cached[1]

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        run = self._cpu_runner(hidden_states, top_k_weights)
        if run is not None:  # the routing checked as fused_moe checks it, then the prepared kernel
            check_routed("fused_moe", hidden_states.shape[0], top_k_weights.shape[1], top_k_weights, top_k_index,
                         hidden_states.device)
            return run(hidden_states, top_k_weights, top_k_index)
        wgu, wd = self.weights()
        return fused_moe(hidden_states, None, wgu, wd, top_k_index.shape[-1], topk_weights=top_k_weights,
                         topk_ids=top_k_index, backend=self.backend)

    def _cpu_runner(self, x: torch.Tensor, w: torch.Tensor):
        """The prepared cpu-backend runner for plain eager CPU inference (else None: the op checks and
        dispatches). The weights are checked by fused_moe's own check_experts when the runner is prepared (and
        again whenever a weight, its storage or version, or the module's sizes change), the routing by its
        check_routed on every call (in forward); the runner's C++ alignment rejects expert ids outside [0, E)."""
        if torch.compiler.is_compiling() or self.backend not in ("auto", "cpu"):
            return None
        if (x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _FLOAT_DTYPES or x.shape[1] != self.hidden_dim
                or x.shape[0] == 0 or not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != x.shape[0]
                or w.dtype not in _FLOAT_DTYPES or not eager_fast_path(x, w)):
            return None
        wgu, wd = self.weights()
        if isinstance(wgu, torch.Tensor) and (wgu.device.type != "cpu" or not eager_fast_path(wgu, wd)):
            return None  # (weights that record autograd go through the op, which says it has no backward)
        key = (tensor_key(wgu, wd) if isinstance(wgu, torch.Tensor) else (id(wgu), id(wd))) + (id(_ext.get_C()),
                                                                                               self.hidden_dim)
        cached = self.__dict__.get("_runner_cache")
        if cached is None or cached[0] != key:
            from ..backends import moe_cpu

            check_experts("fused_moe", self.hidden_dim, wgu, wd, x.device)  # raises as ops.fused_moe does

            ok = moe_cpu.available()[0] and moe_cpu.supports("fused_experts", hidden2d=x, w_gate_up=wgu, w_down=wd)
            cached = self.__dict__["_runner_cache"] = (key, moe_cpu.prepare(wgu, wd) if ok else None)
        run = cached[1]
        return run

    def extra_repr(self) -> str:
        fmt = "float" if self.quant is None else self.quant.name
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_dim}, "
                f"intermediate_size={self.intermediate_dim}, format={fmt}, backend={self.backend}")

    # ------------------------------------------------------------------ torch plumbing
    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` must not cast the fp32 scales: they move as int32 views (device changes only)."""
        scales = {n: self._buffers.pop(n) for n in ("gate_up_scale", "down_scale") if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, s in scales.items():
                self._buffers[n] = None if s is None else fn(s.view(torch.int32)).view(torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        meta = state_dict.get(prefix + "qformat")
        mine = self._buffers.get("qformat")
        if meta is not None and mine is not None and (meta.shape != mine.shape or not torch.equal(meta.cpu(),
                                                                                                 mine.cpu())):
            error_msgs.append(f"FusedExperts: state_dict format mismatch for '{prefix[:-1] or '<root>'}': this module "
                              f"has qformat {mine.tolist()}, the state_dict has {meta.tolist()}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def unsupported_reason(experts: nn.Module) -> Optional[str]:
    """Why a transformers experts module cannot become FusedExperts, or None when it can."""
    cls = type(experts).__name__
    gu, d = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(d, torch.Tensor):
        return f"{cls} has no stacked gate_up_proj/down_proj tensors"
    if gu.dim() != 3 or d.dim() != 3:
        return f"{cls}: gate_up_proj/down_proj must be 3-D, got {list(gu.shape)} and {list(d.shape)}"
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(d.shape) != (e, h, two_i // 2):
        return f"{cls}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got {list(gu.shape)}, {list(d.shape)}"
    if gu.dtype not in _FLOAT_DTYPES or d.dtype != gu.dtype:
        return f"{cls}: expert weights must be fp32/bf16/fp16 of one dtype, got {gu.dtype} and {d.dtype}"
    if gu.device.type == "meta":
        return f"{cls}: expert weights are on the meta device"
    for attr, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                       ("has_post_expert_norm", False), ("_is_expert_parallel", False)):
        if getattr(experts, attr, want) != want:
            return f"{cls}: {attr}={getattr(experts, attr)} is not supported (need {want})"
    act = getattr(experts, "act_fn", None)
    if act is None or not is_silu(act):
        return f"{cls}: activation {type(act).__name__} is not SiLU (the fused kernels compute SwiGLU)"
    return None
