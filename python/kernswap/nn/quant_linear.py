"""QuantLinear: a drop-in nn.Linear replacement holding a packed quantized weight as buffers."""
from typing import Optional, Union

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..formats import QuantizedWeight, layout, quantize
from .. import _ext
from ..backends import cpu as _cpu_backend
from ..ops._dispatch import eager_fast_path
from ._state import CachedRunnerModule, tensor_key
from ..ops.quantized_linear import check_bias, quantized_linear

__all__ = ["QuantLinear"]

_FORMAT_VERSION = 1
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _format_meta(cfg: QuantConfig, in_features: int, out_features: int) -> torch.Tensor:
    g = cfg.group_size if cfg.group_size is not None else 0
    # the zero-point slot: 1 symmetric, 0 integer zero-points, 2 float zero-points
    zp = 1 if cfg.symmetric else (2 if cfg.float_zero else 0)
    return torch.tensor([_FORMAT_VERSION, cfg.weight_bits, g, zp, int(cfg.dynamic_activations),
                         in_features, out_features], dtype=torch.int64)


def _describe_meta(meta) -> str:
    v, bits, g, sym, dyn, k, n = [int(t) for t in meta]
    zp = f", zero_point={'float' if sym == 2 else 'int'!r}" if sym != 1 else ""
    return (f"weight_bits={bits}, group_size={g or None}, symmetric={sym == 1}{zp}, dynamic_activations={bool(dyn)}, "
            f"in_features={k}, out_features={n}")


