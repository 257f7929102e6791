"""quantized_linear: public functional API, the single torch op declaration, and the backend choice table.

    kernswap.ops.quantized_linear(x, qweight, bias)      checks inputs, flattens to 2-D
      -> torch.ops.kernswap.quantized_linear(...)         declared once here (schema + fake kernel)
           "cpu"  kernel -> backends/cpu.py (kernswap._C) if available and supported, else reference
           "cuda" kernel -> backends/cuda.py (M <= 16 decode) then backends/triton.py, else reference
           default      -> reference (any other device)
A caller can force a backend with ``backend=``; forcing one that is unavailable raises RuntimeError with
the backend's own reason, one that cannot run these inputs raises NotImplementedError.
"""
from typing import List, Optional, Tuple, Union

import torch

from ..backend import Backend
from ..formats.base import QuantizedWeight, check_format
from ..reference.quantized_linear import quantized_linear_ref
from ._checks import FLOAT_DTYPES, check_backend, check_device, require
from ._dispatch import BackendTable, eager_fast_path

__all__ = ["quantized_linear", "choose_backend", "get_backend_module", "backend_available", "auto_backend",
           "check_args", "check_weight", "check_bias", "check_x"]
# Auto choice table: device type -> backends tried in order; the reference is the last resort everywhere.
AUTO_TABLE = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
TABLE = BackendTable(
    "quantized_linear",
    {"cpu": "kernswap.backends.cpu", "cuda": "kernswap.backends.cuda", "triton": "kernswap.backends.triton"},
    AUTO_TABLE)
get_backend_module = TABLE.module
backend_available = TABLE.available


def choose_backend(x2d: torch.Tensor, bits: int, group_size: int, dynamic_act: bool,
                   requested: Union[str, Backend] = Backend.AUTO):
    """(backend name, module or None for the reference, reasons why earlier candidates were skipped)."""
    # what the backends' supports() read of the inputs (the GPU ones also read the row count and K): the choice is
    # made once per combination
    memo = (x2d.dtype, x2d.dim(), bits, group_size, dynamic_act,
            tuple(x2d.shape) if x2d.device.type != "cpu" else None)

    def desc() -> str:
        return (f"x of {x2d.dim()} dims, dtype {x2d.dtype}, device {x2d.device.type}, bits={bits}, "
                f"group_size={group_size}, dynamic_act={dynamic_act}")

    return TABLE.choose(x2d.device.type, lambda mod: mod.supports(x2d, bits, group_size, dynamic_act), desc,
                        requested, memo)


def auto_backend(device_type: str, bits: int, group_size: int, dynamic_act: bool, m: int = 1, k: int = 256,
                 dtype: torch.dtype = torch.bfloat16) -> Tuple[str, List[str]]:
    """Which backend `auto` picks for an (m, k) input on a device type (diagnostics); (name, skip reasons)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        reasons = []
        for name in AUTO_TABLE["cuda"]:
            ok, reason = backend_available(name)
            reasons.append(f"{name}: {reason or 'no CUDA device visible to torch'}")
        return "reference", reasons
    x2d = torch.empty(m, k, dtype=dtype, device=device_type)
    name, _, skipped = choose_backend(x2d, bits, group_size, dynamic_act, Backend.AUTO)
    return name, skipped


# ------------------------------------------------------------------------------------------ the checks
OP = "torch.ops.kernswap.quantized_linear"


def check_x(fn: str, x, in_features: int, name: str = "x") -> None:
    """x: a fp32/bf16/fp16 tensor whose last dim is in_features."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name}.dtype must be one of torch.float32, torch.bfloat16, torch.float16, "
                        f"got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{fn}: {name}.shape[-1] must equal in_features={in_features}, got a 0-d tensor")
    require(x.shape[-1] == in_features, ValueError,
            lambda: f"{fn}: {name}.shape[-1] must equal in_features={in_features}, got {x.shape[-1]}")


