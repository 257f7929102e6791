"""Quantized weight formats. Each is defined once: quantize/pack, unpack, dequantize."""
import dataclasses

import torch

from .base import TILE_N, QuantizedWeight, layout, padded_n
from .int4 import int4_from_codes, pack_int4, quantize_int4, unpack_int4
from .int8 import int8_from_codes, pack_int8, quantize_int8, unpack_int8
from .scale_search import importance_of

__all__ = ["QuantizedWeight", "quantize", "quantize_int8", "quantize_int4", "pack_int8", "unpack_int8",
           "pack_int4", "unpack_int4", "layout", "padded_n", "TILE_N"]


def quantize(w, config, hessian=None) -> QuantizedWeight:
    """Quantize a float [N, K] weight with a QuantConfig (or a shortcut string such as "int4"). method="gptq" needs
    ``hessian``, the [K, K] second moment of the layer's inputs (kernswap.calibration); with method="mse" a given
    hessian ([K, K], or only its diagonal [K]) weights each group's squared error by its input channels' mean
    squares (activation-weighted error)."""
    from ..config import QuantConfig

    cfg = QuantConfig.from_any(config)
    if cfg.method == "gptq":
        return _quantize_gptq(w, cfg, hessian)
    if cfg.method == "awq":  # the weights arrive already scaled (kernswap.calibration.awq)
        from ..calibration.awq import base_method

        cfg = dataclasses.replace(cfg, method=base_method(cfg))
    imp = importance_of(hessian) if hessian is not None and cfg.method == "mse" else None
    if cfg.weight_bits == 8:
        return quantize_int8(w, dynamic_activations=cfg.dynamic_activations, method=cfg.method, importance=imp)
    return quantize_int4(w, cfg.group_size, cfg.symmetric, dynamic_activations=cfg.dynamic_activations,
                         method=cfg.method, float_zero=cfg.float_zero, importance=imp)


def _quantize_gptq(w, cfg, hessian) -> QuantizedWeight:
    from ..calibration.gptq import gptq_quantize
    from .int8 import _check_weight

    _check_weight(w, "quantize")
    if hessian is None:
        raise ValueError("quantize: method='gptq' needs the layer inputs' Hessian (pass calibration= to "
                         "kernswap.patch, which collects it)")
    g = cfg.group_size if cfg.weight_bits == 4 else w.shape[1]
    if cfg.weight_bits == 4 and w.shape[1] % g:
        raise ValueError(f"quantize_int4: in_features must be divisible by group_size={g}, got {w.shape[1]}")
    q, s, z = gptq_quantize(w, hessian, cfg.weight_bits, g, cfg.symmetric, float_zero=cfg.float_zero,
                            act_order=cfg.act_order)
    if cfg.weight_bits == 8:
        return int8_from_codes(q, s[:, 0], cfg.dynamic_activations)
    if z is not None and not cfg.float_zero:
        z = z.round().to(torch.int32)  # integer zero-points (gptq_quantize returns them as floats)
    return int4_from_codes(q if z is not None else q + 8, s, z, g, cfg.dynamic_activations)
