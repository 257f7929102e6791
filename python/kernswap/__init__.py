"""kernswap: int8/int4 quantized matmul kernels for PyTorch (CPU C++, CUDA/Triton, pure-PyTorch reference)."""
from . import formats, nn, ops, sparse
from .backend import Backend
from .config import MoEConfig, QuantConfig, SparseAttentionConfig
from .diagnostics import info

__version__ = "0.1.0"

__all__ = ["QuantConfig", "SparseAttentionConfig", "MoEConfig", "Backend", "info", "nn", "ops", "formats", "sparse", "patch", "unpatch", "PatchReport",
           "save_quantized", "load_quantized", "set_decode_path", "__version__"]

_LAZY = ("patch", "unpatch", "PatchReport", "save_quantized", "load_quantized", "set_decode_path")


def __getattr__(name):
    # patching is imported lazily: it pulls in transformers-related code and must not break `import kernswap`
    if name in _LAZY:
        from . import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'kernswap' has no attribute {name!r}")
