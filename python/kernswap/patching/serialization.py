"""Save a patched model and load it back without re-quantizing.

Two ways to save, one way to load:
- ``save_quantized(model, dir)`` writes ``config.json`` + ``generation_config.json`` (transformers models),
  ``model.safetensors`` = the module's own ``state_dict()`` (QuantLinear buffers ``packed``/``scale``/
  ``zero``/``qformat``/``bias``, every other parameter, and ``kernswap_plan``: the patch plan as uint8
  JSON), and ``kernswap_patch.json`` (the same plan, readable, with ``layout: state_dict``).
- ``model.save_pretrained(dir)`` on a patched transformers model also works: the QuantLinear buffers and
  the ``kernswap_plan`` tensor are part of the state dict it writes (transformers may convert the other
  weights to its checkpoint format, e.g. MoE experts per expert).
- ``load_quantized(dir)`` reads the plan, builds the model (from config.json without random init for
  ``save_quantized``; through ``from_pretrained`` for a ``save_pretrained`` directory, so transformers
  undoes its own conversions), swaps the planned Linear layers for *empty* QuantLinear modules (no
  quantization runs) and loads the saved tensors into them. ``load_quantized(model_or_config, dir)``
  fills a given skeleton instead.
"""
import json
import os
from collections import Counter
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..config import QuantConfig
from .api import HEAD_ROLE, PLAN_BUFFER, apply_rules, patch_state
from .families import get_family
from .rules import QuantLinearRule

__all__ = ["save_quantized", "load_quantized", "read_plan"]

PLAN_FILE = "kernswap_patch.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def save_quantized(model: nn.Module, directory: Union[str, os.PathLike]) -> str:
    """Write a patched model to ``directory`` (see module doc); returns the directory.

    The weights are the module's own ``state_dict()`` keys (no checkpoint-format conversion), so any
    model that ``patch`` accepts round-trips, MoE models with stacked experts included.
    """
    state = patch_state(model)
    if state is None or not (state.plan.get("quantized") or state.plan.get("experts")):
        raise ValueError("save_quantized: model is not quantized by kernswap.patch(model, quant=...) "
                         "(nor its MoE experts by moe=MoEConfig(quant=...))")
    from safetensors.torch import save_model

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if hasattr(gen, "save_pretrained"):
        gen.save_pretrained(directory)
    save_model(model, os.path.join(directory, WEIGHTS), metadata={"format": "pt", "kernswap": "state_dict"})
    with open(os.path.join(directory, PLAN_FILE), "w") as f:
        json.dump(dict(state.plan, layout="state_dict"), f, indent=1)
    return directory


def _load_weights(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, WEIGHTS)):
        files = [WEIGHTS]
    else:
        raise FileNotFoundError(f"load_quantized: no {WEIGHTS} or {INDEX} in {directory!r}")
    sd: Dict[str, torch.Tensor] = {}
    for fn in files:
        sd.update(load_file(os.path.join(directory, fn)))
    return sd


