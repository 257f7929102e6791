"""MoERule: swap each MoE layer's stacked experts module for :class:`kernswap.nn.FusedExperts`.

transformers 5 routes in the block's own router (``mlp.gate``) and then calls ``mlp.experts(hidden_states,
top_k_index, top_k_weights)`` -- its experts interface. Replacing that one child instance keeps the model's
routing (each family's softmax/top-k order and renormalisation), its shared expert (Qwen2-MoE) and its
router-logit recording untouched, so an unquantized patched block equals the original to fp32 rounding.
Targets come from the family declaration (``FamilySpec.experts``, inside ``FamilySpec.moe`` blocks);
dense MLP layers of the same model (e.g. Qwen3-MoE ``mlp_only_layers``) have no experts child and are left
to the Linear rule.
"""
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import MoEConfig, QuantConfig
from ..formats.scale_search import CALIBRATED
from ..nn.fused_moe import FusedExperts, experts_quant_config, unsupported_reason
from .families import FamilySpec, match_any
from .rules import Action, ModuleSwap, Plan, Skip

__all__ = ["MoERule", "ExpertsSkeletonRule"]


class MoERule:
    """Plan the experts swaps. ``quant`` (patch()'s quant=) is used for the experts when ``config.quant`` is None."""

    kind = "moe"

    def __init__(self, config: MoEConfig, quant: Optional[QuantConfig] = None):
        self.config = MoEConfig.from_any(config)
        self.quant = self.config.quant if self.config.quant is not None else (
            None if quant is None else QuantConfig.from_any(quant))
        # stacked experts see routed subsets of the tokens: the calibrated methods are not done for them (yet); they
        # take the error-minimising scales instead, and the plan says so
        self.calibrated = self.quant is not None and self.quant.method in CALIBRATED
        if self.calibrated:
            self.quant = dataclasses.replace(self.quant, method="mse", act_order=False)

    def plan(self, model: nn.Module, family: FamilySpec) -> Plan:
        plan = Plan()
        if not family.experts:
            plan.notes.append(f"moe: family {family.name!r} declares no MoE experts; nothing swapped")
            return plan
        holders: Dict[int, List[Tuple[nn.Module, str]]] = {}
        for pname, parent in model.named_modules(remove_duplicate=False):
            for attr, child in parent._modules.items():
                if child is not None:
                    holders.setdefault(id(child), []).append((parent, attr))
        fmt = "float" if self.quant is None else self.quant.name
        for name, mod in model.named_modules():
            if not match_any(name, family.experts) or mod is model:
                continue
            if isinstance(mod, FusedExperts):
                plan.skipped.append(Skip(name, "already FusedExperts"))
                continue
            why = unsupported_reason(mod)
            if why is None and self.quant is not None:
                h, i = mod.gate_up_proj.shape[2], mod.down_proj.shape[2]
                if experts_quant_config(self.quant, h) is None or experts_quant_config(self.quant, i) is None:
                    why = (f"{self.quant.name} needs hidden_size={h} and intermediate_size={i} divisible by an int4 "
                           f"group size (32, 64, 128)")
            if why is not None:
                plan.skipped.append(Skip(name, f"moe: {why}; left as is"))
                continue
            e, two_i, h = mod.gate_up_proj.shape
            plan.actions.append(Action(
                name=name, role="moe",
                kind=f"{type(mod).__name__} -> FusedExperts[{fmt}] (E={e}, H={h}, I={two_i // 2})",
                run=self._runner(mod, holders.get(id(mod), [])),
            ))
        if plan.actions and self.quant is not None and self.config.quant is None:
            plan.notes.append(f"moe: experts quantized with patch()'s quant={self.quant.name}")
        if plan.actions and self.calibrated:
            plan.notes.append("moe: stacked experts use method='mse' (no calibrated method for them yet)")
        return plan

    def _runner(self, mod: nn.Module, where: List[Tuple[nn.Module, str]]):
        def run() -> List[ModuleSwap]:
            new = FusedExperts.from_experts(mod, quant=self.quant, backend=self.config.backend.value)
            records = []
            for parent, attr in where:
                setattr(parent, attr, new)
                records.append(ModuleSwap(parent, attr, mod, new))
            return records

        return run


class ExpertsSkeletonRule:
    """Loading a saved model: swap the named experts modules for empty quantized FusedExperts of the saved
    shape and format (their buffers are then filled from the state dict; nothing is quantized)."""

    kind = "moe"

    def __init__(self, entries: Dict[str, dict]):
        self.entries = dict(entries)

    def plan(self, model: nn.Module, family: FamilySpec) -> Plan:
        plan = Plan()
        holders: Dict[int, List[Tuple[nn.Module, str]]] = {}
        for _, parent in model.named_modules(remove_duplicate=False):
            for attr, child in parent._modules.items():
                if child is not None:
                    holders.setdefault(id(child), []).append((parent, attr))
        for name, spec in self.entries.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"load: the saved plan names experts {name!r} that this model does not have") from None
            cfg = QuantConfig(**spec["quant"])
            e, h, i = spec["num_experts"], spec["hidden_size"], spec["intermediate_size"]

            def run(mod=mod, cfg=cfg, e=e, h=h, i=i) -> List[ModuleSwap]:
                dev = next((p.device for p in mod.parameters() if p.device.type != "meta"), torch.device("cpu"))
                new = FusedExperts(e, h, i, quant=cfg, device=dev)
                records = []
                for parent, attr in holders.get(id(mod), []):
                    setattr(parent, attr, new)
                    records.append(ModuleSwap(parent, attr, mod, new))
                return records

            plan.actions.append(Action(name=name, role="moe", kind=f"experts -> FusedExperts[{cfg.name}] (loaded)",
                                       run=run))
        return plan
