"""Modules built on kernswap.ops."""
from .fused_moe import FusedExperts
from .quant_linear import QuantLinear

__all__ = ["QuantLinear", "FusedExperts"]
