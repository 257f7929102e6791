"""Rules: each finds its targets in a model (through the family declaration) and plans reversible actions.

A rule's ``plan(model, family)`` returns a :class:`Plan`: the :class:`Action` s to run (each returns the
undo records of what it changed), what it skipped and why, and notes. The engine in ``api.py`` runs the
actions, keeps the records for ``unpatch`` and undoes them all if one fails. The attention and MoE swaps are
further rules (``patching/attention.py`` AttentionRule, ``patching/moe.py`` MoERule) reading
``FamilySpec.attention`` / ``.experts``.
"""
import dataclasses
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .families import FamilySpec, match_any

__all__ = ["ModuleSwap", "Action", "Skip", "Plan", "QuantLinearRule", "check_quantizable", "layer_config"]


@dataclasses.dataclass
class ModuleSwap:
    """Undo record: ``parent.<attr>`` was ``original`` and is now ``replacement``."""

    parent: nn.Module
    attr: str
    original: Optional[nn.Module]
    replacement: nn.Module
    weight_error: Optional[float] = None  # quantized swaps: ||dequant(Wq) - W|| / ||W||

    def undo(self) -> None:
        setattr(self.parent, self.attr, self.original)


@dataclasses.dataclass
class Action:
    name: str  # qualified module name
    role: str  # "attention" | "mlp" | "moe" | "other"
    kind: str  # e.g. "Linear -> QuantLinear[int4-g128]"
    run: Callable[[], List[ModuleSwap]]


@dataclasses.dataclass
class Skip:
    name: str
    reason: str


@dataclasses.dataclass
class Plan:
    actions: List[Action] = dataclasses.field(default_factory=list)
    skipped: List[Skip] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def extend(self, other: "Plan") -> None:
        self.actions += other.actions
        self.skipped += other.skipped
        self.notes += other.notes


def _quant_linear_cls():
    from ..nn import QuantLinear  # core-owned; imported lazily so `import kernswap.patching` never needs it

    return QuantLinear


def check_quantizable(linear: nn.Linear, config) -> Optional[str]:
    """Why ``config`` cannot take this Linear, or None when it can."""
    k, n = linear.in_features, linear.out_features
    if k == 0 or n == 0:
        return f"empty Linear (in_features={k}, out_features={n})"
    w = linear.weight
    if w.device.type == "meta":
        return "weight is on the meta device (offloaded or not materialized)"
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not floating point"
    if config.weight_bits == 4 and layer_config(k, config) is None:
        return (f"in_features={k} is not divisible by group_size={config.group_size} nor by any smaller "
                f"int4 group size ({config.name} needs K % group_size == 0)")
    return None


def layer_config(k: int, config):
    """The config one Linear with in_features=k gets: ``config`` itself, or for int4 when k is not a multiple of
    its group size, the same config with the largest smaller group size (64, 32) that divides k (a finer group
    is never less accurate); None when no int4 group size divides k."""
    if config.weight_bits != 4 or k % config.group_size == 0:
        return config
    for g in (64, 32):
        if g < config.group_size and k % g == 0:
            return dataclasses.replace(config, group_size=g)
    return None


def weight_error(original: torch.Tensor, quantized: nn.Module) -> float:
    """||dequant(Wq) - W|| / ||W|| of a quantized module against the float weight it was made from."""
    w = original.detach().to(torch.float32)
    d = quantized.dequantize_weight().to(w.device)
    return float((d - w).norm() / w.norm().clamp_min(1e-30))


def finer_group_notes(finer: Dict[Tuple[int, int], int], config, what: str) -> List[str]:
    """Report notes for the layers that took a finer int4 group than ``config``'s: {(in_features, group): count}."""
    return [f"{count} {what} with in_features={k} (not a multiple of group_size={config.group_size}) use "
            f"group_size={g}" for (k, g), count in sorted(finer.items())]


def _block_role(model: nn.Module, family: FamilySpec, name: str) -> str:
    """Role of a Linear by the innermost declared block containing it (MoE blocks without experts: mlp)."""
    prio = {"attention": 0, "mlp": 1, "moe": 2}
    cands = []
    for role, pats in (("attention", family.attention), ("mlp", family.mlp), ("moe", family.moe)):
        for pat in pats:
            d = pat.count(".")
            prefix = ".".join(name.split(".")[: d + 1])
            if prefix != name and match_any(prefix, (pat,)):
                cands.append((d, prio[role], role, prefix))
    if not cands:
        return "other"
    _, _, role, block = max(cands)
    if role == "moe" and not hasattr(model.get_submodule(block), "experts"):
        return "mlp"
    return role


