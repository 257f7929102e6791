"""Activation-aware weight scaling (AWQ-style, ``QuantConfig(method="awq")``, needs calibration): for the Linear
layers a normalization layer feeds, input channel j is scaled up in the weights by s_j = mean|x_j|^alpha
(normalised to a geometric mean of 1) before quantization and the inputs down by the same factor, folded into the
norm's weight (and bias), so the channels that carry large activations get finer weight steps. alpha (0, 0.05,
.., 1; 0 is no scaling) is chosen per norm by the squared output error of its layers on a sample of calibration
rows, quantized with the format's round-to-nearest scales; the weights are then quantized with the format's
calibration-free method ("mse" for int4, "rtn" for int8). The norm -> layers grouping, the exactness checks and
the undo record are those of SmoothQuant (kernswap.calibration.smooth)."""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .smooth import SmoothRecord, _fold, _trace, _uses, exact_or_undone, run_with_output_hooks

__all__ = ["awq_model", "AWQ_ALPHAS", "base_method"]

AWQ_ALPHAS = tuple(i / 20 for i in range(1, 21))  # 0.05 .. 1 (0: no scaling, always a candidate)
SAMPLE_ROWS = 1024  # calibration rows per norm for the search


def base_method(cfg) -> str:
    """The calibration-free method AWQ's scaled weights are quantized with."""
    return "mse" if cfg.weight_bits == 4 else "rtn"


def _stats(model: nn.Module, norms: Sequence[str], runs: Sequence[Callable[[], Any]]):
    """Per norm: mean |output_j| over every calibration row, and rows evenly spaced through the batches."""
    total: Dict[str, torch.Tensor] = {}
    count: Dict[str, int] = {}
    sample: Dict[str, List[torch.Tensor]] = {}

    def make(name):
        def hook(mod, args, out):
            x = out.detach().reshape(-1, out.shape[-1]).float()
            total[name] = x.abs().sum(0) + total.get(name, 0)
            count[name] = count.get(name, 0) + x.shape[0]
            step = max(1, -(-x.shape[0] * len(runs) // SAMPLE_ROWS))
            sample.setdefault(name, []).append(x[::step].clone())
        return hook

    run_with_output_hooks(model, norms, make, runs)
    return {n: total[n] / count[n] for n in total}, {n: torch.cat(v) for n, v in sample.items()}


def _error(x: torch.Tensor, ws: List[Tuple[torch.Tensor, Any]], s: Optional[torch.Tensor]) -> float:
    """Sum over the layers of ||x W^T - (x / s) Q(W * s)^T||^2 (Q: round-to-nearest in the layer's format, the
    inputs quantized per token too for the activation-quantized formats)."""
    from ..formats import quantize
    from ..reference.quantized_linear import quantize_activations

    xs = x if s is None else x / s
    err = 0.0
    for w, cfg in ws:
        xin = xs
        if cfg.dynamic_activations:
            a, scale, _ = quantize_activations(xs)
            xin = a * scale[:, None]
        wq = quantize(w if s is None else w * s, dataclasses.replace(cfg, method="rtn", act_order=False)).dequantize()
        err += float(((x @ w.t() - xin @ wq.t()) ** 2).sum())
    return err


def awq_model(model: nn.Module, runs: Sequence[Callable[[], Any]],
              layer_cfg: Callable[[str, nn.Linear], Any]) -> Tuple[Optional[SmoothRecord], str]:
    """Fold AWQ scales into ``model`` in place (``layer_cfg(name, linear)``: the QuantConfig that layer will get,
    or None). Returns (the undo record or None, a report note)."""
    mods = dict(model.named_modules())
    names = {id(m): n for n, m in mods.items()}
    uses = _uses(model)
    groups, norm_in, ref_out = _trace(model, runs[0], lambda m: layer_cfg(names[id(m)], m) is not None)
    if not groups:
        return None, "awq: no normalization layer feeds a quantized layer; nothing scaled"
    mean, sample = _stats(model, list(groups), runs)
    rec = SmoothRecord([], [], {})
    try:
        for norm_name, lin_names in groups.items():
            norm, lins = mods[norm_name], [mods[n] for n in lin_names]
            if any(uses.get(id(p), 0) > 1 for p in [norm.weight] + [l.weight for l in lins]):
                continue
            if any(l.weight.shape[1] != mean[norm_name].numel() for l in lins) or any(
                    layer_cfg(n, l) is None for n, l in zip(lin_names, lins)):
                continue  # every layer the norm feeds must be quantized: a float one gains nothing from the scale
            x = sample[norm_name]
            ws = [(l.weight.detach().float(), layer_cfg(n, l)) for n, l in zip(lin_names, lins)]
            m = mean[norm_name].clamp_min(1e-8)
            best, best_err, best_s = 0.0, _error(x, ws, None), None
            for a in AWQ_ALPHAS:
                s = m ** a
                s = s / (s.max() * s.min()).sqrt()
                e = _error(x, ws, s)
                if e < best_err:
                    best, best_err, best_s = a, e, s
            if best_s is not None and _fold(norm, lins, best_s, norm_in.get(norm_name), rec.saved):
                rec.norms.append(norm_name)
                rec.alphas[norm_name] = best
    except BaseException:
        rec.undo()
        raise
    if not exact_or_undone(rec, runs[0], ref_out):
        return None, ("awq: scaling changed the model's output (a normalization output is read by more than its "
                      "Linear layers); nothing scaled")
    if not rec.norms:
        return None, "awq: no normalization layer gained from scaling; nothing scaled"
    vals = sorted(rec.alphas.values())
    return rec, (f"awq: scales folded into {len(rec.norms)} normalization layers (alpha {vals[0]:g}..{vals[-1]:g}, "
                 f"searched per layer group)")