class QuantLinear(CachedRunnerModule):
    """y = x @ W^T + b with W stored packed (int8 per channel or int4 group-wise; see kernswap.formats).

    Buffers: ``packed`` (int8/uint8), ``scale`` (always fp32), ``zero`` (asymmetric int4 only: uint8, or fp32 for
    ``zero_point="float"``),
    ``qformat`` (int64 metadata checked on load). ``bias`` is a Parameter in the original Linear's dtype.
    ``.to(dtype)`` casts the bias only; ``.to(device)`` moves everything without repacking.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Union[QuantConfig, str, None] = None, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        cfg = QuantConfig() if config is None else QuantConfig.from_any(config)
        if cfg.weight_bits == 4 and in_features % cfg.group_size:
            raise ValueError(f"QuantLinear: in_features must be divisible by group_size={cfg.group_size} for int4, "
                             f"got in_features={in_features}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"QuantLinear: in_features and out_features must be > 0, "
                             f"got in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features, self.config = in_features, out_features, cfg
        group = cfg.group_size if cfg.weight_bits == 4 else in_features
        spec = layout(cfg.weight_bits, group, cfg.symmetric, out_features, in_features, cfg.float_zero)
        for name in ("packed", "scale", "zero"):
            if spec[name] is None:
                self.register_buffer(name, None)
            else:
                shape, dt = spec[name]
                self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.register_buffer("qformat", _format_meta(cfg, in_features, out_features).to(device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(),
                                                 device=device))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Union[QuantConfig, str] = "int8",
                    hessian: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize an nn.Linear (fp32/bf16/fp16 weight). The bias keeps its dtype; buffers stay on its device.
        ``hessian`` ([in, in], the layer inputs' second moment) is what method="gptq" needs; method="mse" weights
        its error by the hessian's diagonal (or a given [in] vector of the inputs' mean squares)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        cfg = QuantConfig.from_any(config)
        w = linear.weight
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"QuantLinear.from_linear: linear.weight.dtype must be one of torch.float32, "
                            f"torch.bfloat16, torch.float16, got {w.dtype}")
        if w.device.type == "meta":
            raise ValueError("QuantLinear.from_linear: linear.weight is on the meta device (no values to quantize)")
        k, n = linear.in_features, linear.out_features
        if cfg.weight_bits == 4 and k % cfg.group_size:
            raise ValueError(f"QuantLinear.from_linear: in_features must be divisible by group_size="
                             f"{cfg.group_size} for int4, got in_features={k}")
        has_bias = linear.bias is not None
        mod = cls(k, n, bias=has_bias, config=cfg, device=w.device,
                  dtype=linear.bias.dtype if has_bias else w.dtype)
        mod.load_quantized(quantize(w.detach(), cfg, hessian))
        if has_bias:
            with torch.no_grad():
                mod.bias.copy_(linear.bias.detach())
        return mod

    def load_quantized(self, qw: QuantizedWeight) -> None:
        """Copy a QuantizedWeight (same format and sizes) into the buffers."""
        cfg = self.config
        if (qw.in_features, qw.out_features, qw.bits, qw.symmetric, qw.float_zero) != (
                self.in_features, self.out_features, cfg.weight_bits, cfg.symmetric, cfg.float_zero):
            raise ValueError(f"QuantLinear.load_quantized: expected in_features={self.in_features}, out_features="
                             f"{self.out_features}, bits={cfg.weight_bits}, symmetric={cfg.symmetric}, "
                             f"float zero-points={cfg.float_zero}, got in_features={qw.in_features}, out_features="
                             f"{qw.out_features}, bits={qw.bits}, symmetric={qw.symmetric}, "
                             f"float zero-points={qw.float_zero}")
        with torch.no_grad():
            self.packed.copy_(qw.packed)
            self.scale.copy_(qw.scale)
            if self.zero is not None:
                self.zero.copy_(qw.zero)

    @property
    def qweight(self) -> QuantizedWeight:
        """The buffers viewed as a QuantizedWeight (no copy; rebuilt only when a buffer object changes)."""
        # a replaced `.data`, an in-place edit or edited sizes / config are re-validated below; torch.compile traces
        # the construction (the graph's guards cover the buffers) and neither reads nor writes the cache
        compiling = torch.compiler.is_compiling()
        key = None if compiling else (tensor_key(self.packed, self.scale, self.zero)
                                      + (self.in_features, self.out_features, id(self.config)))
        cached = None if compiling else self.__dict__.get("_qweight_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        cfg = self.config
        qw = QuantizedWeight(packed=self.packed, scale=self.scale, zero=self.zero, bits=cfg.weight_bits,
                               group_size=cfg.group_size if cfg.weight_bits == 4 else self.in_features,
                               symmetric=cfg.symmetric, in_features=self.in_features,
                               out_features=self.out_features, dynamic_activations=cfg.dynamic_activations)
        if not compiling:  # (a cache written while tracing would be guarded on, and every eager call retrace)
            self.__dict__["_qweight_cache"] = (key, qw)
        return qw

    def dequantize_weight(self) -> torch.Tensor:
        """fp32 [out_features, in_features] weight this module represents."""
        return self.qweight.dequantize()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._cpu_runner(x)
        if run is not None:  # eager CPU inference: the op's cpu kernel with this layer's arguments prepared once
            lead = x.shape[:-1]
            return run(x.reshape(-1, self.in_features).contiguous()).reshape(*lead, self.out_features)
        return quantized_linear(x, self.qweight, self.bias, backend=self.config.backend)

    def _cpu_runner(self, x: torch.Tensor):
        """The prepared cpu-backend runner when this call is plain eager CPU inference that ``auto``/``cpu``
        would send to the compiled kernel anyway (else None: the general path checks and dispatches). The runner is
        prepared from buffers checked by the op's own checks (the QuantizedWeight view runs check_format, the bias
        check_bias) and rebuilt when a buffer, its storage or version, the sizes or the config change."""
        if torch.compiler.is_compiling():
            return None
        bufs = self._buffers  # (the Module's own dicts: a third of the cost of four attribute look-ups)
        packed, scale, zero, b = bufs["packed"], bufs["scale"], bufs["zero"], self._parameters["bias"]
        if (x.device.type != "cpu" or x.dtype not in _FLOAT_DTYPES or x.dim() == 0 or x.numel() == 0
                or x.shape[-1] != self.in_features or self.config.backend.value not in ("auto", "cpu")
                or packed.device.type != "cpu" or not eager_fast_path(x, b)):
            return None
        key = tensor_key(packed, scale, zero, b) + (id(_ext.get_C()), self.in_features, self.out_features,
                                                    id(self.config))
        cached = self.__dict__.get("_runner_cache")
        if cached is None or cached[0] != key:
            qw = self.qweight
            check_bias("quantized_linear", b, qw.out_features, qw.device)
            run = _cpu_backend.prepare(qw.packed, qw.scale, qw.zero, b, qw.bits, qw.group_size, qw.in_features,
                                       qw.out_features, qw.dynamic_activations) if _ext.have_cpu_ext() else None
            cached = self.__dict__["_runner_cache"] = (key, run)
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.config.name}, backend={self.config.backend.value}")

    # ------------------------------------------------------------------ torch plumbing
    def __setattr__(self, name, value):
        # transformers' tie_weights() re-ties an output head to the input embeddings by assigning the table as
        # `head.weight`: a quantized head (patch(lm_head=...)) computes with its own packed copy and holds no float
        # weight, so the tie is not re-made (the table would otherwise ride along as an unused parameter)
        if name == "weight" and isinstance(value, nn.Parameter):
            return
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        """Module.to(dtype)/.half() cast floating buffers; ``scale`` must stay fp32. Move it as an int32 view so
        ``fn`` changes only its device (bit-exact), never its dtype. Packed int buffers are never cast by .to()."""
        scale = self._buffers.pop("scale")
        try:
            super()._apply(fn, recurse)
        finally:
            if scale is not None:
                scale = fn(scale.view(torch.int32)).view(torch.float32)
            self._buffers["scale"] = scale
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        meta = state_dict.get(prefix + "qformat")
        mine = self.qformat
        if meta is not None and (tuple(meta.shape) != tuple(mine.shape) or not torch.equal(meta.cpu(), mine.cpu())):
            got = _describe_meta(meta) if tuple(meta.shape) == tuple(mine.shape) else f"format {meta.tolist()}"
            error_msgs.append(f"QuantLinear: state_dict format mismatch for '{prefix[:-1] or '<root>'}': this module "
                              f"has {_describe_meta(mine)}, the state_dict has {got}; build the module with the "
                              f"same QuantConfig and sizes")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