def check_bias(fn: str, bias, out_features: int, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    require(bias.dim() == 1 and bias.shape[0] == out_features, ValueError,
            lambda: f"{fn}: bias must have shape [out_features={out_features}], got {list(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"{fn}: bias must be floating point, got {bias.dtype}")
    check_device(fn, "bias", bias, device, "x")


def check_weight(fn: str, packed, scale, zero, bits, group_size, in_features, out_features, dynamic_act,
                 device: torch.device, symmetric=None, weight: str = "") -> None:
    """The packed weight (kernswap.formats.check_format: format, sizes, stored shapes and dtypes) on x's device;
    ``weight`` prefixes the parts' names ("qweight." in the wrapper), symmetric defaults to what zero implies."""
    if symmetric is None:
        symmetric = zero is None or bits != 4
    check_format(f"{fn}: {weight[:-1] + ': ' if weight else ''}", f"{fn}: {weight}", packed, scale, zero, bits,
                 group_size, symmetric, in_features, out_features)
    if not isinstance(dynamic_act, bool):
        raise TypeError(f"{fn}: {weight}dynamic_activations must be a bool, got {dynamic_act!r}")
    for name, t in (("packed", packed), ("scale", scale), ("zero", zero)):
        check_device(fn, weight + name, t, device, "x")


def check_args(fn: str, x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act,
               backend, symmetric=None, weight: str = "") -> Backend:
    """The op's one checking function: every shape, dtype, device and size relation the kernels rely on, for the
    wrapper (fn "quantized_linear"), the registered op and its fake kernel (fn OP) and the module fast path
    (QuantLinear, when it prepares a runner). Returns the backend."""
    check_x(fn, x2d, in_features, "x" if fn == "quantized_linear" else "x2d")
    if x2d.dim() != 2:
        raise ValueError(f"{fn}: x2d must be 2-D [rows, in_features], got shape {list(x2d.shape)}")
    check_weight(fn, packed, scale, zero, bits, group_size, in_features, out_features, dynamic_act, x2d.device,
                 symmetric, weight)
    check_bias(fn, bias, out_features, x2d.device)
    return check_backend(fn, backend)


# ------------------------------------------------------------------------------------------ the op
@torch.library.custom_op("kernswap::quantized_linear", mutates_args=())
def _quantized_linear_op(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                         out_features: int, dynamic_act: bool, backend: str) -> torch.Tensor:
    """Default implementation (devices without a kernel of their own): the reference, unless forced."""
    return _checked_run(x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act,
                        backend)


def _checked_run(x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act, backend):
    check_args(OP, x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act, backend)
    return _run(x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act, backend)


def _run(x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act, backend):
    """The kernel choice and call, on checked arguments."""
    args = (x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act)
    _, mod, _ = choose_backend(x2d, bits, group_size, dynamic_act, backend)
    if mod is None:
        return quantized_linear_ref(*args)
    if x2d.shape[0] == 0:
        return x2d.new_empty(0, out_features)
    return mod.quantized_linear(*args)


@_quantized_linear_op.register_fake
def _quantized_linear_fake(x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features,
                           dynamic_act, backend):
    check_args(OP, x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act, backend)
    return x2d.new_empty(x2d.shape[0], out_features)


def _setup_context(ctx, inputs, output):
    x2d, packed, scale, zero, bias, bits, group_size, in_features, out_features, dynamic_act, _ = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.meta = (bits, group_size, in_features, out_features, dynamic_act, x2d.dtype, bias is not None and
                bias.requires_grad)


def _backward(ctx, grad):
    """dL/dx = grad @ W (dequantized; straight-through for the A8 rounding), dL/dbias = sum over rows.
    The quantized weight itself gets no gradient (it is not differentiable)."""
    packed, scale, zero = ctx.saved_tensors
    bits, group_size, k, n, dyn, x_dtype, bias_grad = ctx.meta
    gx = None
    if ctx.needs_input_grad[0]:
        qw = QuantizedWeight(packed, scale, zero, bits, group_size, zero is None, k, n, dyn)
        gx = (grad.to(torch.float32) @ qw.dequantize()).to(x_dtype)
    gb = grad.sum(dim=0) if bias_grad else None
    return gx, None, None, None, gb, None, None, None, None, None, None


_quantized_linear_op.register_autograd(_backward, setup_context=_setup_context)

# Per-device kernels: the choice table above (AUTO_TABLE) decides, with the reference as the fallback.
_quantized_linear_op.register_kernel("cpu")(_checked_run)
_quantized_linear_op.register_kernel("cuda")(_checked_run)


# ------------------------------------------------------------------------------------------ public API
def quantized_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, *,
                     backend: Optional[Union[str, Backend]] = None) -> torch.Tensor:
    """y = x @ W^T + bias with a packed quantized weight W [N, K].

    x: (..., K) fp32/bf16/fp16 (a non-contiguous x is copied to a contiguous one); returns (..., N) in x.dtype.
    With ``qweight.dynamic_activations`` the rows of x are quantized to int8 on the fly (W8A8 / W4A8).
    backend: None/"auto" (fastest available) | "cpu" | "cuda" | "triton" | "reference".
    A QuantizedWeight edited after construction is checked again here (check_args, every call).
    """
    fn = "quantized_linear"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"{fn}: qweight must be a kernswap.formats.QuantizedWeight, got {type(qweight).__name__}")
    k, n = qweight.in_features, qweight.out_features
    if x.dim() == 0 or x.shape[-1] != k:  # (check_args checks the rest, on x2d)
        check_x(fn, x, k)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k).contiguous()
    req = check_args(fn, x2d, qweight.packed, qweight.scale, qweight.zero, bias, qweight.bits, qweight.group_size,
                     k, n, qweight.dynamic_activations, backend, qweight.symmetric, "qweight.")
    op = _run if eager_fast_path(x2d, bias) else torch.ops.kernswap.quantized_linear
    y = op(x2d, qweight.packed, qweight.scale, qweight.zero, bias, qweight.bits, qweight.group_size, k, n,
           qweight.dynamic_activations, req.value)
    return y.reshape(*lead, n)
