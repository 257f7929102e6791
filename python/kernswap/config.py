"""Typed, validated quantization configs."""
import dataclasses
from typing import Optional, Union

from .backend import Backend, normalize_backend

__all__ = ["QuantConfig", "SHORTCUTS"]

_INT4_GROUPS = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a Linear layer.

    weight_bits: 8 (per output channel, symmetric) or 4 (group-wise, group_size in 32/64/128).
    dynamic_activations: also quantize activations per row to int8 at run time (W8A8 / W4A8).
    backend: "auto" | "cpu" | "cuda" | "triton" | "reference".
    """

    weight_bits: int = 8
    group_size: Optional[int] = None
    symmetric: bool = True
    dynamic_activations: bool = False
    backend: Union[str, Backend] = Backend.AUTO

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str, got: object) -> ValueError:
            return ValueError(f"QuantConfig.{field} must be {allowed}, got {got!r}")

        if isinstance(self.weight_bits, bool) or self.weight_bits not in (8, 4):
            raise bad("weight_bits", "one of [8, 4]", self.weight_bits)
        for field in ("symmetric", "dynamic_activations"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "a bool (True/False)", getattr(self, field))
        if self.weight_bits == 8:
            if self.group_size is not None:
                raise bad("group_size", "None for weight_bits=8 (per output channel)", self.group_size)
            if not self.symmetric:
                raise bad("symmetric", "True for weight_bits=8", self.symmetric)
        else:
            if isinstance(self.group_size, bool) or self.group_size not in _INT4_GROUPS:
                raise bad("group_size", f"one of {list(_INT4_GROUPS)} for weight_bits=4", self.group_size)
        object.__setattr__(self, "backend", normalize_backend(self.backend, "QuantConfig.backend"))

    @property
    def name(self) -> str:
        """Short human name, e.g. 'int8', 'int4-g128-asym', 'w4a8-g64'."""
        if self.weight_bits == 8:
            base = "w8a8" if self.dynamic_activations else "int8"
        else:
            base = ("w4a8" if self.dynamic_activations else "int4") + f"-g{self.group_size}"
            if not self.symmetric:
                base += "-asym"
        return base

    @classmethod
    def from_any(cls, x: Union["QuantConfig", str]) -> "QuantConfig":
        """Accept a QuantConfig or a shortcut string: 'int8', 'int4', 'w8a8', 'w4a8'."""
        if isinstance(x, QuantConfig):
            return x
        if isinstance(x, str) and x.strip().lower() in SHORTCUTS:
            return SHORTCUTS[x.strip().lower()]
        raise ValueError(
            f"quantization config must be a kernswap.QuantConfig or one of {sorted(SHORTCUTS)}, got {x!r}"
        )


SHORTCUTS = {
    "int8": QuantConfig(weight_bits=8),
    "int4": QuantConfig(weight_bits=4, group_size=128, symmetric=True),
    "w8a8": QuantConfig(weight_bits=8, dynamic_activations=True),
    "w4a8": QuantConfig(weight_bits=4, group_size=128, symmetric=True, dynamic_activations=True),
}
