"""Find Triton kernel modules: ``kernswap.kernels.<name>`` when installed, else ``<repo>/kernels/<name>.py``.

CMake installs the repo's ``kernels/`` directory into the package; in a source checkout (PYTHONPATH=python)
it is not there, so we register ``kernswap.kernels`` as a package whose path is the source directory.
Errors raised *inside* a kernel module (e.g. triton missing) propagate to the caller unchanged.
"""
import importlib
import importlib.util
import pathlib
import sys
import types
from types import ModuleType

__all__ = ["load", "source_dir"]

_PKG = "kernswap.kernels"


def source_dir() -> pathlib.Path:
    """<repo>/kernels for a source checkout (python/kernswap/_kernels.py -> <repo>)."""
    return pathlib.Path(__file__).resolve().parents[2] / "kernels"


def _ensure_package() -> None:
    if _PKG in sys.modules:
        return
    try:
        importlib.import_module(_PKG)
        return
    except ModuleNotFoundError as e:
        if e.name not in (_PKG, "kernswap"):
            raise
    src = source_dir()
    if not src.is_dir():
        raise ModuleNotFoundError(f"{_PKG} is not installed and {src} does not exist", name=_PKG)
    init = src / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[str(src)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[_PKG] = pkg
        try:
            spec.loader.exec_module(pkg)
        except BaseException:
            sys.modules.pop(_PKG, None)
            raise
    else:
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(src)]
        pkg.__package__ = _PKG
        sys.modules[_PKG] = pkg
    import kernswap

    kernswap.kernels = sys.modules[_PKG]


def load(name: str) -> ModuleType:
    """Import and return the Triton kernel module ``name`` (e.g. "quantized_linear")."""
    _ensure_package()
    return importlib.import_module(f"{_PKG}.{name}")
