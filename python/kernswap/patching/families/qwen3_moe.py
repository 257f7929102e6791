"""Qwen3-MoE: sparse MoE block (router `gate`, stacked `experts`); layers listed in
`mlp_only_layers` (or off the `decoder_sparse_step`) have a dense MLP, found by class at run time."""
from . import FamilySpec, register
from ._common import ATTENTION, EXPERTS, FUSE, MOE, MOE_SKIP

SPEC = register(FamilySpec(name="qwen3_moe", model_types=("qwen3_moe",), attention=ATTENTION, moe=MOE,
                           experts=EXPERTS, skip=MOE_SKIP, fuse=FUSE))
