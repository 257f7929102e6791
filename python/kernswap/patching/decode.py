"""The decode-layer path: patch() (with fused projections) installs kernswap.nn.decode_layer.DecodeForward as the
``forward`` of each decoder layer whose class and patched parts the decode kernel reads,
kernswap.nn.decode_model.DecodeModelForward as the ``forward`` of a base model all of whose layers have one, and
kernswap.nn.mlp_forward.SwiGLUForward as the ``forward`` of each SiLU-gated MLP with fused gate/up (prefill and
every call the decode kernel does not take); the undo records remove them. Layers of other shapes keep the per-op
path."""
import dataclasses
from typing import List

from torch import nn

from ..nn.decode_layer import LAYER_CLASSES, DecodeForward, decode_parts
from ..nn.decode_model import DecodeModelForward, decode_model_ready
from ..nn.mlp_forward import MLP_CLASSES, SwiGLUForward, swiglu_parts

__all__ = ["DecodeOverride", "install_decode_path", "set_decode_path"]


@dataclasses.dataclass
class DecodeOverride:
    """Undo record: ``layer.forward`` (an instance attribute) was set by kernswap."""

    layer: nn.Module

    def undo(self) -> None:
        self.layer.__dict__.pop("forward", None)


def install_decode_path(model: nn.Module) -> List[DecodeOverride]:
    """Install the decode path on every matching layer of ``model``; the undo records, in order."""
    records = []
    for mod in model.modules():
        if type(mod).__name__ in LAYER_CLASSES and "forward" not in mod.__dict__ and decode_parts(mod) is not None:
            mod.__dict__["forward"] = DecodeForward(mod)
            records.append(DecodeOverride(mod))
    for mod in model.modules():
        if type(mod).__name__ in MLP_CLASSES and "forward" not in mod.__dict__ and swiglu_parts(mod) is not None:
            mod.__dict__["forward"] = SwiGLUForward(mod)
            records.append(DecodeOverride(mod))
    for mod in model.modules():  # base models all of whose layers got one: the model-level decode loop too
        if "forward" not in mod.__dict__ and decode_model_ready(mod):
            mod.__dict__["forward"] = DecodeModelForward(mod)
            records.append(DecodeOverride(mod))
    return records


def set_decode_path(model: nn.Module, enabled: bool) -> int:
    """Turn the decode-layer path of a patched ``model`` on or off (off: every decode step takes the per-op path,
    the same fused quantized projections one op at a time, and the MLPs their SiLU-mul in torch); the number of
    decoder layers it applies to."""
    if not isinstance(enabled, bool):
        raise TypeError(f"kernswap.set_decode_path: enabled must be a bool, got {type(enabled).__name__}")
    n = 0
    for mod in model.modules():
        fwd = mod.__dict__.get("forward")
        if isinstance(fwd, (DecodeForward, DecodeModelForward, SwiGLUForward)):
            fwd.enabled = enabled
            n += isinstance(fwd, DecodeForward)
    return n
