"""What kernswap modules keep outside their buffers, and how it leaves them when they are pickled."""
import torch
import torch.nn as nn

__all__ = ["CachedRunnerModule", "tensor_key", "version"]

# per-instance caches derived from the buffers (rebuilt on the next call): never part of a saved module
CACHE_ATTRS = ("_runner_cache", "_qweight_cache", "_weights_cache")


def version(t) -> int:
    """In-place modification counter of a tensor (inference tensors have none: they cannot change)."""
    if not isinstance(t, torch.Tensor) or t.is_inference():
        return 0
    return t._version


def tensor_key(*tensors) -> tuple:
    """What a cache derived from these tensors depends on: the object, the storage it views now (data pointer,
    shape, strides, dtype: a `.data = ...` assignment keeps the object but changes these) and its in-place version.
    None stays None. While torch.compile traces, the objects alone (the traced graph guards on the rest)."""
    if torch.compiler.is_compiling():
        return tuple(id(t) for t in tensors)
    return tuple(None if t is None else
                 (id(t), t.data_ptr() if t.device.type != "meta" else 0, tuple(t.shape), t.stride(), t.dtype,
                  version(t)) for t in tensors)


class CachedRunnerModule(nn.Module):
    """Base of the modules that cache a prepared kernel runner (a closure over raw pointers) in their __dict__:
    torch.save / pickle / copy.deepcopy drop the caches instead of failing on the closure or carrying pointers
    into another object's storage."""

    def __getstate__(self):
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in CACHE_ATTRS}
