"""SmoothQuant for the activation-quantized formats (W8A8 / W4A8, ``QuantConfig(smooth=...)``): per input channel j
of the Linear layers fed by a normalization layer, a factor s_j moves the activations' outliers into the weights,
x' = x / s, W' = W * s (exact in real arithmetic), and the division is folded into the norm's weight (and bias), so
no op is added at inference. s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (max over the calibration rows and over
the layers the norm feeds), alpha fixed by the user or searched for the whole model: each candidate (and no
smoothing) is folded in turn with the activation-quantized layers running as their quantized forms, and the one of
least next-token loss on the calibration text wins. (A per-layer search on each layer's own output error picked
larger alphas that compounded worse through SmolLM2's 30 layers: +1.3-1.5% perplexity against +0.75% at 0.5.)

Which norm feeds which layers is seen, not declared: during one calibration forward a norm's output tensor is the
very tensor object its consumers receive. A norm is folded only when the fold is exact on its own recorded inputs
(norm(x) with weight / s == norm(x) / s: norms of the form w * f(x) + b), and the model's logits on a calibration
batch are compared before / after every fold: a consumer the hooks cannot see (another op reading the norm's
output) makes them differ, and then nothing is folded. Every tensor a fold replaces is kept by an undo record, so
unpatch restores the model bit for bit."""
import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["smooth_model", "SmoothRecord", "ALPHAS"]

ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # searched with smooth=True
SAMPLE_ROWS = 256  # rows of each norm's input kept to check its fold
EXACT_RTOL = 1e-3  # logits before / after folding: max |diff| / max |logits|


@dataclasses.dataclass
class SmoothRecord:
    """Undo record: each (parameter, original tensor) pair is put back by undo()."""

    saved: List[Tuple[nn.Parameter, Optional[torch.Tensor]]]
    norms: List[str]  # qualified names of the folded norms
    alphas: Dict[str, float]

    def undo(self) -> None:
        for p, t in reversed(self.saved):
            if t is not None:
                p.data = t

    def drop_originals(self) -> None:
        self.saved = [(p, None) for p, _ in self.saved]


def _uses(model: nn.Module) -> Dict[int, int]:
    """id(parameter) -> how many names the model has for it (more than one: tied)."""
    uses: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return uses


def _norm_weight(mod: nn.Module) -> Optional[nn.Parameter]:
    w = getattr(mod, "weight", None)
    if isinstance(w, nn.Parameter) and w.dim() == 1 and w.dtype.is_floating_point and not isinstance(mod, nn.Linear):
        return w
    return None


def _trace(model: nn.Module, run: Callable[[], Any], consumers: Callable[[nn.Linear], bool]):
    """One forward: the norms whose output some nn.Linear takes as its input tensor -> (norm, [linears], input
    sample rows, output channel absmax). Consumers of a norm are grouped over the whole forward."""
    norm_out: Dict[int, Tuple[torch.Tensor, str]] = {}
    norm_in: Dict[str, torch.Tensor] = {}
    groups: Dict[str, List[str]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def norm_hook(mod, args, out):
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            name = names[id(mod)]
            norm_out[id(out)] = (out, name)
            norm_in.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1])[:SAMPLE_ROWS].float().clone())

    def linear_hook(mod, args):
        x = args[0] if args else None
        hit = norm_out.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[0] is x:
            lst = groups.setdefault(hit[1], [])
            if names[id(mod)] not in lst:
                lst.append(names[id(mod)])

    for n, m in model.named_modules():
        if _norm_weight(m) is not None:
            handles.append(m.register_forward_hook(norm_hook))
        elif type(m) is nn.Linear:
            handles.append(m.register_forward_pre_hook(linear_hook))
    try:
        with torch.no_grad():
            out = run()
    finally:
        for h in handles:
            h.remove()
    norm_out.clear()
    mods = dict(model.named_modules())
    return {n: ls for n, ls in groups.items() if any(consumers(mods[x]) for x in ls)}, norm_in, out


def _absmax(model: nn.Module, norms: Sequence[str], runs: Sequence[Callable[[], Any]]) -> Dict[str, torch.Tensor]:
    """Per norm: max |output_j| over every calibration row."""
    amax: Dict[str, torch.Tensor] = {}

    def make(name):
        def hook(mod, args, out):
            a = out.detach().reshape(-1, out.shape[-1]).float().abs().amax(0)
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return hook

    run_with_output_hooks(model, norms, make, runs)
    return amax