def read_plan(directory: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """The patch plan saved in ``directory`` (kernswap_patch.json, else the kernswap_plan tensor)."""
    path = os.path.join(directory, PLAN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"load_quantized: {path!r} is not a valid kernswap plan (truncated or edited JSON: "
                                 f"{e}); save the model again with kernswap.patching.save_quantized") from e
    sd = state_dict if state_dict is not None else _load_weights(directory)
    if PLAN_BUFFER not in sd:
        raise ValueError(f"load_quantized: {directory!r} holds no kernswap plan ({PLAN_FILE} or a "
                         f"{PLAN_BUFFER!r} tensor): it was not saved from a kernswap-patched model")
    return json.loads(bytes(sd[PLAN_BUFFER].to(torch.uint8).tolist()).decode())


def _weights_dtype(sd: Dict[str, torch.Tensor], plan: Dict[str, Any]) -> torch.dtype:
    c = Counter(t.dtype for k, t in sd.items() if t.dtype.is_floating_point and not k.startswith(_prefixes(plan)))
    return c.most_common(1)[0][0] if c else torch.float32


def _build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantized(source: Union[str, os.PathLike, nn.Module, Any], directory: Optional[str] = None, *,
                   dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
                   progress: bool = False) -> nn.Module:
    """Load a model saved by :func:`save_quantized` / ``save_pretrained`` without re-quantizing.

    source: the saved directory (config.json is read from it), or a transformers config, or an
    unpatched model instance to fill (then ``directory`` names the saved files).
    dtype: dtype of the non-quantized parameters (default: the saved one). backend: override the
    saved QuantConfig backend. Returns the patched model (``kernswap.unpatch`` is not available on it).
    """
    if isinstance(source, (str, os.PathLike)):
        directory = os.fspath(source) if directory is None else os.fspath(directory)
        source = None
    if directory is None:
        raise TypeError("load_quantized: pass the saved directory (load_quantized(dir) or "
                        "load_quantized(model_or_config, dir))")
    sd = _load_weights(directory)
    plan = read_plan(directory, sd)
    if plan.get("quant") is None and not plan.get("experts") and not plan.get("lm_head"):
        raise ValueError(f"load_quantized: the plan in {directory!r} has no quant config and no quantized experts")
    def saved_config(d):
        return QuantConfig(**dict(d, **({"backend": backend} if backend is not None else {})))

    cfg = None if plan.get("quant") is None else saved_config(plan["quant"])
    head = plan.get("lm_head")
    head_cfg = None if not head else saved_config(head["quant"])

    if plan.get("layout") != "state_dict" and not isinstance(source, nn.Module):
        # written by transformers' save_pretrained: its checkpoint format may differ from the module's
        # keys (e.g. MoE experts saved per expert), so transformers itself loads the unquantized part.
        model = _from_pretrained(directory, dtype or _weights_dtype(sd, plan))
        sd = {k: v for k, v in sd.items() if k == PLAN_BUFFER or k.startswith(_prefixes(plan))}
        strict = False
    else:
        if source is None:
            from transformers import AutoConfig

            source = AutoConfig.from_pretrained(directory)
        model = source if isinstance(source, nn.Module) else _build_skeleton(source, dtype or _weights_dtype(sd, plan))
        strict = True
    if patch_state(model) is not None:
        raise RuntimeError("load_quantized: the target model is already patched; pass an unpatched model")

    mt = getattr(getattr(model, "config", None), "model_type", None)
    if plan.get("model_type") not in (None, mt):
        raise ValueError(f"load_quantized: saved plan is for model_type={plan['model_type']!r}, got a {mt!r} model")
    family = get_family(mt)
    attn = None
    if plan.get("attention"):
        from ..config import SparseAttentionConfig

        attn = SparseAttentionConfig(**dict(plan["attention"], **({"backend": backend} if backend else {})))
    request = {"quant": cfg, "attention": attn, "moe": None, "skip": tuple(plan.get("skip", ())),
               "lm_head": head_cfg, "fuse": bool(plan.get("fused"))}
    rules = []
    if plan.get("fused"):
        from .fuse import FusedProjectionRule

        rules.append(FusedProjectionRule(cfg, skip=(), empty=True, only=plan["fused"]))
    if cfg is not None:
        rules.append(QuantLinearRule(cfg, skip=(), empty=True, only=plan["quantized"]))
    if head_cfg is not None:
        rules.append(QuantLinearRule(head_cfg, skip=(), empty=True, only=[head["name"]], allow_tied=True,
                                     role=HEAD_ROLE))
    if plan.get("experts"):
        from .moe import ExpertsSkeletonRule

        rules.append(ExpertsSkeletonRule(plan["experts"]))
    if attn is not None:
        from .attention import AttentionRule

        rules.append(AttentionRule(attn))
    apply_rules(model, rules, request, family, progress=progress, restorable=False, desc="kernswap: loading")
    _load_state(model, sd, strict)
    return model


def _prefixes(plan: Dict[str, Any]) -> tuple:
    head = [plan["lm_head"]["name"]] if plan.get("lm_head") else []
    from .fuse import fused_name

    fused = [fused_name(g) for g in plan.get("fused") or ()]
    return tuple(n + "." for n in list(plan.get("quantized", [])) + head + fused + list(plan.get("experts") or {})
                 + list(plan.get("smoothed") or ()))


def _from_pretrained(directory: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the quantized keys are "unexpected" to it: expected here
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    finally:
        logging.set_verbosity(level)


def _load_state(model: nn.Module, sd: Dict[str, torch.Tensor], strict: bool) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    sd = {k: v for k, v in sd.items() if k != PLAN_BUFFER}  # the plan buffer apply_rules made is the live one
    result = model.load_state_dict(sd, strict=False)
    # tied parameters may be saved under one name only: a missing key is fine when its tensor is shared
    names_by_id: Dict[int, list] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), []).append(n)
    missing = [k for k in result.missing_keys if k != PLAN_BUFFER
               and not any(o in sd for o in names_by_id.get(id(_get(model, k)), []) if o != k)]
    if not strict:  # only the quantized modules and the plan were loaded here
        missing = [k for k in missing if k.startswith(_prefixes(patch_state(model).plan))]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"load_quantized: state dict does not match the patched skeleton: "
                           f"missing={missing[:8]} unexpected={list(result.unexpected_keys)[:8]}")


def _get(model: nn.Module, key: str):
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return getattr(mod, attr, None)
