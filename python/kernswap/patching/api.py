"""kernswap.patch / kernswap.unpatch: the engine that runs rules, keeps undo records, and rolls back."""
import dataclasses
import json
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..backend import Backend, normalize_backend
from ..config import MoEConfig, QuantConfig, SparseAttentionConfig
from .families import FamilySpec, get_family
from .report import PatchReport, module_memory
from ..calibration import collect_hessians, normalize_calibration, sequential_hessians
from ..calibration.hessians import _tokens, calibration_forward
from ..formats.scale_search import CALIBRATED, HESSIAN_METHODS
from .rules import ModuleSwap, Plan, QuantLinearRule

__all__ = ["patch", "unpatch", "is_patched", "patch_state", "PatchState", "PLAN_BUFFER", "STATE_ATTR"]

STATE_ATTR = "_kernswap_patch"  # instance attribute holding the PatchState
PLAN_BUFFER = "kernswap_plan"  # uint8 JSON buffer on the root module: the plan travels in the state dict
PLAN_VERSION = 1


@dataclasses.dataclass
class _PlanBuffer:
    """Undo record for the plan buffer registered on the root module."""

    module: nn.Module
    name: str

    def undo(self) -> None:
        self.module._buffers.pop(self.name, None)


@dataclasses.dataclass
class PatchState:
    request: Dict[str, Any]
    records: List[Any]  # ModuleSwap / _PlanBuffer, in the order they were applied
    report: PatchReport
    plan: Dict[str, Any]  # JSON-able: what load_quantized needs to rebuild the skeleton
    restorable: bool  # False when the originals were dropped (keep_originals=False) or never existed (loaded)


def patch_state(model: nn.Module) -> Optional[PatchState]:
    return model.__dict__.get(STATE_ATTR)


def is_patched(model: nn.Module) -> bool:
    return patch_state(model) is not None


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _resolve_quant(quant, backend) -> Optional[QuantConfig]:
    backend = normalize_backend(backend, "kernswap.patch: backend")
    if quant is None:
        return None
    cfg = QuantConfig.from_any(quant)
    if backend != Backend.AUTO and cfg.backend != backend:
        cfg = dataclasses.replace(cfg, backend=backend)
    return cfg


def config_to_json(cfg) -> Dict[str, Any]:
    """A QuantConfig / SparseAttentionConfig as plain JSON values."""
    d = dataclasses.asdict(cfg)
    d["backend"] = str(cfg.backend.value if isinstance(cfg.backend, Backend) else cfg.backend)
    return d


def _output_head_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - models without a head raise in various ways
        return None
    if isinstance(head, nn.Module):
        for name, mod in model.named_modules():
            if mod is head:
                return name
    return None


HEAD_ROLE = "lm_head"  # the role of the output head's swap in the report and the plan


def _resolve_head(lm_head, backend) -> Optional[QuantConfig]:
    """The output head's format: None/False = left in float; True = int8 per channel (weight-only)."""
    if lm_head is None or lm_head is False:
        return None
    if lm_head is True:
        lm_head = "int8"
    if not isinstance(lm_head, (str, QuantConfig)):
        raise TypeError(f"kernswap.patch: lm_head must be None, a bool, a format name or a QuantConfig, "
                        f"got {type(lm_head).__name__}")
    return _resolve_quant(lm_head, backend)


def _skip_patterns(skip, family: FamilySpec, model: nn.Module) -> tuple:
    if skip is None:  # the family default, plus the model's output head whatever its name
        head = _output_head_name(model)
        return tuple(family.skip) + ((head,) if head and head not in family.skip else ())
    if isinstance(skip, str):
        return (skip,)
    if not all(isinstance(s, str) for s in skip):
        raise TypeError(f"kernswap.patch: skip must be None or a sequence of name patterns (str), got {skip!r}")
    return tuple(skip)


