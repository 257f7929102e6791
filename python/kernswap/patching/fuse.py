"""FusedProjectionRule: sibling Linear layers of a block that read the same input (the family's ``fuse`` groups:
q/k/v of attention, gate/up of a SwiGLU MLP) become one quantized layer on the block plus one slice per sibling
(kernswap.nn.fused_linear), so a decode step makes one kernel call per group instead of one per layer.

A group is fused only when every sibling is a plain ``nn.Linear`` the quantization rule would take anyway (not in the
skip list, not tied, quantizable in the config) and they agree on input width, dtype, device and bias; otherwise its
layers are quantized one by one. Undo: the slices are swapped back for the original layers and the fused layer is
removed from the block.
"""
import dataclasses
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .families import FamilySpec, match_any
from .rules import (Action, ModuleSwap, Plan, _block_role, check_quantizable, finer_group_notes, layer_config,
                    weight_error)

__all__ = ["FusedProjectionRule", "FusedAdd", "fused_name"]


@dataclasses.dataclass
class FusedAdd:
    """Undo record: the fused layer ``block.<attr>`` (built from the block's ``parts``) was added by kernswap."""

    block: nn.Module
    block_name: str
    attr: str
    parts: Tuple[str, ...]
    weight_error: Optional[float] = None

    def undo(self) -> None:
        self.block._modules.pop(self.attr, None)


def fused_name(entry: Dict[str, Any]) -> str:
    """The full module name of a fused layer from its plan entry ({"block", "name", "parts"})."""
    return f"{entry['block']}.{entry['name']}" if entry["block"] else entry["name"]


def _blocks(model: nn.Module, family: FamilySpec):
    pats = tuple(family.attention) + tuple(family.mlp) + tuple(family.moe)
    for name, mod in model.named_modules():
        if name and match_any(name, pats) and any(name.count(".") == p.count(".") for p in pats):
            yield name, mod


class FusedProjectionRule:
    """Plan the fused groups of ``family.fuse`` for quantization in ``config``. ``empty=True`` builds uninitialized
    fused layers (loading a saved model); ``only`` (saved plan entries) restricts the rule to those groups and raises
    when one cannot be rebuilt."""

    kind = "fuse"

    def __init__(self, config, skip: Sequence[str], empty: bool = False, only: Optional[Sequence[dict]] = None,
                 hessians: Optional[Dict[int, torch.Tensor]] = None):
        self.config = config
        self.hessians = hessians or {}  # id(layer) -> its inputs' Hessian: the siblings share one input
        self.skip = tuple(skip)
        self.empty = empty
        self.only = None if only is None else {(g["block"], g["name"]): tuple(g["parts"]) for g in only}

    def _groups(self, model: nn.Module, family: FamilySpec) -> List[Tuple[str, nn.Module, str, Tuple[str, ...]]]:
        """(block name, block, fused attribute, sibling attributes) of every group that can be fused."""
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        found = []
        for bname, block in _blocks(model, family):
            for attr, parts in family.fuse:
                if self.only is not None and self.only.get((bname, attr)) != tuple(parts):
                    continue
                if self._why_not(block, bname, attr, parts, uses) is None:
                    found.append((bname, block, attr, tuple(parts)))
        if self.only is not None:
            missing = set(self.only) - {(b, a) for b, _, a, _ in found}
            if missing:
                raise ValueError(f"load: the saved plan fuses layers this model cannot fuse: {sorted(missing)[:5]}")
        return found

    def _why_not(self, block: nn.Module, bname: str, attr: str, parts, uses) -> Optional[str]:
        mods = [block._modules.get(p) for p in parts]
        if attr in block._modules or hasattr(block, attr):
            return f"the block already has an attribute {attr!r}"
        if any(type(m) is not nn.Linear for m in mods):
            return "not every sibling is a plain nn.Linear"
        full = [f"{bname}.{p}" for p in parts]
        if any(match_any(n, self.skip) for n in full):
            return "a sibling is in the skip list"
        first = mods[0]
        if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
               or m.weight.device != first.weight.device or (m.bias is None) != (first.bias is None) for m in mods):
            return "the siblings differ in input width, dtype, device or bias"
        if any(uses[id(p)] > 1 for m in mods for p in m.parameters()):
            return "a sibling's weight is shared with another module"
        if not self.empty and any(check_quantizable(m, self.config) for m in mods):
            return "a sibling cannot be quantized in this format"
        return None

    def targets(self, model: nn.Module, family: FamilySpec) -> Set[str]:
        """Qualified names of the sibling layers this rule swaps (the per-layer rule leaves them alone)."""
        return {f"{b}.{p}" for b, _, _, parts in self._groups(model, family) for p in parts}

    def plan(self, model: nn.Module, family: FamilySpec) -> Plan:
        plan = Plan()
        groups = self._groups(model, family)
        finer: Dict[Tuple[int, int], int] = Counter()
        for bname, block, attr, parts in groups:
            k = block._modules[parts[0]].in_features
            cfg = layer_config(k, self.config)
            if cfg is not self.config:
                finer[(k, cfg.group_size)] += 1
            plan.actions.append(Action(
                name=f"{bname}.{attr}", role=_block_role(model, family, f"{bname}.{parts[0]}"),
                kind=f"{'+'.join(parts)} -> one QuantLinear[{cfg.name}]",
                run=self._runner(block, bname, attr, parts, cfg)))
        if groups:
            kinds = Counter("+".join(parts) for _, _, _, parts in groups)
            plan.notes.append("fused projections (one kernel call per group): " +
                              ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())))
        plan.notes += finer_group_notes(finer, self.config, "fused layer(s)")
        return plan

    def _runner(self, block: nn.Module, bname: str, attr: str, parts: Tuple[str, ...], cfg):
        def run() -> List:
            from ..nn import QuantLinear
            from ..nn.fused_linear import fuse_linears, slices_for

            mods = [block._modules[p] for p in parts]
            if self.empty:
                first = mods[0]
                with torch.device(first.weight.device if first.weight.device.type != "meta" else "cpu"):
                    fused = QuantLinear(first.in_features, sum(m.out_features for m in mods),
                                        bias=first.bias is not None, config=cfg)
                if first.bias is not None and fused.bias.dtype != first.bias.dtype:
                    fused.bias.data = fused.bias.data.to(first.bias.dtype)
            else:
                fused = fuse_linears(mods, cfg, hessian=self.hessians.get(id(mods[0])))
            err = None
            if not self.empty:
                err = weight_error(torch.cat([m.weight.detach().float() for m in mods]), fused)
            block.add_module(attr, fused)
            records = [FusedAdd(block, bname, attr, parts, err)]
            for p, m, sl in zip(parts, mods, slices_for(fused, [m.out_features for m in mods], attr)):
                setattr(block, p, sl)
                records.append(ModuleSwap(block, p, m, sl))
            return records

        return run


def fused_plan_entries(records: Sequence) -> List[Dict]:
    """The saved plan's ``fused`` list, from the undo records of a patch."""
    return [{"block": r.block_name, "name": r.attr, "parts": list(r.parts)} for r in records if isinstance(r, FusedAdd)]
