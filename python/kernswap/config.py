"""Typed, validated quantization configs."""
import dataclasses
from typing import Optional, Union

from .backend import Backend, normalize_backend
from .formats.scale_search import METHODS as QUANT_METHODS

__all__ = ["QuantConfig", "SHORTCUTS", "SparseAttentionConfig", "MoEConfig"]


def backend_problem(op: str, backend: Backend, pieces=(), **fmt) -> Optional[str]:
    """Why a config forcing ``backend`` can never run ``op`` (BackendTable.config_problem), None if it may."""
    if backend in (Backend.AUTO, Backend.REFERENCE):
        return None
    from .ops._moe_common import MOE_TABLE  # lazily: the ops' modules import this one's users
    from .ops.block_sparse_attention import TABLE as ATTENTION_TABLE
    from .ops.quantized_linear import TABLE as QLINEAR_TABLE

    table = {"quantized_linear": QLINEAR_TABLE, "block_sparse_attention": ATTENTION_TABLE, "fused_moe": MOE_TABLE}[op]
    return table.config_problem(backend, pieces, **fmt)


def moe_backend_problem(backend: Backend, quantized: bool) -> Optional[str]:
    """Why experts forced onto ``backend`` can never run (FusedExperts needs the fused_experts piece)."""
    return backend_problem("fused_moe", backend, ("fused_experts",), quantized=quantized)


def bad_backend(field: str, what: str, backend: Backend, why: str) -> ValueError:
    return ValueError(f"{field} must be a backend that can run {what}, got {backend.value!r}: {why}; "
                      f"use 'auto' or 'reference'")


_INT4_GROUPS = (32, 64, 128)
ZERO_POINTS = ("int", "float")  # QuantConfig.zero_point of asymmetric int4



@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a Linear layer.

    weight_bits: 8 (per output channel, symmetric) or 4 (group-wise, group_size in 32/64/128).
    dynamic_activations: also quantize activations per row to int8 at run time (W8A8 / W4A8).
    backend: "auto" | "cpu" | "cuda" | "triton" | "reference".
    method: how the scales are chosen, without calibration data: "rtn" (max|w| onto the largest code) or "mse"
      (per group the scale, and for asymmetric int4 the range, of least squared error). Default: "mse" for int4,
      "rtn" for int8. With ``patch(..., calibration=...)``, "mse" weights each group's error by the mean square
      of its input channels over the calibration text (activation-weighted error, the layers' inputs taken block
      by block from the quantized model); "gptq" needs it, and so does "awq" (activation-aware channel scales
      folded into the norms, then "mse" / "rtn" weights).
    zero_point: for asymmetric int4 (symmetric=False), "int" (uint8 zero-points 0..15, the range widened to hold
      0) or "float" (fp32 zero-points: each group's own [min, max] onto the 16 codes, GGUF Q4_1's grid; 3 more
      bytes per group and column). Left at None it is "int"; symmetric formats take None only.
    smooth: SmoothQuant for the activation-quantized formats (dynamic_activations=True; needs
      ``patch(..., calibration=...)``): True searches alpha per normalization layer, a float in (0, 1) fixes it;
      the factors are folded into the norms feeding the layers (no op added). None/False: no smoothing.
    act_order: with method="gptq", quantize the columns in order of decreasing input mean square (static group
      scales; the packed layout is unchanged).
    """

    weight_bits: int = 8
    group_size: Optional[int] = None
    symmetric: bool = True
    dynamic_activations: bool = False
    backend: Union[str, Backend] = Backend.AUTO
    method: Optional[str] = None
    zero_point: Optional[str] = None
    smooth: Union[None, bool, float] = None
    act_order: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str, got: object) -> ValueError:
            return ValueError(f"QuantConfig.{field} must be {allowed}, got {got!r}")

        if isinstance(self.weight_bits, bool) or self.weight_bits not in (8, 4):
            raise bad("weight_bits", "one of [8, 4]", self.weight_bits)
        for field in ("symmetric", "dynamic_activations", "act_order"):
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
        if self.symmetric or self.weight_bits == 8:
            if self.zero_point is not None:
                raise bad("zero_point", "None for symmetric formats (their zero-point is implicit)", self.zero_point)
        else:
            if self.zero_point is None:
                object.__setattr__(self, "zero_point", "int")
            if self.zero_point not in ZERO_POINTS:
                raise bad("zero_point", f"one of {list(ZERO_POINTS)} for asymmetric int4", self.zero_point)
        if self.smooth is False:
            object.__setattr__(self, "smooth", None)
        if self.smooth is not None:
            if not (self.smooth is True or (isinstance(self.smooth, float) and 0.0 < self.smooth < 1.0)):
                raise bad("smooth", "None, a bool, or a float alpha in (0, 1)", self.smooth)
            if self.method == "awq":
                raise bad("smooth", "None with method='awq' (both fold scales into the norms)", self.smooth)
            if not self.dynamic_activations:
                raise bad("smooth", "None for weight-only formats (smoothing needs dynamic_activations=True)",
                          self.smooth)
        object.__setattr__(self, "backend", normalize_backend(self.backend, "QuantConfig.backend"))
        if self.method is None:  # the default: error-minimising scales for int4, round-to-nearest for int8
            object.__setattr__(self, "method", "mse" if self.weight_bits == 4 else "rtn")
        if self.method not in QUANT_METHODS:
            raise bad("method", f"one of {list(QUANT_METHODS)}", self.method)
        if self.act_order and self.method != "gptq":
            raise bad("act_order", f"False unless method='gptq' (the order GPTQ quantizes columns in; "
                                   f"method={self.method!r})", self.act_order)
        why = backend_problem("quantized_linear", self.backend, bits=self.weight_bits, group_size=self.group_size,
                              dynamic_act=self.dynamic_activations)
        if why:
            raise bad_backend("QuantConfig.backend", self.name, self.backend, why)

    @property
    def name(self) -> str:
        """Short human name, e.g. 'int8', 'int4-g128-asym', 'w4a8-g64'."""
        if self.weight_bits == 8:
            base = "w8a8" if self.dynamic_activations else "int8"
        else:
            base = ("w4a8" if self.dynamic_activations else "int4") + f"-g{self.group_size}"
            if not self.symmetric:
                base += "-fzero" if self.float_zero else "-asym"
        if self.smooth is not None:
            base += "-smooth" if self.smooth is True else f"-smooth{self.smooth:g}"
        return base

    @property
    def float_zero(self) -> bool:
        """Asymmetric int4 with float zero-points (zero_point="float")."""
        return self.zero_point == "float"

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


def _bad(cls: str, field: str, allowed: str, got: object) -> ValueError:
    return ValueError(f"{cls}.{field} must be {allowed}, got {got!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Block-sparse attention swapped in by ``kernswap.patch(model, attention=...)``.

    Per head, the kept (query block, key block) pairs are: the first ``sink_blocks`` key blocks (attention
    sinks), the ``local_blocks`` key blocks ending at the query's own block (sliding window), and the
    best-scoring other blocks (pooled q . pooled k) up to ``density`` of the causal block pairs of each query
    block row. ``density=1.0`` is dense causal attention. Sequences whose key length is below ``min_seq_len``
    run dense attention (torch's SDPA).
    block_size: 16..256, a multiple of 16. backend: "auto" | "cpu" | "triton" | "reference".
    """

    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    density: float = 0.5
    min_seq_len: int = 1024
    backend: Union[str, Backend] = Backend.AUTO

    def __post_init__(self) -> None:
        c = "SparseAttentionConfig"
        if not _is_int(self.block_size) or not (16 <= self.block_size <= 256) or self.block_size % 16:
            raise _bad(c, "block_size", "an int in [16, 256] that is a multiple of 16", self.block_size)
        for field in ("sink_blocks", "local_blocks", "min_seq_len"):
            v = getattr(self, field)
            if not _is_int(v) or v < 0:
                raise _bad(c, field, "an int >= 0", v)
        if self.local_blocks < 1:
            raise _bad(c, "local_blocks", "an int >= 1 (the diagonal block is always kept)", self.local_blocks)
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < float(d) <= 1.0):
            raise _bad(c, "density", "a float in (0, 1]", d)
        object.__setattr__(self, "density", float(d))
        object.__setattr__(self, "backend", normalize_backend(self.backend, f"{c}.backend"))
        why = backend_problem("block_sparse_attention", self.backend)
        if why:
            raise bad_backend(f"{c}.backend", "block-sparse attention", self.backend, why)

    @property
    def name(self) -> str:
        return (f"sparse-b{self.block_size}-s{self.sink_blocks}-w{self.local_blocks}-d{self.density:g}"
                f"-min{self.min_seq_len}")

    @classmethod
    def from_any(cls, x: Union["SparseAttentionConfig", str]) -> "SparseAttentionConfig":
        """A SparseAttentionConfig or a shortcut: "sparse" (the defaults) or "dense" (every causal block, through
        kernswap's kernel from 256 keys on: dense prefill attention, exact to fp32 rounding)."""
        if isinstance(x, SparseAttentionConfig):
            return x
        if isinstance(x, str) and x.strip().lower() in ATTENTION_SHORTCUTS:
            return cls(**ATTENTION_SHORTCUTS[x.strip().lower()])
        raise ValueError(f"attention must be a kernswap.SparseAttentionConfig or one of {sorted(ATTENTION_SHORTCUTS)}, "
                         f"got {x!r}")


