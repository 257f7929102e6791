"""Backend names: the explicit choice a config or a call can make."""
import enum
from typing import Optional, Union

__all__ = ["Backend", "normalize_backend"]


class Backend(str, enum.Enum):
    """Which implementation runs an op. ``AUTO`` picks the fastest one available."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TRITON = "triton"
    REFERENCE = "reference"

    def __str__(self) -> str:  # "cpu", not "Backend.CPU"
        return self.value


_ALLOWED = tuple(b.value for b in Backend)


def normalize_backend(backend: Optional[Union[str, Backend]], where: str = "backend") -> Backend:
    """Map None / a Backend / a string (any case) to a Backend; ValueError naming allowed values otherwise."""
    if backend is None:
        return Backend.AUTO
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        try:
            return Backend(backend.strip().lower())
        except ValueError:
            pass
    raise ValueError(f"{where} must be one of {list(_ALLOWED)} (or a kernswap.Backend), got {backend!r}")