def patch(
    model: nn.Module,
    quant: Union[None, str, QuantConfig] = None,
    attention: Any = None,
    moe: Any = None,
    backend: Union[str, Backend] = "auto",
    skip: Optional[Sequence[str]] = None,
    progress: bool = True,
    keep_originals: bool = True,
    lm_head: Union[None, bool, str, QuantConfig] = None,
    fuse: bool = True,
    calibration: Any = None,
) -> PatchReport:
    """Patch ``model`` in place and return a :class:`PatchReport`.

    quant: None | "int8" | "int4" | "w8a8" | "w4a8" | QuantConfig -- swap nn.Linear for QuantLinear.
    attention: None | "sparse" | "dense" | SparseAttentionConfig -- block-sparse attention through
      transformers' attention registry (declared families only), for prefill and for decode with the KV cache;
      "dense" keeps every causal block (density 1): kernswap's attention kernel for prefills over 256+ keys,
      torch's SDPA for shorter ones and for decode steps (the decode-layer kernel stays on).
    moe: None | "fused" | MoEConfig -- fused MoE experts (declared MoE families); with ``quant=`` the experts
      are quantized in that format unless ``MoEConfig.quant`` says otherwise.
    backend: forced into every config when not "auto".
    skip: Linear-name glob patterns left unquantized. None = the family default (``lm_head``, MoE
      routers/gates); an explicit sequence *replaces* the default (``skip=()`` quantizes ``lm_head`` too,
      unless its weight is tied to the embeddings).
    progress: tqdm progress bar while swapping. keep_originals: keep the original modules so
      :func:`unpatch` can restore them (False frees their memory; unpatch then raises).
    lm_head: None/False (default) leaves the output head in float; True quantizes it int8 per channel
      (weight-only), a format name or QuantConfig in that format. It is the largest weight a small model reads per
      token. A head tied to the input embeddings gets a quantized copy: the embedding table stays in float for
      the token lookups, and ``unpatch`` restores the tie.
    fuse: True (default) runs q/k/v and gate/up as one quantized call each; on Llama / Mistral / Qwen2 / Qwen3
      decoder layers it also installs the decode-layer kernel (kernswap.nn.decode_layer): a decode step (one new fp32
      token per sequence, no attention mask, a dynamic KV cache) takes one compiled call per layer, every other call
      the layer's own forward. :func:`set_decode_path` turns it off and on.

    Only this instance changes (child modules are replaced through their parent). Any exception part-way
    restores every module already swapped, then re-raises. Patching an already patched model with the same
    arguments is a no-op that returns the first report; with different arguments it raises RuntimeError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kernswap.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _resolve_quant(quant, backend)
    attn_cfg = None if attention is None else SparseAttentionConfig.from_any(attention)
    moe_cfg = None if moe is None else MoEConfig.from_any(moe)
    if backend != Backend.AUTO:
        attn_cfg = attn_cfg and dataclasses.replace(attn_cfg, backend=backend)
        moe_cfg = moe_cfg and dataclasses.replace(moe_cfg, backend=backend)
    family = get_family(_model_type(model))
    head_cfg = _resolve_head(lm_head, backend)
    head = _output_head_name(model) if head_cfg is not None else None
    if head_cfg is not None and head is None:
        raise ValueError("kernswap.patch: lm_head was requested but this model has no output head "
                         "(get_output_embeddings() returned no nn.Linear)")
    if not isinstance(fuse, bool):
        raise TypeError(f"kernswap.patch: fuse must be a bool, got {type(fuse).__name__}")
    request = {"quant": cfg, "attention": attn_cfg, "moe": moe_cfg, "skip": _skip_patterns(skip, family, model),
               "lm_head": head_cfg, "fuse": fuse and cfg is not None}
    calibrated = [f"method={c.method!r}" for c in (cfg, head_cfg) if c is not None and c.method in CALIBRATED]
    calibrated += [f"smooth={c.smooth!r}" for c in (cfg, head_cfg) if c is not None and c.smooth is not None]
    if calibrated and calibration is None:
        raise ValueError(f"kernswap.patch: {calibrated[0]} needs calibration= (token ids, a list of them, or an "
                         f"iterable of model-input dicts); use method='mse' (the int4 default) or 'rtn', and "
                         f"smooth=None, without")
    used = {c.method for c in (cfg, head_cfg) if c is not None}  # the methods the request quantizes with
    weighted = bool(used.intersection(HESSIAN_METHODS))  # (their scales read the inputs' Hessians when given)
    batches = normalize_calibration(calibration) if calibrated or (weighted and calibration is not None) else None

    state = patch_state(model)
    if state is not None:
        if state.request == request:
            return state.report
        raise RuntimeError(
            "kernswap.patch: this model is already patched "
            f"({_describe(state.request)}); requested {_describe(request)}. Call kernswap.unpatch(model) first: kernswap "
            "never quantizes a quantized model again.")

    hessians, calib_tokens, pre = {}, 0, []
    smooth_note = importance_note = None
    try:
        if cfg is not None and (cfg.smooth is not None or cfg.method == "awq"):
            # folded before the Hessians: they see the scaled inputs
            rec, smooth_note = _smooth(model, cfg, request["skip"] + ((head,) if head else ()), batches)
            pre = [rec] if rec is not None else []
        if batches is not None and weighted:
            # calibration, before anything is swapped (the model is left as it was)
            hessians, calib_tokens = _calibrate(model, family, cfg, head_cfg, head, request["skip"], batches,
                                                progress)
        elif batches is None and "mse" in used:
            hessians, importance_note = _data_free(model, cfg, head_cfg, head, request["skip"])
    except BaseException:
        for rec in reversed(pre):
            rec.undo()
        raise
    rules = []
    if cfg is not None:
        skip_here = request["skip"] + ((head,) if head else ())
        fused = ()
        if request["fuse"]:
            from .fuse import FusedProjectionRule

            rules.append(FusedProjectionRule(cfg, skip_here, hessians=hessians))
            fused = rules[-1].targets(model, family)
        rules.append(QuantLinearRule(cfg, skip_here, exclude=fused, hessians=hessians))
    if head_cfg is not None:
        rules.append(QuantLinearRule(head_cfg, (), only=[head], allow_tied=True, role=HEAD_ROLE, hessians=hessians))
    if moe_cfg is not None:
        from .moe import MoERule  # the MoE swap's own module

        rules.append(MoERule(moe_cfg, cfg))
    if attn_cfg is not None:
        from .attention import AttentionRule

        rules.append(AttentionRule(attn_cfg))
    report = apply_rules(model, rules, request, family, progress=progress, keep_originals=keep_originals,
                         pre_records=pre)
    for note in (smooth_note, importance_note):
        if note:
            report.notes.append(note)
    if batches is not None and not calib_tokens:
        calib_tokens = sum(_tokens(kw) for kw in batches)
    methods = sorted(used)
    if methods:
        report.notes.append(f"quantization method: {', '.join(methods)}" + (
            f"; calibration: {len(batches)} batch(es), {calib_tokens} tokens" if batches is not None else ""))
    return report


def _smooth(model: nn.Module, cfg: QuantConfig, skip: tuple, batches):
    """Fold SmoothQuant factors for ``cfg``'s activation-quantized layers (kernswap.calibration.smooth), or for
    method="awq" its activation-aware scales (kernswap.calibration.awq)."""
    from ..calibration.awq import awq_model
    from ..calibration.smooth import next_token_nll, smooth_model
    from .families import match_any
    from .rules import check_quantizable, layer_config

    def layer_cfg(name, linear):
        if match_any(name, skip) or check_quantizable(linear, cfg):
            return None
        return layer_config(linear.in_features, cfg)

    runs = [lambda kw=kw: calibration_forward(model, kw) for kw in batches]
    if cfg.method == "awq":
        return awq_model(model, runs, layer_cfg)
    losses = [lambda kw=kw: next_token_nll(calibration_forward(model, kw), kw["input_ids"])
              for kw in batches if isinstance(kw.get("input_ids"), torch.Tensor)]
    return smooth_model(model, runs, None if cfg.smooth is True else float(cfg.smooth), layer_cfg, losses)


def _hessian_configs(model: nn.Module, cfg, head_cfg, head, skip):
    """layer -> the per-layer QuantConfig it is quantized with when that config's method reads the layer inputs'
    Hessian (HESSIAN_METHODS), else None."""
    from .families import match_any
    from .rules import check_quantizable, layer_config

    names = {id(m): n for n, m in model.named_modules()}

    def config_of(layer):
        name = names.get(id(layer), "")
        c = head_cfg if name == head else (None if match_any(name, skip) else cfg)
        if c is None or c.method not in HESSIAN_METHODS or check_quantizable(layer, c):
            return None
        return layer_config(layer.in_features, c)

    return config_of


def _data_free(model: nn.Module, cfg, head_cfg, head, skip):
    """{id(layer): [K] input mean squares} for the layers quantized with method="mse" when no calibration was
    given (kernswap.calibration.importance: random token ids through the float model), and the report's note."""
    from ..calibration.importance import SEQ_LEN, SEQUENCES, data_free_importance

    config_of = _hessian_configs(model, cfg, head_cfg, head, skip)
    layers = [m for m in model.modules() if type(m) is nn.Linear and getattr(config_of(m), "method", None) == "mse"]
    sums, why = data_free_importance(model, layers)
    if why is not None:
        return {}, f"mse scales: weight error (no data-free importance: {why})"
    if not sums:
        return {}, None
    return sums, (f"mse scales: activation-weighted error, the input channels' mean squares over "
                  f"{SEQUENCES} x {SEQ_LEN} random token ids (data-free; pass calibration= for your own text)")


