"""AttentionRule: swap the attention computation of a declared family for block-sparse attention.

transformers' extension point is used: the model's config names the attention function
(``config._attn_implementation``); the rule registers ``"kernswap_sparse"`` with transformers, points the
configs of this model's attention modules at it and tags each attention module with the
:class:`~kernswap.SparseAttentionConfig` (modules without the tag, e.g. another model sharing the config,
run dense SDPA). Everything is undone by ``unpatch`` or by a failure later in ``patch``.
"""
import dataclasses
from typing import Any, List

from torch import nn

from ..config import SparseAttentionConfig
from ..nn.sparse_attention import ATTN_NAME, MODULE_ATTR, POOL_ATTR, register_with_transformers
from .families import FamilySpec, match_any
from .rules import Action, Plan, Skip

__all__ = ["AttentionRule", "AttrSet"]

_MISSING = object()


@dataclasses.dataclass
class AttrSet:
    """Undo record: ``obj.<attr>`` was ``old`` (or absent) and is now set."""

    obj: Any
    attr: str
    old: Any

    def undo(self) -> None:
        if self.old is _MISSING:
            self.obj.__dict__.pop(self.attr, None)
        else:
            setattr(self.obj, self.attr, self.old)


def _set(obj, attr: str, value) -> AttrSet:
    old = obj.__dict__.get(attr, _MISSING)
    setattr(obj, attr, value)
    return AttrSet(obj, attr, old)


class AttentionRule:
    kind = "attention"

    def __init__(self, config: SparseAttentionConfig):
        self.config = config

    def plan(self, model: nn.Module, family: FamilySpec) -> Plan:
        if not family.attention:
            raise NotImplementedError(
                f"kernswap.patch: attention= swaps need a declared model family; this model's family is "
                f"{family.name!r} (declared: see kernswap.patching.families)")
        plan = Plan()
        configs = {}
        for name, mod in model.named_modules():
            if not match_any(name, family.attention) or name.count(".") != family.attention[0].count("."):
                continue
            cfg = getattr(mod, "config", None)
            if cfg is None or not hasattr(cfg, "_attn_implementation_internal"):
                plan.skipped.append(Skip(name, "attention module without a transformers config: not swapped"))
                continue
            configs.setdefault(id(cfg), cfg)
            plan.actions.append(Action(name=name, role="attention",
                                       kind=f"attention -> block-sparse [{self.config.name}]",
                                       run=self._tag(mod)))
        if not plan.actions:
            raise NotImplementedError(f"kernswap.patch: no attention module of family {family.name!r} found "
                                      f"(patterns {family.attention})")
        plan.actions.append(Action(name="config._attn_implementation", role="attention",
                                   kind=f"attention function -> {ATTN_NAME}",
                                   run=self._switch(list(configs.values()))))
        plan.notes.append(
            f"sparse attention ({self.config.name}): keys shorter than {self.config.min_seq_len}, attention masks "
            f"with padding and sliding-window layers run dense SDPA")
        return plan

    def _tag(self, mod: nn.Module):
        def run() -> List[AttrSet]:
            # the key pool is created later, by the first decode step: its record removes it on unpatch
            return [_set(mod, MODULE_ATTR, self.config), AttrSet(mod, POOL_ATTR, mod.__dict__.get(POOL_ATTR, _MISSING))]

        return run

    @staticmethod
    def _switch(configs):
        def run() -> List[AttrSet]:
            register_with_transformers()
            return [_set(cfg, "_attn_implementation_internal", ATTN_NAME) for cfg in configs]

        return run
