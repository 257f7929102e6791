"""What the swapped forwards check about a transformers module's parts before they take a call over: one
definition of each fact (nn/decode_layer.py, nn/decode_model.py, nn/mlp_forward.py, nn/fused_moe.py)."""
import torch.nn as nn

__all__ = ["is_silu", "hooked"]


def is_silu(act) -> bool:
    """``act`` computes SiLU: torch's module or transformers' SiLUActivation (what the fused SwiGLU kernels do)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def hooked(mod: nn.Module) -> bool:
    """``mod`` has forward (pre-)hooks or backward hooks: a call must go through nn.Module.__call__ for them."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                or getattr(mod, "_forward_hooks_with_kwargs", None))
