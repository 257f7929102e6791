"""Appending one decode step's keys and values to a transformers ``DynamicLayer`` without copying the cache.

``DynamicLayer.update`` concatenates: every step copies the whole cache of the layer (SmolLM2-135M at 160 cached
positions: ~7 MB a token over its 30 layers, as much as a fifth of its int4 weights). :class:`KVAppender` keeps each
cache layer's keys and values in a buffer with room to grow (doubling) and sets the layer's ``keys`` / ``values`` to
views of its first L positions, so a step writes one position. Whatever else touches the layer (crop, beam
reorder, a prefill through the model's own forward, offloading) replaces those views with new tensors; the next
step sees that its views are gone and starts a new buffer from the layer's tensors. The layer ends up holding
exactly what ``update`` would have left there (as strided views).
"""
import weakref
from typing import Optional, Tuple

import torch

__all__ = ["KVAppender"]

MIN_ROOM = 64  # positions a new buffer holds beyond the cache's current length, at least


class KVAppender:
    """Per decoder layer: the growing buffers of the cache layers it appended to (weakly keyed by the layer)."""

    def __init__(self):
        self._buffers = weakref.WeakKeyDictionary()

    def __getstate__(self):  # deep copies and pickles of the model start without buffers
        return {}

    def __setstate__(self, state):
        self.__init__()

    def append(self, cache, idx: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``cache.update(k, v, idx)`` for k, v of [B, Hkv, 1, D] fp32; the keys and values to attend to."""
        slot = self.reserve(cache, idx, k.shape[0], k.shape[1], k.shape[3])
        if slot is None:
            return cache.update(k, v, idx)
        layer, kbuf, vbuf, n = slot
        kbuf[:, :, n:n + 1].copy_(k)
        vbuf[:, :, n:n + 1].copy_(v)
        return self.commit(layer, kbuf, vbuf, n)

    def reserve(self, cache, idx: int, b: int, hkv: int, d: int):
        """(layer, key buffer, value buffer, n) with room at position n (the cache's length) for one more key and
        value of [b, hkv, d], the first n positions holding the layer's keys and values; None when the layer is not
        one this appends to (then ``cache.update`` is the way)."""
        layers = getattr(cache, "layers", None)
        layer = layers[idx] if type(layers) is list and idx < len(layers) else None
        rec = None if layer is None else self._buffers.get(layer)
        if rec is not None and rec[2] is layer.keys and rec[3] is layer.values and not getattr(cache, "offloading",
                                                                                            False):
            kbuf, vbuf, keys, _ = rec  # our views, untouched: only their sizes and the room are left to check
            n = keys.shape[2]
            if kbuf.shape[0] == b and kbuf.shape[1] == hkv and kbuf.shape[3] == d and n < kbuf.shape[2]:
                return layer, kbuf, vbuf, n
        layer = self._layer(cache, idx, b, hkv, d)
        if layer is None:
            return None
        keys, values = layer.keys, layer.values
        n = keys.shape[2]
        # not our views any more (or never were), or full: a new buffer from the layer's tensors
        cap = n + max(n, MIN_ROOM)
        kbuf, vbuf = (torch.empty(t.shape[0], t.shape[1], cap, t.shape[3], dtype=t.dtype) for t in (keys, values))
        kbuf[:, :, :n].copy_(keys)
        vbuf[:, :, :n].copy_(values)
        return layer, kbuf, vbuf, n

    def commit(self, layer, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Position n of the buffers is written: the layer's keys and values become their first n + 1 positions."""
        layer.keys, layer.values = kbuf[:, :, :n + 1], vbuf[:, :, :n + 1]
        self._buffers[layer] = (kbuf, vbuf, layer.keys, layer.values)
        return layer.keys, layer.values

    @staticmethod
    def _layer(cache, idx: int, b: int, hkv: int, d: int) -> Optional[object]:
        """The cache's layer ``idx`` when it is a plain DynamicLayer already holding fp32 CPU keys and values of
        [b, hkv, L, d] (what update would concatenate to), else None."""
        layers = getattr(cache, "layers", None)
        if getattr(cache, "offloading", False) or layers is None or idx >= len(layers):
            return None
        layer = layers[idx]
        if type(layer).__name__ != "DynamicLayer" or not getattr(layer, "is_initialized", False):
            return None
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        for t in (keys, values):
            if (type(t) is not torch.Tensor or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4
                    or t.shape[0] != b or t.shape[1] != hkv or t.shape[3] != d or t.shape[2] < 1):
                return None
        return layer if values.shape == keys.shape else None