def run_with_output_hooks(model: nn.Module, names: Sequence[str], make: Callable[[str], Callable],
                          runs: Sequence[Callable[[], Any]]) -> None:
    """Run every calibration forward with ``make(name)`` as a forward hook on each named module (removed
    afterwards, also on failure)."""
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            for r in runs:
                r()
    finally:
        for h in handles:
            h.remove()


def _factors(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    ok = (amax > 0) & (wmax > 0) & torch.isfinite(amax)
    s = amax.clamp_min(1e-12) ** alpha / wmax.clamp_min(1e-12) ** (1 - alpha)
    return torch.where(ok, s.clamp(1e-4, 1e4), torch.ones_like(s))


def next_token_nll(out: Any, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of a causal LM's output on its input ids."""
    logits = getattr(out, "logits", out)[..., :-1, :].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[..., 1:].reshape(-1)))


@contextlib.contextmanager
def _fake_quantized(lins: List[Tuple[nn.Linear, Any]], own_method: bool = False):
    """Context: each (linear, config) runs as its quantized form would (round-to-nearest weights of the config,
    or with ``own_method`` the config's own scale choice; per-token int8 inputs), weights and hooks put back
    afterwards."""
    from ..formats import quantize
    from ..reference.quantized_linear import quantize_activations

    def act(mod, args):
        x = args[0]
        a, scale, _ = quantize_activations(x.reshape(-1, x.shape[-1]))
        return ((a * scale[:, None]).to(x.dtype).reshape(x.shape),) + tuple(args[1:])

    saved, handles = [], []
    try:
        for lin, cfg in lins:
            saved.append((lin.weight, lin.weight.data))
            c = cfg if own_method else dataclasses.replace(cfg, method="rtn", act_order=False)
            lin.weight.data = quantize(lin.weight.data, c).dequantize().to(lin.weight.dtype)
            handles.append(lin.register_forward_pre_hook(act))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, t in saved:
            p.data = t


SEARCH_BATCHES = 4  # calibration batches whose loss decides alpha


def smooth_model(model: nn.Module, runs: Sequence[Callable[[], Any]], alpha: Optional[float],
                 layer_cfg: Callable[[str, nn.Linear], Any],
                 losses: Sequence[Callable[[], float]] = ()) -> Tuple[Optional[SmoothRecord], str]:
    """Fold SmoothQuant factors into ``model`` in place. ``runs``: the calibration forwards; ``alpha``: a float in
    (0, 1) to fix it, None to search: each of ALPHAS (and no smoothing) folded in turn, the activation-quantized
    layers run as their quantized forms, and the alpha of least calibration loss (``losses``: callables running
    a calibration batch and returning its loss; the first SEARCH_BATCHES are used) kept for the whole model.
    ``layer_cfg(name, linear)``: the activation-quantized QuantConfig that layer will get, or None (it is then
    scaled to stay exact, but not quantized in the search). Returns (the undo record or None, a report note)."""
    mods = dict(model.named_modules())
    names = {id(m): n for n, m in mods.items()}
    uses = _uses(model)
    groups, norm_in, ref_out = _trace(model, runs[0], lambda m: layer_cfg(names[id(m)], m) is not None)
    if not groups:
        return None, "smoothing: no normalization layer feeds an activation-quantized layer; nothing folded"
    amax = _absmax(model, list(groups), runs)
    plan = []  # (norm name, norm, linears, channel max |W| over the linears)
    for norm_name, lin_names in groups.items():
        norm, lins = mods[norm_name], [mods[n] for n in lin_names]
        if any(uses.get(id(p), 0) > 1 for p in [norm.weight] + [l.weight for l in lins]):
            continue  # a tied weight (e.g. an output head sharing the embeddings) cannot be rescaled alone
        if any(l.weight.shape[1] != amax[norm_name].numel() for l in lins):
            continue
        plan.append((norm_name, norm, lins, torch.stack([l.weight.detach().float().abs().amax(0) for l in lins]).amax(0)))
    # every activation-quantized layer runs quantized in the search, not only the ones the norms feed: the loss
    # must be the quantized model's (with o_proj / down_proj left in float it ranked the alphas differently)
    quantized = [(m, layer_cfg(n, m)) for n, m in mods.items() if type(m) is nn.Linear]
    quantized = [(l, c) for l, c in quantized if c is not None]

    def fold(a: float) -> SmoothRecord:
        rec = SmoothRecord([], [], {})
        try:
            for norm_name, norm, lins, wmax in plan:
                if _fold(norm, lins, _factors(amax[norm_name], wmax, a), norm_in.get(norm_name), rec.saved):
                    rec.norms.append(norm_name)
                    rec.alphas[norm_name] = a
        except BaseException:
            rec.undo()
            raise
        return rec

    chosen: Optional[float] = None if alpha is None else float(alpha)
    searched = ""
    if alpha is None:
        if not losses:
            return None, "smoothing: the calibration batches have no input_ids to search alpha on; nothing folded"
        def score(a, own_method=False):
            rec = fold(a) if a is not None else SmoothRecord([], [], {})
            try:
                with _fake_quantized(quantized, own_method), torch.no_grad():
                    return sum(f() for f in losses[:SEARCH_BATCHES]) / min(len(losses), SEARCH_BATCHES)
            finally:
                rec.undo()

        scores = {a: score(a) for a in (None,) + ALPHAS}
        chosen = min(scores, key=lambda a: scores[a])
        searched = " (searched: calibration loss " + ", ".join(
            f"{'none' if a is None else f'{a:g}'} {v:.4f}" for a, v in scores.items())
        if chosen is not None and any(c.method != "rtn" for _, c in quantized):
            # the search quantized with round-to-nearest; with the layers' own method, smoothing must still win
            mine, none = score(chosen, True), score(None, True)
            searched += f"; with method {quantized[0][1].method}: {chosen:g} {mine:.4f}, none {none:.4f}"
            chosen = chosen if mine < none else None
        searched += ")"
        if chosen is None:
            return None, "smoothing: no alpha lowered the calibration loss; nothing folded" + searched
    rec = fold(chosen)
    if not exact_or_undone(rec, runs[0], ref_out):
        return None, ("smoothing: folding changed the model's output (a normalization output is read by more than "
                      "its Linear layers); nothing folded")
    if not rec.norms:
        return None, "smoothing: no normalization layer could take the factors; nothing folded"
    return rec, f"smoothing: alpha {chosen:g} folded into {len(rec.norms)} normalization layers" + searched


