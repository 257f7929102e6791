"""Quantized weight formats. Each is defined once: quantize/pack, unpack, dequantize."""
from .base import TILE_N, QuantizedWeight, layout, padded_n
from .int4 import pack_int4, quantize_int4, unpack_int4
from .int8 import pack_int8, quantize_int8, unpack_int8

__all__ = ["QuantizedWeight", "quantize", "quantize_int8", "quantize_int4", "pack_int8", "unpack_int8",
           "pack_int4", "unpack_int4", "layout", "padded_n", "TILE_N"]


def quantize(w, config) -> QuantizedWeight:
    """Quantize a float [N, K] weight with a QuantConfig (or a shortcut string such as "int4")."""
    from ..config import QuantConfig

    cfg = QuantConfig.from_any(config)
    if cfg.weight_bits == 8:
        return quantize_int8(w, dynamic_activations=cfg.dynamic_activations, method=cfg.method)
    return quantize_int4(w, cfg.group_size, cfg.symmetric, dynamic_activations=cfg.dynamic_activations,
                         method=cfg.method)
