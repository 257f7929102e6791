"""Model-family declarations: which modules are attention, MLP, MoE, and which Linear layers to skip.

Each family lives in its own short file and registers one :class:`FamilySpec`. Patterns are
``fnmatch`` globs over qualified module names (``*`` also crosses dots); a pattern without a dot
also matches the last component of a name (``"lm_head"`` matches ``"lm_head"`` and ``"x.lm_head"``).
A later rule (attention, MoE) finds its targets through the same spec, so a new swap needs no new
family code beyond filling the relevant field.
"""
import dataclasses
import fnmatch
import importlib
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["FamilySpec", "register", "get_family", "families", "GENERIC", "match_any"]


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: Tuple[str, ...]
    attention: Tuple[str, ...] = ()  # attention modules (targets of attention=...)
    mlp: Tuple[str, ...] = ()  # dense MLP blocks (and MoE shared experts)
    moe: Tuple[str, ...] = ()  # sparse MoE blocks (targets of moe=...)
    experts: Tuple[str, ...] = ()  # stacked 3-D expert weights: not nn.Linear, left to the MoE swap
    skip: Tuple[str, ...] = ("lm_head",)  # Linear layers never quantized by default (heads, routers, gates)
    # sibling Linear layers of one attention/MLP block that read the same input, fused into one quantized call:
    # (name of the fused layer on the block, (the siblings' attribute names, in row order))
    fuse: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    notes: Tuple[str, ...] = ()

    def role_of(self, name: str) -> str:
        """'attention' / 'moe' / 'mlp' / 'other' for a module name (the innermost declared block wins)."""
        best, best_len = "other", -1
        for role, pats in (("attention", self.attention), ("mlp", self.mlp), ("moe", self.moe)):
            for pat in pats:
                if (name == pat or fnmatch.fnmatchcase(name, pat + ".*")) or fnmatch.fnmatchcase(name, pat):
                    depth = pat.count(".")
                    if depth > best_len:
                        best, best_len = role, depth
        return best


def match_any(name: str, patterns: Sequence[str]) -> Optional[str]:
    """The first pattern matching ``name`` (see module doc), or None."""
    last = name.rsplit(".", 1)[-1]
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or ("." not in pat and fnmatch.fnmatchcase(last, pat)):
            return pat
    return None


GENERIC = FamilySpec(
    name="generic",
    model_types=(),
    skip=("lm_head", "*embed*", "*router*", "gate"),
    notes=("unknown model family: generic rule (every nn.Linear except the skip list); "
           "attention/MoE swaps are not available for it",),
)

_REGISTRY: Dict[str, FamilySpec] = {}
_FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_loaded = False


def register(spec: FamilySpec) -> FamilySpec:
    for mt in spec.model_types:
        _REGISTRY[mt] = spec
    return spec


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in _FAMILY_MODULES:
            importlib.import_module(f"{__name__}.{mod}")
        _loaded = True


def families() -> Dict[str, FamilySpec]:
    """model_type -> FamilySpec for every declared family."""
    _load_all()
    return dict(_REGISTRY)


def get_family(model_type: Optional[str]) -> FamilySpec:
    """The declared family for ``model_type``; :data:`GENERIC` when there is none."""
    _load_all()
    return _REGISTRY.get(model_type or "", GENERIC)
