"""Calibration-based quantization: the layer inputs' second moments (Hessians) from user text, and GPTQ."""
from .gptq import gptq_quantize
from .hessians import collect_hessians, normalize_calibration, sequential_hessians

__all__ = ["gptq_quantize", "collect_hessians", "normalize_calibration", "sequential_hessians"]
