"""What every Triton backend shares: loading its kernel module and deciding whether Triton can run here."""
import os
from types import ModuleType
from typing import Tuple

import torch

__all__ = ["interpret", "kernel_module", "triton_available"]


def interpret() -> bool:
    """True under TRITON_INTERPRET=1 (the kernels then run on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def kernel_module(name: str) -> ModuleType:
    """The Triton kernel module kernels/<name>.py (installed as kernswap.kernels.<name>)."""
    from .. import _kernels

    return _kernels.load(name)


def triton_available(name: str) -> Tuple[bool, str]:
    """(True, "") when triton imports and a CUDA device (or TRITON_INTERPRET=1) is there, else (False, reason)."""
    try:
        mod = kernel_module(name)
    except Exception as exc:  # missing source tree / broken install
        return False, f"triton kernels not loadable: {type(exc).__name__}: {exc}"
    if not mod.HAS_TRITON:
        return False, f"triton not installed ({mod.TRITON_IMPORT_ERROR})"
    if interpret():
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    return True, ""
