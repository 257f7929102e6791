"""Public functional API. Each op is declared once as a torch.library custom op (torch.ops.kernswap.*)."""
from .block_sparse_attention import block_sparse_attention
from .decode_layer_step import decode_layer_step
from .fused_moe import fused_moe
from .moe_align import moe_align
from .moe_combine import moe_combine
from .moe_experts import moe_experts
from .moe_route import moe_route
from .quantized_linear import auto_backend, backend_available, choose_backend, quantized_linear

__all__ = ["fused_moe", "moe_route", "moe_align", "moe_experts", "moe_combine",
           "quantized_linear", "choose_backend", "backend_available", "auto_backend", "block_sparse_attention",
           "decode_layer_step"]
