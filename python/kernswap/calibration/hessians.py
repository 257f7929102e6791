"""The second moments of each layer's inputs over calibration text: H = sum over input rows of x x^T (fp64), what
GPTQ needs per Linear layer, from forward pre-hooks (removed afterwards, also on failure).

``sequential_hessians`` measures them as GPTQ means them: block by block (decoder layer by decoder layer), each
block's inputs being the outputs of the blocks before it *quantized*, so a layer is fitted to the inputs it will see
in the quantized model. (Hessians of the float model alone make every layer's own output error smaller but the
errors compound: SmolLM2-135M int4 g128 came out at +46% perplexity that way, worse than the calibration-free
scales.) The blocks' weights are swapped for their quantized values only while the next block's inputs are
computed, and restored before it returns."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["normalize_calibration", "collect_hessians", "sequential_hessians"]


def normalize_calibration(calibration: Any, fn: str = "kernswap.patch") -> List[Dict[str, Any]]:
    """calibration: token ids (a [T] or [B, T] integer tensor), a list of them, or an iterable of model-input dicts
    -> a list of keyword-argument dicts for model(**kw)."""
    def ids_dict(t) -> Dict[str, Any]:
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() not in (1, 2) or t.numel() == 0:
            raise TypeError(f"{fn}: calibration token ids must be non-empty [T] or [B, T] integer tensors, got "
                            f"{type(t).__name__}" + (f" {t.dtype} of shape {list(t.shape)}"
                                                     if isinstance(t, torch.Tensor) else ""))
        return {"input_ids": t if t.dim() == 2 else t[None]}

    if isinstance(calibration, torch.Tensor):
        return [ids_dict(calibration)]
    if isinstance(calibration, dict):
        return [dict(calibration)]
    try:
        items = list(calibration)
    except TypeError:
        raise TypeError(f"{fn}: calibration must be token ids (a tensor), a list of them, or an iterable of "
                        f"model-input dicts, got {type(calibration).__name__}") from None
    if not items:
        raise ValueError(f"{fn}: calibration is empty")
    return [dict(x) if isinstance(x, dict) else ids_dict(x) for x in items]


def _tokens(kw: Dict[str, Any]) -> int:
    ids = kw.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def calibration_forward(model: nn.Module, kw: Dict[str, Any]) -> Any:
    """One calibration forward (no KV cache unless the batch asks for one) -> the model's output."""
    return model(**kw, **({"use_cache": False} if "use_cache" not in kw else {}))


def _run(model: nn.Module, kw: Dict[str, Any]) -> int:
    """One calibration forward -> its token count."""
    calibration_forward(model, kw)
    return _tokens(kw)


def collect_hessians(model: nn.Module, layers: Sequence[nn.Linear], batches: List[Dict[str, Any]],
                     progress: bool = False, diagonal: bool = False) -> Tuple[Dict[int, torch.Tensor], int]:
    """{id(layer): H [K, K] fp64} over every input row each layer saw, and the number of calibration tokens;
    ``diagonal``: only H's diagonal [K] (each input channel's sum of squares, in fp64)."""
    hess: Dict[int, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if diagonal:
            x = x.to(torch.float64)
            h = (x * x).sum(0)
        else:
            x = x.to(torch.float32)
            h = (x.t() @ x).to(torch.float64)
        key = id(mod)
        hess[key] = h if key not in hess else hess[key] + h

    handles = [layer.register_forward_pre_hook(hook) for layer in {id(m): m for m in layers}.values()]
    tokens = 0
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for kw in tqdm(batches, desc="kernswap: calibrating", unit="batch", disable=not progress, leave=False):
                tokens += _run(model, kw)
    finally:
        for h in handles:
            h.remove()
    return hess, tokens


class _Stop(Exception):
    pass


def sequential_hessians(model: nn.Module, blocks: Sequence[nn.Module], batches: List[Dict[str, Any]],
                        quantized_weight: Callable[[nn.Linear, torch.Tensor], Optional[torch.Tensor]],
                        progress: bool = False) -> Tuple[Dict[int, torch.Tensor], int]:
    """{id(layer): H} for the nn.Linear layers of ``blocks`` (the model's decoder layers, in order), each block fed
    the outputs of the blocks before it with their weights quantized: ``quantized_weight(layer, H)`` gives the
    dequantized weight the patch will use for a layer (None: the layer stays in float)."""
    cached: List[Tuple[tuple, dict]] = []
    tokens = 0

    def catch(mod, args, kwargs):
        cached.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for kw in batches:
                try:
                    tokens += _run(model, kw)
                except _Stop:
                    tokens += _tokens(kw)
    finally:
        handle.remove()
    hess: Dict[int, torch.Tensor] = {}
    saved: List[Tuple[nn.Linear, torch.Tensor]] = []
    from tqdm.auto import tqdm

    try:
        with torch.no_grad():
            for blk in tqdm(blocks, desc="kernswap: calibrating", unit="block", disable=not progress, leave=False):
                layers = [m for m in blk.modules() if type(m) is nn.Linear]
                h, _ = collect_hessians(_BlockRunner(blk, cached), layers, [{}])
                hess.update(h)
                for layer in layers:
                    wq = quantized_weight(layer, h[id(layer)]) if id(layer) in h else None
                    if wq is not None:
                        saved.append((layer, layer.weight.data))
                        layer.weight.data = wq.to(layer.weight.dtype)
                nxt = []
                for args, kwargs in cached:
                    out = blk(*args, **kwargs)
                    hidden = out[0] if isinstance(out, (tuple, list)) else out
                    nxt.append(((hidden,) + tuple(args[1:]), kwargs))
                cached = nxt
    finally:
        for layer, w in reversed(saved):
            layer.weight.data = w
    return hess, tokens


class _BlockRunner(nn.Module):
    """Runs one block over the cached inputs of every calibration batch (for collect_hessians)."""

    def __init__(self, blk: nn.Module, cached):
        super().__init__()
        self.__dict__["blk"], self.__dict__["cached"] = blk, cached

    def forward(self, **_):
        for args, kwargs in self.cached:
            self.blk(*args, **kwargs)
