"""One file per backend. Each module exposes available(), supports(...) and quantized_linear(...).

``cpu`` is always importable; ``triton`` and ``cuda`` are imported lazily by the dispatcher
(kernswap.ops._dispatch.BackendTable.module), which turns an ImportError into "unavailable".
"""
__all__ = ["cpu"]
