"""Loading of the compiled modules. Nothing here raises: a missing module is a reason string.

Test override: KERNSWAP_NO_EXT=1 makes both modules count as missing (runs the reference fallbacks).

``kernswap._C`` (CPU kernels, torch-free pybind11) and the optional ``kernswap._C_cuda``.
"""
import importlib
import os
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "get_C", "have_cpu_ext", "cpu_ext_reason", "cpu_isa", "best_isa", "op_isa", "supported_isas", "cpu_features",
    "dispatch_report",
    "get_C_cuda", "have_cuda_ext", "cuda_ext_reason", "reload",
]

_state = {}


def _load(name: str) -> Tuple[Optional[ModuleType], str]:
    if os.environ.get("KERNSWAP_NO_EXT", "0") not in ("", "0"):  # test override: exercise the fallback paths
        return None, f"kernswap.{name} disabled by KERNSWAP_NO_EXT=1"
    try:
        mod = importlib.import_module(f"kernswap.{name}")
    except ImportError as e:  # not built, or built for another python / ABI
        return None, f"kernswap.{name} not importable ({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001 - a broken build must not break `import kernswap`
        return None, f"kernswap.{name} failed to load ({type(e).__name__}: {e})"
    return mod, ""


def _get(name: str) -> Tuple[Optional[ModuleType], str]:
    if name not in _state:
        _state[name] = _load(name)
    return _state[name]


def reload() -> None:
    """Forget cached import results (e.g. after dev_build.sh produced the module)."""
    _state.clear()


def get_C() -> Optional[ModuleType]:
    return _get("_C")[0]


def have_cpu_ext() -> bool:
    mod = get_C()
    return mod is not None and hasattr(mod, "qlinear")


def cpu_ext_reason(entry: str = "qlinear") -> str:
    """'' when the CPU module is usable and has the entry point ``entry`` (an op's kernel), otherwise why not."""
    mod, reason = _get("_C")
    if mod is None:
        return reason
    if not hasattr(mod, entry):
        return f"kernswap._C has no {entry!r} (stale build?)"
    return ""


def _call(entry: str, default):
    """mod.entry() of the CPU module, or `default` without the module (or in a stale build lacking it)."""
    mod = get_C()
    if mod is None or not hasattr(mod, entry):
        return default
    return getattr(mod, entry)()


def cpu_isa() -> Optional[str]:
    """Active CPU tier ('amx' | 'avx512_vnni' | 'avx512' | 'avx_vnni' | 'avx2' | 'scalar'), None without the
    module."""
    isa = _call("cpu_isa", None)
    return None if isa is None else str(isa)


def best_isa() -> Optional[str]:
    """Highest tier this CPU can run (what auto picks), None without the module."""
    isa = _call("best_isa", None)
    return None if isa is None else str(isa)


def op_isa(op: str) -> Optional[str]:
    """The tier the CPU module runs op ``op`` with (the registry's choice), None without the module."""
    mod = get_C()
    if mod is None:
        return None
    if hasattr(mod, "op_isa"):
        return str(mod.op_isa(op))
    return cpu_isa()


def supported_isas() -> List[str]:
    """Every tier this CPU can run, highest first ([] without the module)."""
    return [str(s) for s in _call("supported_isas", [])]


def cpu_features() -> Dict[str, bool]:
    """CPU features detected by the module (cpuid/xgetbv): name -> present ({} without the module)."""
    return {str(k): bool(v) for k, v in _call("cpu_features", {}).items()}


def parallel_backend() -> str:
    """What the CPU kernels' threads run on ('' without the module): torch's OpenMP team, or kernswap's pool."""
    return str(_call("parallel_backend", ""))


def dispatch_report() -> Dict[str, Dict[str, Any]]:
    """Per CPU op: {'tier': chosen tier, 'compiled': tiers with a kernel (highest first),
    'not_taken': {higher tier: reason}} ({} without the module)."""
    return {str(op): {"tier": str(r["tier"]), "compiled": [str(t) for t in r["compiled"]],
                      "not_taken": {str(t): str(w) for t, w in r["not_taken"].items()}}
            for op, r in _call("dispatch_report", {}).items()}


def get_C_cuda() -> Optional[ModuleType]:
    return _get("_C_cuda")[0]


def have_cuda_ext() -> bool:
    return get_C_cuda() is not None


def cuda_ext_reason() -> str:
    return _get("_C_cuda")[1]
