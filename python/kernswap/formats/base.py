"""QuantizedWeight: the one container every backend reads (layout in SPEC.md, "Quantized weight formats")."""
import dataclasses
from typing import Dict, Optional, Tuple

import torch

__all__ = ["QuantizedWeight", "TILE_N", "padded_n", "layout", "check_format", "ZERO_DTYPES", "is_float_zero"]

TILE_N = 16


def padded_n(n: int) -> int:
    """Np = ceil(N/16)*16."""
    return (n + TILE_N - 1) // TILE_N * TILE_N


ZERO_DTYPES = (torch.uint8, torch.float32)  # int4 zero-points: integer (0..15) or float (any real), w = (q - z) * s


def is_float_zero(zero) -> bool:
    """Whether a stored zero-point tensor holds float zero-points (the format is told by its dtype)."""
    return isinstance(zero, torch.Tensor) and zero.dtype == torch.float32


def layout(bits: int, group_size: int, symmetric: bool, out_features: int, in_features: int,
           float_zero: bool = False) -> Dict[str, Optional[Tuple[Tuple[int, ...], torch.dtype]]]:
    """Shapes and dtypes of the stored tensors: {'packed': (shape, dtype), 'scale': ..., 'zero': ... or None}.
    float_zero: asymmetric int4 with float zero-points (fp32, one per group and column) instead of uint8 ones."""
    n, k, np_ = out_features, in_features, padded_n(out_features)
    if bits == 8:
        kp = (k + 3) // 4 * 4
        return {"packed": ((np_ // TILE_N, kp * TILE_N), torch.int8),
                "scale": ((1, np_), torch.float32), "zero": None}
    if bits == 4:
        ng = k // group_size
        return {"packed": ((np_ // TILE_N, k * 8), torch.uint8),
                "scale": ((ng, np_), torch.float32),
                "zero": None if symmetric else ((ng, np_), ZERO_DTYPES[int(bool(float_zero))])}
    raise ValueError(f"bits must be 8 or 4, got {bits!r}")


_LAYOUTS: Dict[tuple, tuple] = {}  # (bits, group_size, symmetric, out_features, in_features, float_zero) -> layout


def _layout(key: tuple) -> tuple:
    """layout() as ((name, spec), ...) in packed, scale, zero order for a format key that passed check_format's
    checks; memoised (every eager call of the quantized-linear checks asks), computed afresh while torch.compile
    traces and for symbolic sizes (a SymInt does not hash)."""
    d = layout(*key)
    spec = tuple((name, d[name]) for name in ("packed", "scale", "zero"))
    if not torch.compiler.is_compiling() and len(_LAYOUTS) < 4096 and all(type(v) in (int, bool) for v in key):
        _LAYOUTS[key] = spec
    return spec


def _is_int(v) -> bool:
    """An int (a SymInt too: a size while torch.compile or opcheck traces with dynamic shapes)."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def check_format(head: str, attr: str, packed, scale, zero, bits, group_size, symmetric, in_features,
                 out_features, lead: Tuple[int, ...] = ()) -> None:
    """The one check of a packed weight's format: bits, group size and sizes, then the stored tensors' shapes and
    dtypes against :func:`layout`. Used by QuantizedWeight (at construction) and by the quantized-linear op's
    checking function on every call (a QuantizedWeight edited after construction is caught there); ``head``
    prefixes sentences ("QuantizedWeight: "), ``attr`` the tensors' names ("QuantizedWeight."). ``lead``: leading
    dims of stacked weights (QuantizedExperts: (num_experts,)). The zero-points' dtype tells integer from float
    ones (ZERO_DTYPES)."""
    key = (bits, group_size, symmetric, out_features, in_features, is_float_zero(zero))
    spec = None
    if not torch.compiler.is_compiling():
        try:
            spec = _LAYOUTS.get(key)  # a format that passed the checks below before
        except TypeError:  # symbolic sizes
            pass
    if spec is None:
        _check_sizes(head, attr, bits, group_size, symmetric, in_features, out_features)
        spec = _layout(key)
    for (name, want), t in zip(spec, (packed, scale, zero)):
        if want is None:
            if t is not None:
                raise ValueError(f"{attr}{name} must be None for this format "
                                 f"(bits={bits}, symmetric={symmetric}), got a tensor")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{attr}{name} must be a torch.Tensor, got {type(t).__name__}")
        shape, dtype = want
        if lead:
            shape = lead + shape
        if t.dtype != dtype or t.shape != shape:
            want = (f"{ZERO_DTYPES[0]} (integer zero-points) or {ZERO_DTYPES[1]} (float ones)" if name == "zero"
                    else str(dtype))
            raise ValueError(f"{attr}{name} must be {want} of shape {list(shape)}, "
                             f"got {t.dtype} of shape {list(t.shape)}")


def _check_sizes(head: str, attr: str, bits, group_size, symmetric, in_features, out_features) -> None:
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"{attr}bits must be 8 or 4, got {bits!r}")
    if not (_is_int(in_features) and _is_int(out_features)) or in_features <= 0 or out_features <= 0:
        raise ValueError(f"{head}in_features and out_features must be ints > 0, "
                         f"got in_features={in_features!r}, out_features={out_features!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"{attr}symmetric must be a bool, got {symmetric!r}")
    if bits == 8:
        if group_size != in_features or not symmetric:
            raise ValueError(f"{head}int8 needs group_size == in_features={in_features} and "
                             f"symmetric=True, got group_size={group_size!r}, symmetric={symmetric}")
    elif isinstance(group_size, bool) or group_size not in (32, 64, 128) or in_features % group_size:
        raise ValueError(f"{head}int4 needs group_size in [32, 64, 128] dividing "
                         f"in_features={in_features}, got group_size={group_size!r}")


@dataclasses.dataclass
class QuantizedWeight:
    """A packed quantized [out_features, in_features] weight.

    group_size == in_features for int8 (one scale per output channel). For int4 symmetric the zero point is
    the implicit 8 and ``zero`` is None; asymmetric int4 stores one zero-point per group and column, uint8
    (integer, 0..15) or fp32 (float: any offset, the min-offset grid of GGUF's Q4_1), w = (q - zero) * scale.
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
        check_format("QuantizedWeight: ", "QuantizedWeight.", self.packed, self.scale, self.zero, self.bits,
                     self.group_size, self.symmetric, self.in_features, self.out_features)

    # ---------------------------------------------------------------- views
    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def format_name(self) -> str:
        if self.bits == 8:
            return "w8a8" if self.dynamic_activations else "int8"
        name = ("w4a8" if self.dynamic_activations else "int4") + f"-g{self.group_size}"
        return name if self.symmetric else name + ("-fzero" if self.float_zero else "-asym")

    @property
    def float_zero(self) -> bool:
        """Asymmetric int4 with float zero-points."""
        return is_float_zero(self.zero)

    def to(self, device) -> "QuantizedWeight":
        """Move to a device (the packed layout is device-independent)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, packed=mv(self.packed), scale=mv(self.scale), zero=mv(self.zero))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def unpack(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q int32 [N,K], scale fp32 [N, K//G], zero [N, K//G]: int32, or fp32 for float zero-points);
        w = (q - zero) * scale."""
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
                zero = self.zero[:, :n].t()
                zero = zero if self.float_zero else zero.to(torch.int32)
        return q, self.scale[:, :n].t().contiguous(), zero.contiguous()

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] weight that this packed weight represents."""
        q, scale, zero = self.unpack()
        g = self.group_size
        qz = (q - zero.repeat_interleave(g, dim=1)).to(torch.float32)
        return qz * scale.repeat_interleave(g, dim=1)
