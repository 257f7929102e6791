"""Data-free input importance for method="mse" without calibration text: the mean square of each Linear layer's
input channels while the float model reads a few sequences of random token ids.

Which input channels are loud is a property of the model (its norms' weights, its outlier dimensions), not of the
text: on SmolLM2-135M, int4 g128 with the scale search weighted by these mean squares loses +12.8% perplexity
against +12.1% with real calibration text and +29.5% with the plain weight error (2,048 lee tokens, Xeon). So
``kernswap.patch`` weights the default int4 search this way when no calibration is given, for models that take
token ids (a transformers model with ``config.vocab_size``); any other model keeps the weight-error search.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .hessians import collect_hessians

__all__ = ["data_free_importance", "SEQUENCES", "SEQ_LEN", "SEED"]

SEQUENCES, SEQ_LEN, SEED = 4, 256, 0  # 1,024 random tokens, the same ones every time


def data_free_importance(model: nn.Module, layers: Sequence[nn.Module]
                         ) -> Tuple[Dict[int, torch.Tensor], Optional[str]]:
    """({id(layer): [in_features] fp64 sum of squared inputs}, None), or ({}, why not) for a model that does not
    take token ids. The model's weights and state are left as they were (no cache, no gradient)."""
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not layers:
        return {}, None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
        return {}, "the model has no config.vocab_size (no token ids to feed it)"
    max_pos = getattr(cfg, "max_position_embeddings", None)
    length = min(SEQ_LEN, max_pos) if isinstance(max_pos, int) and max_pos > 0 else SEQ_LEN
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(SEED)
    batches = [{"input_ids": torch.randint(0, vocab, (1, length), generator=gen).to(device)} for _ in range(SEQUENCES)]
    try:
        sums, _ = collect_hessians(model, layers, batches, diagonal=True)
    except (TypeError, ValueError) as e:  # a forward that does not take input_ids this way
        return {}, f"the model's forward did not take token ids ({type(e).__name__}: {e})"
    return sums, None