def _calibrate(model: nn.Module, family: FamilySpec, cfg, head_cfg, head, skip, batches, progress):
    """{id(layer): Hessian} for the layers a calibrated method quantizes: block by block through the decoder layers
    (each fitted to the quantized blocks' outputs, sequential_hessians), the rest (e.g. the head) from the float
    model. Returns (hessians, calibration tokens)."""
    from ..formats import quantize
    from .families import match_any

    blocks = []
    if family.attention:
        depth = family.attention[0].count(".")
        parents = {n.rsplit(".", 1)[0] for n, _ in model.named_modules()
                   if n.count(".") == depth and match_any(n, family.attention)}
        blocks = [m for n, m in model.named_modules() if n in parents]
    config_of = _hessian_configs(model, cfg, head_cfg, head, skip)

    def quantized_weight(layer, h):
        c = config_of(layer)
        return None if c is None else quantize(layer.weight, c, h).dequantize()

    hess, tokens = {}, 0
    if blocks:
        hess, tokens = sequential_hessians(model, blocks, batches, quantized_weight, progress=progress)
    rest = [m for m in model.modules() if type(m) is nn.Linear and id(m) not in hess and config_of(m) is not None]
    if rest:
        more, tokens = collect_hessians(model, rest, batches, progress=progress)
        hess.update(more)
    return hess, tokens


