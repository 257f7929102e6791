"""Qwen3: dense decoder (q/k/v/o_proj attention, gate/up/down_proj MLP)."""
from . import FamilySpec, register
from ._common import ATTENTION, DENSE_SKIP, FUSE, MLP

SPEC = register(FamilySpec(name="qwen3", model_types=("qwen3",), attention=ATTENTION, mlp=MLP, skip=DENSE_SKIP,
                           fuse=FUSE))
