"""Backend tables shared by every op: which backend modules an op has, which of them `auto` tries per device,
whether each is available (cached), and the choice for one call.

A backend module (python/kernswap/backends/<file>.py) has ``available() -> (bool, reason)`` and
``supports(*args) -> bool``; the op calls its kernel function itself. The reference is the fallback everywhere.
"""
import importlib
import os
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import _ext
from ..backend import Backend, normalize_backend

__all__ = ["BackendTable", "eager_fast_path"]


class BackendTable:
    """modules: backend name -> module path; auto: device type -> backend names tried in order."""

    def __init__(self, op: str, modules: Dict[str, str], auto: Dict[str, Sequence[str]]):
        self.op = op
        self.modules = dict(modules)
        self.auto = {k: tuple(v) for k, v in auto.items()}
        self._cache: Dict[tuple, Tuple[bool, str]] = {}
        self._choices: Dict[tuple, Tuple[str, Optional[ModuleType], List[str]]] = {}

    def names(self) -> Tuple[str, ...]:
        """Every backend a call of this op can ask for: auto, the reference and the op's backend modules."""
        return (Backend.AUTO.value,) + tuple(self.modules) + (Backend.REFERENCE.value,)

    def config_problem(self, requested: Union[str, Backend], pieces: Sequence[str] = (), **fmt) -> Optional[str]:
        """Why a config forcing backend ``requested`` can never run this op, or None when it may: a backend the op
        does not have, one lacking a piece the config needs (``pieces``), or one whose declared formats (its
        ``supports_format(**fmt)``, when it has one) exclude the config's. A backend that does not import here
        passes: the call says why it is unavailable."""
        req = normalize_backend(requested).value
        if req in (Backend.AUTO.value, Backend.REFERENCE.value):
            return None
        if req not in self.modules:
            return f"{self.op} has no {req!r} backend (it has {', '.join(map(repr, self.names()))})"
        mod, _ = self.module(req)
        if mod is None:
            return None
        missing = [p for p in pieces if not hasattr(mod, p)]
        if missing:
            return f"the {req!r} backend of {self.op} has no {', '.join(missing)} piece"
        check = getattr(mod, "supports_format", None)
        if fmt and check is not None and not check(**fmt):
            return (f"the {req!r} backend of {self.op} does not run "
                    f"{', '.join(f'{k}={v!r}' for k, v in fmt.items())}: {(check.__doc__ or '').strip()}")
        return None

    def module(self, name: str) -> Tuple[Optional[ModuleType], str]:
        """(module, "") or (None, reason). Imported lazily: a broken optional backend never breaks the op."""
        path = self.modules.get(name)
        if path is None:
            return None, f"{self.op} has no {name!r} backend"
        try:
            return importlib.import_module(path), ""
        except ImportError as e:
            return None, f"{path} not importable ({type(e).__name__}: {e})"
        except Exception as e:  # noqa: BLE001
            return None, f"{path} failed to import ({type(e).__name__}: {e})"

    @staticmethod
    def _state() -> tuple:
        """What availability depends on: the compiled modules and the test overrides."""
        return (os.environ.get("TRITON_INTERPRET"), os.environ.get("KERNSWAP_NO_EXT"), id(_ext.get_C()),
                id(_ext.get_C_cuda()))

    def available(self, name: str) -> Tuple[bool, str]:
        """(available, reason), cached per state of what it depends on (compiled modules, test overrides)."""
        key = (name,) + self._state()
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._available(name)
        return hit

    def _available(self, name: str) -> Tuple[bool, str]:
        name = normalize_backend(name).value
        if name == "reference":
            return True, ""
        if name == "auto":
            raise ValueError(f"{self.op}: backend_available needs a concrete backend, got 'auto'")
        mod, reason = self.module(name)
        if mod is None:
            return False, reason
        try:
            ok, reason = mod.available()
        except Exception as e:  # noqa: BLE001
            return False, f"{name}.available() raised {type(e).__name__}: {e}"
        return bool(ok), str(reason)

    def choose(self, device_type: str, supports: Callable[[ModuleType], bool], desc: Union[str, Callable[[], str]],
               requested: Union[str, Backend] = Backend.AUTO, memo: Optional[tuple] = None
               ) -> Tuple[str, Optional[ModuleType], List[str]]:
        """(backend name, module or None for the reference, reasons why earlier candidates were skipped).

        A forced backend that is unavailable raises RuntimeError with its reason; one that cannot run these
        inputs raises NotImplementedError. ``memo``: everything ``supports`` reads of the inputs; a choice made
        once for it (and the same availability state) is reused, so a call costs a dict look-up. ``desc`` (a string,
        or a function making it) describes the inputs in the messages."""
        key = None
        if memo is not None:
            key = (device_type, memo, requested) + self._state()
            hit = self._choices.get(key)
            if hit is not None:
                return hit
        out = self._choose(device_type, supports, desc if isinstance(desc, str) else desc(), requested)
        if key is not None:
            self._choices[key] = out
        return out

    def _choose(self, device_type, supports, desc, requested):
        req = normalize_backend(requested)
        if req is Backend.REFERENCE:
            return "reference", None, []

        def ok(mod):
            try:
                return bool(supports(mod))
            except Exception:  # noqa: BLE001 - a backend that cannot tell does not support
                return False

        if req is not Backend.AUTO:
            avail, reason = self.available(req.value)
            if not avail:
                raise RuntimeError(f"{self.op}: backend={req.value!r} is unavailable: {reason}")
            mod, _ = self.module(req.value)
            if not ok(mod):
                raise NotImplementedError(f"{self.op}: backend={req.value!r} does not support {desc}; "
                                          f"use backend='auto' or 'reference'")
            return req.value, mod, []
        skipped = []
        for name in self.auto.get(device_type, ()):
            avail, reason = self.available(name)
            if not avail:
                skipped.append(f"{name}: {reason}")
                continue
            mod, _ = self.module(name)
            if ok(mod):
                return name, mod, skipped
            skipped.append(f"{name}: does not support {desc}")
        return "reference", None, skipped


_len_dispatch_stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_fast_path(*tensors) -> bool:
    """True when an op's registered kernel would run with nothing around it: plain tensors (None allowed), no
    autograd to record, no tracing/compiling, no dispatch or function modes. The op then calls its kernel
    directly, skipping about 0.2 ms of dispatcher and autograd-wrapper overhead per call (a decode step of a
    small model makes hundreds of calls). Everything else goes through torch.ops.kernswap."""
    if _len_dispatch_stack is None or _function_mode_on is None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return not (torch.compiler.is_compiling() or _len_dispatch_stack() or _function_mode_on())
