"""Shared helpers for the kernswap core tests (formats, reference oracle, tolerances, CPU-ISA loop)."""
import math
import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter for the whole session (set before anything
# imports triton, so every kernel is decorated the same way).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test the installed package (what users get); fall back to the source tree for a checkout that was not installed.
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import kernswap  # noqa: E402
from kernswap import _ext  # noqa: E402
from kernswap.config import QuantConfig  # noqa: E402

HAVE_C = _ext.have_cpu_ext()
NO_C_REASON = _ext.cpu_ext_reason() or "kernswap._C available"
ISAS = _ext.supported_isas() if HAVE_C else []

# name -> QuantConfig covering int8, int4 sym/asym at every group size, with and without dynamic activations
FORMATS = {
    "int8": QuantConfig(8),
    "w8a8": QuantConfig(8, dynamic_activations=True),
    "int4-g32": QuantConfig(4, 32),
    "int4-g64-asym": QuantConfig(4, 64, symmetric=False),
    "int4-g128": QuantConfig(4, 128),
    "int4-g128-asym": QuantConfig(4, 128, symmetric=False),
    "w4a8-g128": QuantConfig(4, 128, dynamic_activations=True),
    "w4a8-g32-asym": QuantConfig(4, 32, symmetric=False, dynamic_activations=True),
    "int4-g32-fzero": QuantConfig(4, 32, symmetric=False, zero_point="float"),
    "w4a8-g64-fzero": QuantConfig(4, 64, symmetric=False, zero_point="float", dynamic_activations=True),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backend_params():
    """'reference', 'auto' and one 'cpu:<isa>' per ISA the compiled module supports (skipped without it)."""
    params = [pytest.param("reference", id="reference"), pytest.param("auto", id="auto")]
    if ISAS:
        params += [pytest.param(f"cpu:{isa}", id=f"cpu-{isa}") for isa in ISAS]
    else:
        params.append(pytest.param("cpu:none", id="cpu", marks=pytest.mark.skip(reason=f"cpu backend: {NO_C_REASON}")))
    return params


class use_isa:
    """Context manager: force the compiled module's ISA, reset to auto ("") afterwards."""

    def __init__(self, isa):
        self.isa = isa

    def __enter__(self):
        if self.isa:
            _ext.get_C().set_isa(self.isa)
        return self

    def __exit__(self, *exc):
        if self.isa:
            _ext.get_C().set_isa("")


def split_backend(param):
    """'cpu:avx2' -> ('cpu', 'avx2'); 'auto' -> ('auto', None)."""
    name, _, isa = param.partition(":")
    return name, (isa or None)


def quant_tolerance(x2d, qw, ref, bias=None):
    """Elementwise bound for |ours - same-format reference|, derived from the reference's own rounding.

    fp32 accumulation in another order: 8 * eps32 * sqrt(K) * (|x| @ |W|^T + |b|); outputs rounded to bf16/fp16
    may land one output-dtype ulp apart (<= eps_out * |ref|).
    """
    k = qw.in_features
    mag = x2d.float().abs() @ qw.dequantize().abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    tol = 8 * torch.finfo(torch.float32).eps * math.sqrt(k) * mag + 1e-30
    if ref.dtype != torch.float32:
        fi = torch.finfo(ref.dtype)
        tol = tol + fi.eps * ref.float().abs() + fi.tiny
    return tol


def assert_within(out, ref, tol, what=""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    err = (out.float() - ref.float()).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} elements over tolerance; "
                           f"max err {err.max().item():.3e}, max excess {(err - tol).max().item():.3e}")


def sqnr_db(ref, test):
    ref, test = ref.detach().double(), test.detach().double()
    noise = (ref - test).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_raises(call, exc, substr):
    """call() raises exc (a type or tuple of types) whose message contains substr."""
    with pytest.raises(exc) as ei:
        call()
    assert substr in str(ei.value), str(ei.value)
