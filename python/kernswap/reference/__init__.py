"""Pure-PyTorch reference implementations (fallback backend and test oracle)."""
from .quantized_linear import quantize_activations, quantized_linear_ref, reference_linear

__all__ = ["quantized_linear_ref", "reference_linear", "quantize_activations"]
