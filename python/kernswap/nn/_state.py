"""What kernswap modules keep outside their buffers, and how it leaves them when they are pickled."""
import torch
import torch.nn as nn

__all__ = ["CachedRunnerModule", "tensor_key"]

# per-instance caches derived from the buffers (rebuilt on the next call): never part of a saved module
CACHE_ATTRS = ("_runner_cache", "_qweight_cache", "_weights_cache")


def tensor_key(*tensors) -> tuple:
    """What a cache derived from these tensors depends on: the object, the storage it views now (data pointer and
    shape: a `.data = ...` assignment keeps the object but changes them) and its in-place version; about 1 us a
    tensor (it runs on every eager call). None stays None. While torch.compile traces, the objects alone (the
    traced graph guards on the rest)."""
    if torch.compiler.is_compiling():
        return tuple(id(t) for t in tensors)
    return tuple(None if t is None else (id(t), t.data_ptr(), t.shape, 0 if t.is_inference() else t._version)
                 for t in tensors)


class CachedRunnerModule(nn.Module):
    """Base of the modules that cache a prepared kernel runner (a closure over raw pointers) in their __dict__:
    torch.save / pickle / copy.deepcopy drop the caches instead of failing on the closure or carrying pointers
    into another object's storage."""

    def __getstate__(self):
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in CACHE_ATTRS}

    def _apply(self, fn, recurse: bool = True):
        """.to() / .cuda() / .half() / ...: the caches go (they hold the old buffers, which would otherwise stay
        alive beside the moved ones); the next call rebuilds what it needs."""
        for name in CACHE_ATTRS:
            self.__dict__.pop(name, None)
        return super()._apply(fn, recurse)
