"""What kernswap modules keep outside their buffers, and how it leaves them when they are pickled."""
import torch.nn as nn

__all__ = ["CachedRunnerModule"]

# per-instance caches derived from the buffers (rebuilt on the next call): never part of a saved module
CACHE_ATTRS = ("_runner_cache", "_qweight_cache")


class CachedRunnerModule(nn.Module):
    """Base of the modules that cache a prepared kernel runner (a closure over raw pointers) in their __dict__:
    torch.save / pickle / copy.deepcopy drop the caches instead of failing on the closure or carrying pointers
    into another object's storage."""

    def __getstate__(self):
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in CACHE_ATTRS}
