"""Shared patterns of decoder-only transformers (``model.layers.N.self_attn`` / ``.mlp``)."""
ATTENTION = ("model.layers.*.self_attn",)
MLP = ("model.layers.*.mlp",)
MOE = ("model.layers.*.mlp",)
EXPERTS = ("model.layers.*.mlp.experts",)
DENSE_SKIP = ("lm_head",)
# MoE routers are `TopKRouter` modules (not nn.Linear) in transformers 5; the pattern also covers
# older/nn.Linear routers. Quantizing a router changes which experts run: never by default.
MOE_SKIP = ("lm_head", "model.layers.*.mlp.gate")
# q/k/v of an attention block and gate/up of a SwiGLU MLP each read one input: one call each when quantized
FUSE = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))