def _fold(norm: nn.Module, lins: List[nn.Linear], s: torch.Tensor, x: Optional[torch.Tensor],
          saved: List[Tuple[nn.Parameter, torch.Tensor]]) -> bool:
    """norm.weight (and bias) / s, each linear's weight columns * s; False (nothing changed) when the norm's output
    on its recorded inputs is not divided by s exactly (to fp32 rounding)."""
    w = _norm_weight(norm)
    bias = getattr(norm, "bias", None)
    params = [w] + ([bias] if isinstance(bias, nn.Parameter) and bias.shape == w.shape else [])
    with torch.no_grad():
        y0 = norm(x.to(w.dtype)).float() if x is not None else None
        start = len(saved)
        for p in params:
            saved.append((p, p.data))
            p.data = (p.data.float() / s).to(p.dtype)
        if y0 is None or not torch.allclose(norm(x.to(w.dtype)).float() * s, y0, rtol=1e-4,
                                            atol=1e-5 * float(y0.abs().max().clamp_min(1e-30))):
            for p, t in reversed(saved[start:]):
                p.data = t
            del saved[start:]
            return False
        for l in lins:
            saved.append((l.weight, l.weight.data))
            l.weight.data = (l.weight.data.float() * s).to(l.weight.dtype)
    return True


def exact_or_undone(rec: SmoothRecord, run: Callable[[], Any], ref_out: Any) -> bool:
    """After folding ``rec``: True when the model's output on ``run`` still matches ``ref_out`` (or nothing was
    folded); otherwise the folds are undone and False. Undone too if the check itself fails."""
    if not rec.norms:
        return True
    try:
        with torch.no_grad():
            ok = _close(ref_out, run())
    except BaseException:
        rec.undo()
        raise
    if not ok:
        rec.undo()
    return ok


def _close(a: Any, b: Any) -> bool:
    ta = getattr(a, "logits", a)
    tb = getattr(b, "logits", b)
    if not isinstance(ta, torch.Tensor) or not isinstance(tb, torch.Tensor):
        return False
    scale = float(ta.float().abs().max().clamp_min(1e-30))
    return bool(((ta.float() - tb.float()).abs().max() <= EXACT_RTOL * scale).item())
