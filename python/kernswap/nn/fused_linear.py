"""Fused projections: sibling Linear layers that read the same input (q/k/v, gate/up) as one quantized call.

``fuse_linears`` quantizes the concatenated weights of the siblings into one :class:`QuantLinear` (rows in the
siblings' order); each sibling is replaced by a :class:`QuantLinearSlice`, a view of its rows of that layer's
output. The first slice called on an input runs the fused layer once; the others called on the same input (the
same tensor object, unchanged since) return their columns of that output instead of calling again. Per output row
the fused layer computes exactly what the separate layer did (every format quantizes weight rows, and the
activations once per input row, independently), so fusing changes no result bit.

The fused layer lives on the siblings' parent module (``self_attn.qkv_proj``): it is saved, moved and cast with the
model like any child; the slices hold a plain reference to it and no buffers of their own.
"""
import weakref
from typing import List, Sequence

import torch
import torch.nn as nn

from ..formats import QuantizedWeight
from ..formats.base import TILE_N
from ..ops.quantized_linear import quantized_linear
from .quant_linear import QuantLinear

__all__ = ["QuantLinearSlice", "fuse_linears", "shared_output", "slices_for"]


def fuse_linears(linears: Sequence[nn.Linear], config, hessian=None) -> QuantLinear:
    """One QuantLinear whose rows are the rows of ``linears`` in order (same in_features, all with or all without
    bias), quantized in ``config`` (``hessian``: of the input they share, for the calibrated methods)."""
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    first = linears[0]
    has_bias = first.bias is not None
    tmp = nn.Linear(first.in_features, w.shape[0], bias=has_bias, device="meta")
    tmp.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        tmp.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return QuantLinear.from_linear(tmp, config, hessian=hessian)


def _reusable(x: torch.Tensor) -> bool:
    """Outputs may be shared between the slices only in eager inference: no autograd graph to keep apart, and no
    tracing (under torch.compile each slice runs its own rows of the fused weight, see QuantLinearSlice)."""
    return not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)


def shared_output(fused: QuantLinear, x: torch.Tensor, taker: int) -> torch.Tensor:
    """``fused(x)``, computed once per input for all the slices of ``fused``: a slice (``taker``, its id) that calls
    again on the same input (or after the input changed in place) gets a fresh call, never a stale output."""
    if not _reusable(x):
        return fused(x)
    version = 0 if x.is_inference() else x._version
    entry = fused.__dict__.get("_shared_out")
    if entry is not None:
        ref, ptr, ver, out, taken = entry
        if ref() is x and ptr == x.data_ptr() and ver == version and taker not in taken:
            taken.add(taker)
            return out
    out = fused(x)
    fused.__dict__["_shared_out"] = (weakref.ref(x), x.data_ptr(), version, out, {taker})
    return out


class QuantLinearSlice(nn.Module):
    """Rows ``[start, stop)`` of a fused :class:`QuantLinear`: what one of the fused siblings computed, as a view of
    the fused output's columns. Holds no buffers (the fused layer belongs to the parent module)."""

    def __init__(self, fused: QuantLinear, start: int, stop: int, fused_name: str):
        super().__init__()
        if not 0 <= start < stop <= fused.out_features:
            raise ValueError(f"QuantLinearSlice: expected 0 <= start < stop <= {fused.out_features}, "
                             f"got start={start}, stop={stop}")
        self.__dict__["_fused"] = fused  # not a child: saved once, under the parent
        self.start, self.stop, self.fused_name = int(start), int(stop), fused_name
        self.in_features, self.out_features = fused.in_features, stop - start

    @property
    def fused(self) -> QuantLinear:
        return self.__dict__["_fused"]

    @property
    def config(self):
        return self.fused.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _reusable(x) and self.start % TILE_N == 0 and self.stop % TILE_N == 0:
            return self._own_rows(x)
        return shared_output(self.fused, x, id(self))[..., self.start:self.stop]

    def _own_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This slice's rows through the op: views of the fused buffers (tile-aligned rows)."""
        f, a, b = self.fused, self.start, self.stop
        qw = f.qweight
        w = QuantizedWeight(packed=qw.packed[a // TILE_N:b // TILE_N], scale=qw.scale[:, a:b],
                            zero=None if qw.zero is None else qw.zero[:, a:b], bits=qw.bits, group_size=qw.group_size,
                            symmetric=qw.symmetric, in_features=qw.in_features, out_features=b - a,
                            dynamic_activations=qw.dynamic_activations)
        bias = None if f.bias is None else f.bias[a:b]
        return quantized_linear(x, w, bias, backend=f.config.backend)

    def dequantize_weight(self) -> torch.Tensor:
        """fp32 [out_features, in_features]: this slice's rows of the fused weight."""
        return self.fused.dequantize_weight()[self.start:self.stop]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows [{self.start}, {self.stop}) "
                f"of {self.fused_name} ({self.fused.config.name})")


def slices_for(fused: QuantLinear, sizes: Sequence[int], fused_name: str) -> List[QuantLinearSlice]:
    """The slices of ``fused`` for consecutive row counts ``sizes``."""
    out, start = [], 0
    for n in sizes:
        out.append(QuantLinearSlice(fused, start, start + n, fused_name))
        start += n
    if start != fused.out_features:
        raise ValueError(f"slices_for: sizes {list(sizes)} sum to {start}, the fused layer has {fused.out_features} rows")
    return out
