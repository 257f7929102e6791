"""Tiny random models of each declared family, built from transformers' config classes (fast tests)."""
from typing import Dict, Tuple

import torch

__all__ = ["TINY_FAMILIES", "MOE_FAMILIES", "tiny_config", "tiny_model", "expected_linear_count"]

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3") + MOE_FAMILIES

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, head_dim=16, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_EXTRA: Dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96),
    # layer 1 is a dense MLP (mlp_only_layers): patching must see it as an MLP, not a MoE block
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[1]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
            "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
            "olmoe": "OlmoeConfig"}


def tiny_config(family: str, **overrides):
    import transformers

    kw = dict(_BASE, **_EXTRA.get(family, {}))
    kw.update(overrides)
    return getattr(transformers, _CLASSES[family])(**kw)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random tiny CausalLM of ``family`` in eval mode (weights scaled up so logits are not ~0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype).eval()
    with torch.no_grad():  # std 0.02 init gives near-uniform logits; spread them so comparisons mean something
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
    return model


def expected_linear_count(family: str, num_layers: int = 2, fused: bool = False) -> Tuple[int, int]:
    """(attention, MLP) QuantLinear layers made with the default skip list, for the tiny config: one per Linear, or
    with ``fused`` (patch's default) one per q/k/v group and per gate/up pair plus o_proj and down_proj."""
    per_attn, per_mlp = (2, 2) if fused else (4, 3)
    attn = per_attn * num_layers
    if family in ("mixtral", "olmoe"):
        return attn, 0  # experts are stacked 3-D params, the router is not a Linear
    if family == "qwen2_moe":
        return attn, per_mlp * num_layers  # shared_expert gate/up/down; shared_expert_gate skipped
    if family == "qwen3_moe":
        return attn, per_mlp  # layer 1 is dense (mlp_only_layers=[1])
    return attn, per_mlp * num_layers
