"""OLMoE: sparse MoE block (router `gate`, stacked `experts`), q/k norms in attention."""
from . import FamilySpec, register
from ._common import ATTENTION, EXPERTS, FUSE, MOE, MOE_SKIP

SPEC = register(FamilySpec(name="olmoe", model_types=("olmoe",), attention=ATTENTION, moe=MOE,
                           experts=EXPERTS, skip=MOE_SKIP, fuse=FUSE))
