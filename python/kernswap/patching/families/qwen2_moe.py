"""Qwen2-MoE: sparse MoE block with router `gate`, stacked `experts`, a dense `shared_expert`
(quantized like an MLP) and its 1-output `shared_expert_gate` (a gate: skipped)."""
from . import FamilySpec, register
from ._common import ATTENTION, EXPERTS, FUSE, MOE, MOE_SKIP

SPEC = register(FamilySpec(
    name="qwen2_moe", model_types=("qwen2_moe",), attention=ATTENTION, moe=MOE, experts=EXPERTS,
    mlp=("model.layers.*.mlp.shared_expert",),
    skip=MOE_SKIP + ("model.layers.*.mlp.shared_expert_gate",),
    fuse=FUSE,
))
