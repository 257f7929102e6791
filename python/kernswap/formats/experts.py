"""QuantizedExperts: E quantized [N, K] expert weights of one format, stacked so one kernel call sees them all.

Expert e is the :class:`~kernswap.formats.QuantizedWeight` ``packed[e], scale[e], zero[e]`` (the same packed
layout as a quantized Linear), so every backend reads the formats defined in :mod:`kernswap.formats`;
nothing here packs or quantizes by itself.
"""
import dataclasses
from typing import Optional, Union

import torch

from .base import QuantizedWeight, check_format, is_float_zero

__all__ = ["QuantizedExperts", "quantize_experts", "check_stacked"]


def check_stacked(where: str, w: "QuantizedExperts") -> None:
    """The stacked tensors of ``w`` against its format (check_format with a leading num_experts > 0 dim): at
    construction, and on every call of the MoE ops' checks (a QuantizedExperts edited afterwards is caught)."""
    p = w.packed
    if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[0] == 0:
        got = type(p).__name__ if not isinstance(p, torch.Tensor) else list(p.shape)
        raise ValueError(f"{where}.packed must be a 3-D tensor [num_experts, ...] with num_experts > 0, got {got}")
    if is_float_zero(w.zero):
        raise ValueError(f"{where}.zero must be torch.uint8 (stacked experts store integer zero-points; quantize "
                         f"them with zero_point='int'), got torch.float32 float zero-points")
    check_format(f"{where}: ", f"{where}.", p, w.scale, w.zero, w.bits, w.group_size, w.symmetric, w.in_features,
                 w.out_features, lead=(p.shape[0],))


@dataclasses.dataclass
class QuantizedExperts:
    """Stacked quantized expert weights: ``packed [E, ...]``, ``scale [E, ...]``, ``zero [E, ...] or None``,
    each ``[e]`` slice being expert e's QuantizedWeight tensors for an [out_features, in_features] weight."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bits: int
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int
    dynamic_activations: bool = False

    def __post_init__(self) -> None:
        check_stacked("QuantizedExperts", self)

    # ---------------------------------------------------------------- views
    @property
    def num_experts(self) -> int:
        return int(self.packed.shape[0])

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def format_name(self) -> str:
        return self.expert(0).format_name

    def expert(self, e: int) -> QuantizedWeight:
        """Expert e's QuantizedWeight (views into the stacked tensors)."""
        return QuantizedWeight(self.packed[e], self.scale[e], None if self.zero is None else self.zero[e],
                               self.bits, self.group_size, self.symmetric, self.in_features, self.out_features,
                               self.dynamic_activations)

    def dequantize(self) -> torch.Tensor:
        """fp32 [E, N, K]."""
        return torch.stack([self.expert(e).dequantize() for e in range(self.num_experts)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def to(self, device) -> "QuantizedExperts":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, packed=mv(self.packed), scale=mv(self.scale), zero=mv(self.zero))

    @classmethod
    def from_float(cls, w: torch.Tensor, config) -> "QuantizedExperts":
        return quantize_experts(w, config)


def quantize_experts(w: torch.Tensor, config: Union[str, "object"]) -> QuantizedExperts:
    """Quantize float expert weights [E, N, K] with one QuantConfig (or shortcut such as "int4"), expert by
    expert with :func:`kernswap.formats.quantize`, and stack the packed tensors."""
    from . import quantize

    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_experts: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 3 or 0 in w.shape:
        raise ValueError(f"quantize_experts: w must be a non-empty 3-D [num_experts, out_features, in_features] "
                         f"tensor, got shape {list(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_experts: w must be floating point (fp32/bf16/fp16), got {w.dtype}")
    qs = [quantize(w[e], config) for e in range(w.shape[0])]
    q0 = qs[0]
    return QuantizedExperts(
        packed=torch.stack([q.packed for q in qs]), scale=torch.stack([q.scale for q in qs]),
        zero=None if q0.zero is None else torch.stack([q.zero for q in qs]), bits=q0.bits,
        group_size=q0.group_size, symmetric=q0.symmetric, in_features=q0.in_features,
        out_features=q0.out_features, dynamic_activations=q0.dynamic_activations)


# ------------------------------------------------------------------------------------------ op arguments
# The torch ops take the experts' weights as plain tensors plus ints (a custom op schema has no dataclasses):
#   (w_gate_up, w_down, gu_scale, gu_zero, d_scale, d_zero, bits, gu_group, d_group, symmetric, dynamic_act)
# bits == 0: float weights w_gate_up [E, 2I, H], w_down [E, H, I]; otherwise the packed tensors of two
# QuantizedExperts (gate_up: out_features 2I, in_features H; down: out_features H, in_features I).
def experts_to_args(w_gate_up, w_down) -> tuple:
    if isinstance(w_gate_up, QuantizedExperts):
        return (w_gate_up.packed, w_down.packed, w_gate_up.scale, w_gate_up.zero, w_down.scale, w_down.zero,
                w_gate_up.bits, w_gate_up.group_size, w_down.group_size, w_gate_up.symmetric,
                w_gate_up.dynamic_activations)
    return (w_gate_up, w_down, None, None, None, None, 0, 0, 0, True, False)


def experts_from_args(args: tuple, hidden_size: int):
    """Inverse of :func:`experts_to_args` (no validation: the op's public wrapper validated already)."""
    gu, d, gu_s, gu_z, d_s, d_z, bits, gu_g, d_g, sym, dyn = args
    if bits == 0:
        return gu, d
    inter_size = d_s.shape[1] * d_g if bits == 4 else d_g  # down's in_features: groups x group (int8: one group)
    mk = object.__new__  # skip __post_init__: these tensors came from validated containers
    qgu, qd = mk(QuantizedExperts), mk(QuantizedExperts)
    qgu.__dict__.update(packed=gu, scale=gu_s, zero=gu_z, bits=bits, group_size=gu_g, symmetric=sym,
                        in_features=hidden_size, out_features=2 * inter_size, dynamic_activations=dyn)
    qd.__dict__.update(packed=d, scale=d_s, zero=d_z, bits=bits, group_size=d_g, symmetric=sym,
                       in_features=inter_size, out_features=hidden_size, dynamic_activations=dyn)
    return qgu, qd