def _name(cfg) -> str:
    return "None" if cfg is None else cfg.name


def _describe(request: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={_name(request.get(k))}" for k in ("quant", "attention", "moe", "lm_head")) + \
        f", skip={request.get('skip')}, fuse={request.get('fuse')}"


def _tier_notes(request: Dict[str, Any], device: torch.device) -> List[str]:
    """The CPU tiers the swapped ops will run with on this machine, where `auto` hands a shape class (or a
    whole op) to torch's own path because kernswap's kernel is not faster there, and where it falls back to the
    pure-PyTorch reference (``device``: the model's)."""
    from .. import _ext
    from ..backends.cpu import tier_note

    notes = []
    cfg = request.get("quant")
    if cfg is not None and cfg.backend.value in ("auto", "cpu"):
        note = tier_note(cfg.weight_bits, cfg.dynamic_activations)
        notes += [note] if note else []
    wants_cpu = any(getattr(getattr(r, "backend", None), "value", None) == "auto"
                    for r in (cfg, request.get("attention"), request.get("moe"), request.get("lm_head")))
    if wants_cpu and not _ext.have_cpu_ext():  # auto falls back to the pure-PyTorch reference on the CPU: say so
        notes.append(f"kernswap's compiled CPU module is not available ({_ext.cpu_ext_reason()}): on the CPU, auto "
                     f"runs the pure-PyTorch reference of each op, slower than the unpatched model")
    attn = request.get("attention")
    tier = _ext.op_isa("block_sparse_attention")
    if attn is not None and tier is not None and attn.backend.value in ("auto", "cpu"):
        from ..nn.sparse_attention import AMX_DENSE_FROM, AMX_REASON, torch_sdpa_uses_amx

        auto = attn.backend.value == "auto"
        notes.append(f"block-sparse attention runs kernswap's {tier} CPU kernels" + (
            "; on this CPU (scalar tier) auto leaves CPU attention to torch's SDPA, which is faster"
            if tier == "scalar" and auto else ""))
        if auto and tier != "scalar" and attn.density >= AMX_DENSE_FROM and torch_sdpa_uses_amx():
            notes.append(f"bf16/fp16 attention runs dense SDPA: {AMX_REASON}")
    moe = request.get("moe")
    tier = _ext.op_isa("moe_swiglu")
    if moe is not None and tier is not None:
        notes.append(f"fused MoE experts run kernswap's {tier} CPU kernels" + (
            " (portable loops: likely slower than transformers' experts on this CPU)" if tier == "scalar" else ""))
    if moe is not None and device.type == "cuda" and (moe.quant is not None or cfg is not None):
        notes.append(QUANT_EXPERTS_CUDA_NOTE)
    return notes


# one statement of the gap, for the patch report and `python -m kernswap`
QUANT_EXPERTS_CUDA_NOTE = ("quantized MoE experts have no GPU kernel yet: on CUDA they run the pure-PyTorch "
                           "reference loop (expert by expert), slower than float experts; keep MoE experts in "
                           "float on a GPU (MoEConfig(quant=None) with patch(quant=None)) for speed")


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def apply_rules(model: nn.Module, rules: list, request: Dict[str, Any], family: FamilySpec, *,
                progress: bool = True, keep_originals: bool = True, restorable: bool = True,
                desc: str = "kernswap: quantizing", pre_records: Sequence[Any] = ()) -> PatchReport:
    """Plan every rule, run the actions under one rollback scope, and record the state on ``model``."""
    t0 = time.perf_counter()
    plan = Plan()
    for rule in rules:
        plan.extend(rule.plan(model, family))
    done = {a.name for a in plan.actions}  # e.g. experts one rule skips and another swaps: not "skipped"
    plan.skipped = [s for s in plan.skipped if s.name not in done]
    report = PatchReport(
        model_type=_model_type(model), family=family.name,
        requested={"quant": _name(request.get("quant")), "attention": _name(request.get("attention")),
                   "moe": _name(request.get("moe")), "lm_head": _name(request.get("lm_head"))},
        notes=list(family.notes) + plan.notes,
    )
    report.notes += _tier_notes(request, _model_device(model))
    report.memory_before = module_memory(model)
    records: List[Any] = list(pre_records)  # done before the rules (smoothing folds): undone last
    try:
        from tqdm.auto import tqdm

        bar = tqdm(plan.actions, desc=desc, unit="layer", disable=not progress or not plan.actions, leave=False)
        for action in bar:
            done_here = action.run()
            records.extend(done_here)
            report.swapped.append((action.name, action.role, action.kind))
            errs = [r.weight_error for r in done_here if getattr(r, "weight_error", None) is not None]
            if errs:
                report.weight_errors[action.name] = errs[0]
        if request.get("fuse"):
            from .decode import install_decode_path

            decoders = install_decode_path(model)
            records.extend(decoders)
            from ..nn.decode_layer import DecodeForward

            n_layers = sum(isinstance(r.layer.__dict__.get("forward"), DecodeForward) for r in decoders)
            if n_layers:
                report.notes.append(f"decode steps (one new token per sequence, fp32, no mask) of {n_layers} "
                                    f"decoder layers run kernswap's decode-layer kernel: one call a layer"
                                    + (", the base model's own loop around them" if len(decoders) > n_layers else ""))
        plan_json = make_plan_json(model, request, report, records)
        if report.swapped:
            data = torch.frombuffer(bytearray(json.dumps(plan_json).encode()), dtype=torch.uint8).clone()
            model.register_buffer(PLAN_BUFFER, data, persistent=True)
            records.append(_PlanBuffer(model, PLAN_BUFFER))
    except BaseException:
        for rec in reversed(records):
            rec.undo()
        raise
    report.skipped = [(s.name, s.reason) for s in plan.skipped]
    report.memory_after = module_memory(model)
    report.seconds = time.perf_counter() - t0
    if report.swapped and keep_originals and restorable:
        report.notes.append("original modules are kept for kernswap.unpatch(model); "
                            "pass keep_originals=False to free them")
    if not keep_originals:
        for rec in records:
            if isinstance(rec, ModuleSwap):
                rec.original = None
            elif hasattr(rec, "drop_originals"):
                rec.drop_originals()
    model.__dict__[STATE_ATTR] = PatchState(request=request, records=records, report=report, plan=plan_json,
                                            restorable=restorable and keep_originals)
    return report


def make_plan_json(model: nn.Module, request: Dict[str, Any], report: PatchReport, records: List[Any]) -> Dict[str, Any]:
    """What a saved model needs to be rebuilt without re-quantizing: the quantized Linear layers, the fused
    projections, the quantized output head, the quantized fused experts (shape and format) and the attention swap."""
    from .fuse import fused_name, fused_plan_entries

    fused = fused_plan_entries(records)
    fused_names = {fused_name(g) for g in fused}
    cfg, attn, head_cfg = request.get("quant"), request.get("attention"), request.get("lm_head")
    experts = {}
    for name, role, _ in report.swapped:
        mod = model.get_submodule(name) if role == "moe" else None
        q = getattr(mod, "quant", None)
        if q is not None and hasattr(mod, "num_experts"):
            experts[name] = {"num_experts": mod.num_experts, "hidden_size": mod.hidden_dim,
                             "intermediate_size": mod.intermediate_dim, "quant": config_to_json(q)}
    return {
        "format": "kernswap.patch", "version": PLAN_VERSION, "model_type": _model_type(model),
        "quant": None if cfg is None else config_to_json(cfg),
        "skip": list(request.get("skip") or ()),
        "quantized": [name for name, role, kind in report.swapped
                      if "QuantLinear" in kind and role != HEAD_ROLE and name not in fused_names],
        "fused": fused,
        "lm_head": None if head_cfg is None else {
            "name": next(name for name, role, _ in report.swapped if role == HEAD_ROLE),
            "quant": config_to_json(head_cfg)},
        "experts": experts,
        "attention": None if attn is None else config_to_json(attn),
        "smoothed": [n for rec in records for n in getattr(rec, "norms", ())],
    }


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules (the very same objects) on a model patched by :func:`patch`."""
    state = patch_state(model)
    if state is None:
        raise ValueError("kernswap.unpatch: this model is not patched by kernswap (nothing to restore)")
    if not state.restorable:
        raise RuntimeError(
            "kernswap.unpatch: the original modules of this model are not available (it was patched with "
            "keep_originals=False or loaded from a quantized checkpoint); reload the original model instead")
    for rec in reversed(state.records):
        rec.undo()
    del model.__dict__[STATE_ATTR]
    return model
