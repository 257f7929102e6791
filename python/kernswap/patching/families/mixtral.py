"""Mixtral: sparse MoE block (router `gate`, stacked `experts`), no shared expert."""
from . import FamilySpec, register
from ._common import ATTENTION, EXPERTS, FUSE, MOE, MOE_SKIP

SPEC = register(FamilySpec(name="mixtral", model_types=("mixtral",), attention=ATTENTION, moe=MOE,
                           experts=EXPERTS, skip=MOE_SKIP, fuse=FUSE))
