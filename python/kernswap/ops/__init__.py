"""Public functional API. Each op is declared once as a torch.library custom op (torch.ops.kernswap.*)."""
from .block_sparse_attention import block_sparse_attention
from .quantized_linear import auto_backend, backend_available, choose_backend, quantized_linear

__all__ = ["quantized_linear", "choose_backend", "backend_available", "auto_backend", "block_sparse_attention"]
