"""Modules built on kernswap.ops."""
from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
