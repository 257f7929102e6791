"""What every Triton kernel module here shares: the guarded triton import and the description of one
ahead-of-time compile variant (each module's ``aot_variants()`` yields them; tests/test_triton_aot_compile.py
compiles them all for sm_80 and sm_90). Nothing in this file is ``@triton.jit``-decorated.

Without triton, ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why; the kernel modules still import.
"""
from typing import NamedTuple

try:  # pragma: no cover - exercised by the environment, not by a test
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or a broken install
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["triton", "tl", "HAS_TRITON", "TRITON_IMPORT_ERROR", "AOTVariant", "PTR_TYPES"]


class AOTVariant(NamedTuple):
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int


# element type name -> Triton pointer type in a compile signature
PTR_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
