"""What the swapped forwards check about a transformers module's parts before they take a call over: one
definition of each fact (nn/decode_layer.py, nn/decode_model.py, nn/mlp_forward.py, nn/fused_moe.py)."""
import torch.nn as nn

__all__ = ["is_silu", "hook_dicts", "hooked"]


def is_silu(act) -> bool:
    """``act`` computes SiLU: torch's module or transformers' SiLUActivation (what the fused SwiGLU kernels do)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def hook_dicts(mod: nn.Module) -> tuple:
    """``mod``'s forward, pre-forward, backward and pre-backward hooks (the dicts nn.Module.__call__ runs; the
    with-kwargs flags only mark entries of the first two)."""
    return mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks


def hooked(mod: nn.Module) -> bool:
    """``mod`` has a hook: a call must go through nn.Module.__call__ for it."""
    return any(hook_dicts(mod))
