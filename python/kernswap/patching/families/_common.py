"""Shared patterns of decoder-only transformers (``model.layers.N.self_attn`` / ``.mlp``)."""
ATTENTION = ("model.layers.*.self_attn",)
MLP = ("model.layers.*.mlp",)
MOE = ("model.layers.*.mlp",)
EXPERTS = ("model.layers.*.mlp.experts",)
DENSE_SKIP = ("lm_head",)
# MoE routers are `TopKRouter` modules (not nn.Linear) in transformers 5; the pattern also covers
# older/nn.Linear routers. Quantizing a router changes which experts run: never by default.
MOE_SKIP = ("lm_head", "model.layers.*.mlp.gate")