ATTENTION_SHORTCUTS = {"sparse": {}, "dense": {"density": 1.0, "min_seq_len": 256}}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Fused mixture-of-experts swapped in by ``kernswap.patch(model, moe=...)``.

    quant: None (experts keep their float weights, or take patch()'s ``quant=`` when that is given) | a
      QuantConfig or shortcut ("int8", "int4", "w8a8", "w4a8") for the experts only.
    backend: "auto" | "cpu" | "cuda" | "triton" | "reference".
    The experts' formats store integer zero-points only (an asymmetric quant takes zero_point="int").
    """

    quant: Union[None, str, QuantConfig] = None
    backend: Union[str, Backend] = Backend.AUTO

    def __post_init__(self) -> None:
        if self.quant is not None:
            try:
                object.__setattr__(self, "quant", QuantConfig.from_any(self.quant))
            except ValueError as e:
                raise ValueError(f"MoEConfig.quant must be None, a QuantConfig or one of {sorted(SHORTCUTS)}, "
                                 f"got {self.quant!r}") from e
        object.__setattr__(self, "backend", normalize_backend(self.backend, "MoEConfig.backend"))
        why = moe_backend_problem(self.backend, self.quant is not None)
        if why:
            raise bad_backend("MoEConfig.backend", "the fused experts" + (f" ({self.quant.name})" if self.quant else ""),
                              self.backend, why)

    @property
    def name(self) -> str:
        return "fused" + ("" if self.quant is None else f"-{self.quant.name}")

    @classmethod
    def from_any(cls, x: Union["MoEConfig", str]) -> "MoEConfig":
        """A MoEConfig or the shortcut "fused" (float experts unless patch() also gets quant=)."""
        if isinstance(x, MoEConfig):
            return x
        if isinstance(x, str) and x.strip().lower() == "fused":
            return cls()
        raise ValueError(f"moe must be a kernswap.MoEConfig or 'fused', got {x!r}")
