"""QuantizedWeight: the one container every backend reads (layout in SPEC.md, "Quantized weight formats")."""
import dataclasses
from typing import Dict, Optional, Tuple

import torch

__all__ = ["QuantizedWeight", "TILE_N", "padded_n", "layout"]

TILE_N = 16


def padded_n(n: int) -> int:
    """Np = ceil(N/16)*16."""
    return (n + TILE_N - 1) // TILE_N * TILE_N


def layout(bits: int, group_size: int, symmetric: bool, out_features: int, in_features: int
           ) -> Dict[str, Optional[Tuple[Tuple[int, ...], torch.dtype]]]:
    """Shapes and dtypes of the stored tensors: {'packed': (shape, dtype), 'scale': ..., 'zero': ... or None}."""
    n, k, np_ = out_features, in_features, padded_n(out_features)
    if bits == 8:
        kp = (k + 3) // 4 * 4
        return {"packed": ((np_ // TILE_N, kp * TILE_N), torch.int8),
                "scale": ((1, np_), torch.float32), "zero": None}
    if bits == 4:
        ng = k // group_size
        return {"packed": ((np_ // TILE_N, k * 8), torch.uint8),
                "scale": ((ng, np_), torch.float32),
                "zero": None if symmetric else ((ng, np_), torch.uint8)}
    raise ValueError(f"bits must be 8 or 4, got {bits!r}")


@dataclasses.dataclass
class QuantizedWeight:
    """A packed quantized [out_features, in_features] weight.

    group_size == in_features for int8 (one scale per output channel). For int4 symmetric the zero point is
    the implicit 8 and ``zero`` is None.
    """

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
        if self.bits not in (8, 4):
            raise ValueError(f"QuantizedWeight.bits must be 8 or 4, got {self.bits!r}")
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(f"QuantizedWeight: in_features and out_features must be > 0, "
                             f"got in_features={self.in_features}, out_features={self.out_features}")
        if self.bits == 8:
            if self.group_size != self.in_features or not self.symmetric:
                raise ValueError(f"QuantizedWeight: int8 needs group_size == in_features={self.in_features} and "
                                 f"symmetric=True, got group_size={self.group_size}, symmetric={self.symmetric}")
        elif self.group_size not in (32, 64, 128) or self.in_features % self.group_size:
            raise ValueError(f"QuantizedWeight: int4 needs group_size in [32, 64, 128] dividing "
                             f"in_features={self.in_features}, got group_size={self.group_size}")
        spec = layout(self.bits, self.group_size, self.symmetric, self.out_features, self.in_features)
        for name in ("packed", "scale", "zero"):
            t, want = getattr(self, name), spec[name]
            if want is None:
                if t is not None:
                    raise ValueError(f"QuantizedWeight.{name} must be None for this format "
                                     f"(bits={self.bits}, symmetric={self.symmetric}), got a tensor")
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"QuantizedWeight.{name} must be a torch.Tensor, got {type(t).__name__}")
            shape, dtype = want
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"QuantizedWeight.{name} must be {dtype} of shape {list(shape)}, "
                                 f"got {t.dtype} of shape {list(t.shape)}")

    # ---------------------------------------------------------------- views
    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def format_name(self) -> str:
        if self.bits == 8:
            return "w8a8" if self.dynamic_activations else "int8"
        name = ("w4a8" if self.dynamic_activations else "int4") + f"-g{self.group_size}"
        return name if self.symmetric else name + "-asym"

    def to(self, device) -> "QuantizedWeight":
        """Move to a device (the packed layout is device-independent)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, packed=mv(self.packed), scale=mv(self.scale), zero=mv(self.zero))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def unpack(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q int32 [N,K], scale fp32 [N, K//G], zero int32 [N, K//G]); w = (q - zero) * scale."""
        from . import int4, int8

        n, k = self.out_features, self.in_features
        if self.bits == 8:
            q = int8.unpack_int8(self.packed, n, k)
            zero = torch.zeros(n, 1, dtype=torch.int32, device=q.device)
        else:
            q = int4.unpack_int4(self.packed, n, k)
            if self.zero is None:
                zero = torch.full((n, k // self.group_size), 8, dtype=torch.int32, device=q.device)
            else:
                zero = self.zero[:, :n].t().to(torch.int32)
        return q, self.scale[:, :n].t().contiguous(), zero.contiguous()

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] weight that this packed weight represents."""
        q, scale, zero = self.unpack()
        g = self.group_size
        qz = (q - zero.repeat_interleave(g, dim=1)).to(torch.float32)
        return qz * scale.repeat_interleave(g, dim=1)