class QuantLinearRule:
    """Swap every plain ``nn.Linear`` (not in the skip list) for ``kernswap.nn.QuantLinear``.

    ``empty=True`` builds uninitialized QuantLinear modules of the right shape (for loading a saved
    quantized state dict without quantizing anything). ``allow_tied=True`` quantizes a Linear whose weight is tied
    to another module's (the output head tied to the embeddings): the QuantLinear gets a quantized copy and the
    other module keeps the float tensor. ``role`` overrides the role the report gives the swapped layers.
    ``exclude``: qualified names left to another rule (the siblings a FusedProjectionRule fuses). ``hessians``:
    id(layer) -> the second moment of its inputs, for the calibrated methods (kernswap.calibration).
    """

    kind = "quant"

    def __init__(self, config, skip: Sequence[str], empty: bool = False,
                 only: Optional[Sequence[str]] = None, allow_tied: bool = False, role: Optional[str] = None,
                 exclude: Sequence[str] = (), hessians: Optional[Dict[int, torch.Tensor]] = None):
        self.config = config
        self.skip = tuple(skip)
        self.empty = empty
        self.only = None if only is None else set(only)
        self.exclude = set(exclude)  # layers another rule swaps (fused projections)
        self.hessians = hessians or {}  # id(layer) -> its inputs' Hessian (calibrated methods)
        self.allow_tied = allow_tied
        self.role = role

    def _make(self, linear: nn.Linear) -> nn.Module:
        QL = _quant_linear_cls()
        config = layer_config(linear.in_features, self.config)
        if not self.empty:
            return QL.from_linear(linear, config, hessian=self.hessians.get(id(linear)))
        with torch.device(linear.weight.device if linear.weight.device.type != "meta" else "cpu"):
            q = QL(linear.in_features, linear.out_features, bias=linear.bias is not None, config=config)
        if linear.bias is not None and getattr(q, "bias", None) is not None and q.bias.dtype != linear.bias.dtype:
            q.bias.data = q.bias.data.to(linear.bias.dtype)
        return q

    def plan(self, model: nn.Module, family: FamilySpec) -> Plan:
        QL = _quant_linear_cls()
        plan = Plan()
        # every (parent, attr) holding each module: a module reachable under two names is swapped in both.
        holders: Dict[int, List[Tuple[nn.Module, str, str]]] = defaultdict(list)
        for pname, parent in model.named_modules(remove_duplicate=False):
            for attr, child in parent._modules.items():
                if child is not None:
                    holders[id(child)].append((parent, attr, f"{pname}.{attr}" if pname else attr))
        param_names: Dict[int, List[str]] = defaultdict(list)
        for pn, p in model.named_parameters(remove_duplicate=False):
            param_names[id(p)].append(pn)

        seen = set()
        unhandled: Dict[str, List[str]] = defaultdict(list)
        finer: Dict[Tuple[int, int], int] = defaultdict(int)
        for name, mod in model.named_modules():
            if id(mod) in seen or mod is model:
                continue
            seen.add(id(mod))
            if isinstance(mod, QL):
                plan.skipped.append(Skip(name, "already a QuantLinear (never quantized twice)"))
                continue
            if not isinstance(mod, nn.Linear):
                own = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if p.dim() >= 2]
                if own:
                    unhandled[self._why_not_linear(mod, name, family)].append(name)
                continue
            if (self.only is not None and name not in self.only) or name in self.exclude:
                continue
            aliases = tuple(full + "." for _, _, full in holders[id(mod)]) or (name + ".",)
            reason = self._skip_reason(mod, name, family, param_names, aliases)
            if reason is not None:
                plan.skipped.append(Skip(name, reason))
                continue
            cfg = layer_config(mod.in_features, self.config)
            if cfg is not self.config:
                finer[(mod.in_features, cfg.group_size)] += 1
            plan.actions.append(Action(
                name=name, role=self.role or _block_role(model, family, name),
                kind=f"Linear -> QuantLinear[{cfg.name}]",
                run=self._runner(mod, holders[id(mod)]),
            ))
        plan.notes += finer_group_notes(finer, self.config, "Linear layer(s)")
        for reason, names in unhandled.items():
            for n in names:
                plan.skipped.append(Skip(n, reason))
        if self.only is not None:
            missing = self.only - {a.name for a in plan.actions}
            if missing:
                raise ValueError(f"load: the saved plan names Linear layers this model does not have "
                                 f"(or cannot take): {sorted(missing)[:5]}")
        return plan

    def _why_not_linear(self, mod: nn.Module, name: str, family: FamilySpec) -> str:
        cls = type(mod).__name__
        if isinstance(mod, nn.Embedding):
            return f"{cls}: embeddings are not quantized"
        if match_any(name, family.experts):
            shapes = ", ".join(f"{pn} {list(p.shape)}" for pn, p in mod.named_parameters(recurse=False))
            return (f"{cls} ({shapes}): stacked 3-D expert weights are not nn.Linear; "
                    f"left to the MoE swap (moe=...), not quantized by quant=")
        if match_any(name, self.skip):
            return f"{cls}: router/gate, never quantized"
        return f"{cls}: not an nn.Linear, no rule for it (left as is)"

    def _skip_reason(self, mod: nn.Linear, name: str, family: FamilySpec, param_names,
                     aliases: Tuple[str, ...]) -> Optional[str]:
        if type(mod) is not nn.Linear:
            return f"{type(mod).__name__} subclasses nn.Linear with its own forward: not swapped"
        pat = match_any(name, self.skip)
        if pat is not None:
            return f"in the skip list (pattern {pat!r})"
        tied = [pn for pn in param_names.get(id(mod.weight), []) if not pn.startswith(aliases)]
        if tied and not self.allow_tied:
            return f"weight is tied to {tied[0]}"
        return check_quantizable(mod, self.config)

    def _runner(self, mod: nn.Linear, where: List[Tuple[nn.Module, str, str]]):
        def run() -> List[ModuleSwap]:
            new = self._make(mod)
            err = None if self.empty else weight_error(mod.weight, new)
            records = []
            for parent, attr, _ in where:
                setattr(parent, attr, new)
                records.append(ModuleSwap(parent, attr, mod, new, err))
            return records

        return run

