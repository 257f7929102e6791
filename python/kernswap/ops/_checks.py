"""Argument checks shared by every op's one checking function (called by its public wrapper, its registered op's
implementation and fake kernel, and the module fast paths), with messages that name the function, the argument,
what was expected and what was received.

Shape relations go through :func:`require`, which is ``torch._check``-compatible: a plain bool is decided at
once (a few tens of nanoseconds when it holds), a symbolic one (a SymBool while torch.compile traces with dynamic
or data-dependent sizes) becomes torch's runtime assertion instead of a guard on the size.
"""
from typing import Callable, Optional, Union

import torch

from ..backend import Backend, normalize_backend

__all__ = ["FLOAT_DTYPES", "require", "check_tensor", "check_int", "check_backend", "check_device"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require(cond, exc, msg: Union[str, Callable[[], str]]) -> None:
    """Raise exc(msg) unless cond holds (msg may be a callable, evaluated only on failure)."""
    if cond is True:
        return
    if not isinstance(cond, bool) and isinstance(cond, torch.SymBool):
        torch._check_with(exc, cond, msg if callable(msg) else (lambda: msg))
        return
    if not cond:
        raise exc(msg() if callable(msg) else msg)


def check_tensor(fn: str, name: str, t, *, dtypes=None, dim=None, device=None, allow_none=False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor{' or None' if allow_none else ''}, "
                        f"got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name}.dtype must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{fn}: {name} must be {dim}-D, got shape {list(t.shape)}")
    if device is not None:
        check_device(fn, name, t, device)


def check_device(fn: str, name: str, t: Optional[torch.Tensor], device: torch.device, what: str = "the input"
                 ) -> None:
    """t (None allowed) on `device`: a meta tensor among CPU ones never reaches a kernel or a fake kernel."""
    if t is not None and t.device != device:
        raise ValueError(f"{fn}: {name} must be on the same device as {what} ({device}), got {t.device}")


def check_int(fn: str, name: str, v, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{fn}: {name} must be {rng}, got {v}")
    return v


def check_backend(fn: str, backend) -> Backend:
    """The op's backend argument as a Backend; ValueError naming the allowed values otherwise ("bogus")."""
    return normalize_backend(backend, f"{fn}: backend")
