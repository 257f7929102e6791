import math

import pytest
import torch
import torch.nn.functional as F

import kernswap
from conftest import (DTYPES, FORMATS, HAVE_C, ISAS, NO_C_REASON, assert_raises, assert_within, backend_params,
                      quant_tolerance, split_backend, sqnr_db, use_isa)
from kernswap.formats import quantize
from kernswap.ops import choose_backend, quantized_linear
from kernswap.reference import quantize_activations, reference_linear

# (M, N, K): odd sizes; K=4096 only with small M/N to keep the suite fast
SHAPES = [(1, 8, 128), (3, 72, 384), (17, 1000, 128), (129, 72, 384), (1, 8, 4096), (3, 72, 4096), (17, 8, 4096)]


def _case(fmt, m, n, k, dtype, bias=True):
    w = torch.randn(n, k) / math.sqrt(k)
    qw = quantize(w, FORMATS[fmt])
    x = torch.randn(m, k).to(dtype)
    b = (torch.randn(n) * 0.1).to(dtype) if bias else None
    return x, qw, b, w


def _run(backend_param, x, qw, b):
    name, isa = split_backend(backend_param)
    with use_isa(isa):
        return quantized_linear(x, qw, b, backend=name)


# every backend that can run on this machine; the reference path through the op is "auto" without kernswap._C
_BACKENDS = [f"cpu:{isa}" for isa in ISAS] or ["auto"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matches_reference(fmt, m, n, k, dtype):
    """Each available backend (each CPU ISA of kernswap._C) against the same-format reference, tight."""
    x, qw, b, _ = _case(fmt, m, n, k, dtype, bias=(m + n) % 2 == 1)
    ref = reference_linear(x, qw, b)
    tol = quant_tolerance(x, qw, ref, b)
    for backend in _BACKENDS:
        out = _run(backend, x, qw, b)
        assert_within(out, ref, tol, f"{fmt} {backend} {m}x{n}x{k} {dtype}")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_reference_matches_fp64_formula(fmt):
    """The oracle itself against a direct fp64 evaluation of the SPEC formula."""
    m, n, k = 5, 40, 256
    x, qw, b, _ = _case(fmt, m, n, k, torch.float32)
    deq = qw.dequantize().double()
    if qw.dynamic_activations:
        a, a_scale, _ = quantize_activations(x)
        want = (a.double() @ deq.t()) * a_scale.double()[:, None] + b.double()
    else:
        want = x.double() @ deq.t() + b.double()
    ref = reference_linear(x, qw, b)
    assert_within(ref, want.float(), quant_tolerance(x, qw, ref, b), f"reference {fmt}")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_sqnr_vs_unquantized(fmt):
    """Loose quality bar vs F.linear on gaussian weights: int8 > 35 dB, int4 (g <= 128) > 15 dB."""
    m, n, k = 16, 256, 1024
    x, qw, _, w = _case(fmt, m, n, k, torch.float32, bias=False)
    db = sqnr_db(F.linear(x, w), quantized_linear(x, qw))
    bar = 35.0 if qw.bits == 8 else 15.0
    print(f"SQNR {fmt}: {db:.1f} dB")
    assert db > bar, f"{fmt}: SQNR {db:.1f} dB <= {bar} dB"


_OPCHECK_BACKENDS = ["reference", "auto"] + (["cpu"] if HAVE_C else [])


@pytest.mark.parametrize("backend", _OPCHECK_BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "w4a8-g32-asym", "int4-g64-asym"])
def test_opcheck(fmt, backend):
    x, qw, b, _ = _case(fmt, 3, 24, 128, torch.bfloat16)
    for bias in (b, None):
        args = (x, qw.packed, qw.scale, qw.zero, bias, qw.bits, qw.group_size, qw.in_features,
                qw.out_features, qw.dynamic_activations, backend)
        torch.library.opcheck(torch.ops.kernswap.quantized_linear.default, args)


@pytest.mark.skipif(HAVE_C, reason="kernswap._C is built")
def test_cpu_backend_skipped_without_module():
    pytest.skip(f"cpu backend not tested: {NO_C_REASON}")


def test_shapes_3d_1d_empty_noncontiguous():
    x, qw, b, _ = _case("int4-g64-asym", 6, 40, 128, torch.float32)
    ref = quantized_linear(x, qw, b)
    y3 = quantized_linear(x.view(2, 3, 128), qw, b)
    assert y3.shape == (2, 3, 40) and torch.equal(y3.reshape(6, 40), ref)
    y1 = quantized_linear(x[0], qw, b)
    assert y1.shape == (40,) and torch.allclose(y1, ref[0], rtol=1e-5, atol=1e-6)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    assert torch.equal(quantized_linear(xt, qw, b), ref)
    for shape in [(0, 128), (2, 0, 128)]:
        for backend in ["auto", "reference"]:
            e = quantized_linear(torch.empty(shape, dtype=torch.bfloat16), qw, b, backend=backend)
            assert e.shape == shape[:-1] + (40,) and e.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4-g128", "w4a8-g32-asym"])
@pytest.mark.parametrize("backend", backend_params())
def test_nan_policy(fmt, backend):
    """A non-finite value in row m makes row m NaN (A8 paths) / propagates (weight-only); other rows unaffected."""
    x, qw, b, _ = _case(fmt, 4, 24, 128, torch.float32)
    clean = reference_linear(x, qw, b)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    out = _run(backend, x, qw, b)
    assert torch.isnan(out[1]).all()
    if qw.dynamic_activations:
        assert torch.isnan(out[2]).all()
    else:
        assert (~torch.isfinite(out[2])).all()
    keep = [0, 3]
    assert_within(out[keep], clean[keep], quant_tolerance(x[keep], qw, clean[keep], b), "finite rows")


def _bad(**kw):
    x, qw, b, _ = _case("int4-g32", 2, 24, 64, torch.float32)
    args = dict(x=x, qweight=qw, bias=b)
    args.update(kw)
    return lambda: quantized_linear(args["x"], args["qweight"], args["bias"], **args.get("extra", {}))


@pytest.mark.parametrize("call,exc,substr", [
    (_bad(x=torch.randn(2, 64).to(torch.float64)), TypeError,
     "x.dtype must be one of torch.float32, torch.bfloat16, torch.float16, got torch.float64"),
    (_bad(x=torch.ones(2, 64, dtype=torch.int32)), TypeError, "got torch.int32"),
    (_bad(x=[[1.0] * 64]), TypeError, "x must be a torch.Tensor, got list"),
    (_bad(x=torch.randn(2, 63)), ValueError, "x.shape[-1] must equal in_features=64, got 63"),
    (_bad(x=torch.tensor(1.0)), ValueError, "x.shape[-1] must equal in_features=64, got a 0-d tensor"),
    (_bad(bias=torch.randn(23)), ValueError, "bias must have shape [out_features=24], got [23]"),
    (_bad(bias=torch.randn(1, 24)), ValueError, "got [1, 24]"),
    (_bad(bias=torch.ones(24, dtype=torch.int64)), TypeError, "bias must be floating point, got torch.int64"),
    (_bad(bias=torch.randn(24, device="meta")), ValueError, "bias must be on the same device as x (cpu), got meta"),
    (_bad(x=torch.randn(2, 64, device="meta")), ValueError, "qweight.packed must be on the same device as x (meta)"),
    (_bad(qweight=torch.randn(24, 64)), TypeError, "qweight must be a kernswap.formats.QuantizedWeight, got Tensor"),
    (_bad(extra=dict(backend="gpu")), ValueError, "backend must be one of ['auto', 'cpu', 'cuda', 'triton', 'reference']"),
    (_bad(extra=dict(backend="cuda")), RuntimeError, "backend='cuda' is unavailable: "),
    (_bad(x=torch.randn(2, 64).to(torch.bfloat16), extra=dict(backend="triton")), (RuntimeError, NotImplementedError),
     "backend='triton'"),
])
def test_bad_inputs(call, exc, substr):
    assert_raises(call, exc, substr)


def test_forced_cpu_backend_without_module_says_why():
    x, qw, b, _ = _case("int8", 2, 16, 32, torch.float32)
    if HAVE_C:
        assert choose_backend(x, 8, 32, False, "auto")[0] == "cpu"
        torch.testing.assert_close(quantized_linear(x, qw, b, backend="cpu"), reference_linear(x, qw, b))
    else:
        with pytest.raises(RuntimeError) as ei:
            quantized_linear(x, qw, b, backend=kernswap.Backend.CPU)
        assert "backend='cpu' is unavailable: kernswap._C" in str(ei.value)
        name, mod, skipped = choose_backend(x, 8, 32, False, "auto")
        assert name == "reference" and mod is None and skipped and skipped[0].startswith("cpu: ")


def test_auto_on_other_devices_is_reference():
    x = torch.empty(2, 32, device="meta")
    assert choose_backend(x, 8, 32, False, "auto")[0] == "reference"
    assert choose_backend(torch.empty(2, 32), 4, 32, True, "reference")[0] == "reference"


@pytest.mark.parametrize("fmt", ["int8", "w4a8-g32-asym"])
def test_autograd_wrt_x_and_bias(fmt):
    x, qw, b, _ = _case(fmt, 3, 24, 128, torch.float32)
    x.requires_grad_(True)
    b.requires_grad_(True)
    y = quantized_linear(x.view(3, 1, 128), qw, b)
    g = torch.randn_like(y)
    y.backward(g)
    deq = qw.dequantize()
    torch.testing.assert_close(x.grad, g.view(3, 24) @ deq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.view(3, 24).sum(0))
    args = (x.detach().requires_grad_(True), qw.packed, qw.scale, qw.zero, b.detach().requires_grad_(True),
            qw.bits, qw.group_size, qw.in_features, qw.out_features, qw.dynamic_activations, "auto")
    torch.library.opcheck(torch.ops.kernswap.quantized_linear.default, args)


def test_activation_rounding_uses_fp32_division():
    """SPEC: inv = 127/amax in fp32, a = round_half_even(x * inv). Here x * inv is exactly 63.5 -> 64; the
    reciprocal form (1/amax)*127 (what `127.0 / tensor` computes) gives 63.499996 -> 63 and disagrees with C++."""
    x = torch.tensor([[2.59375, 1.296875, -0.5]])
    a, a_scale, finite = quantize_activations(x)
    inv = torch.tensor(127.0) / torch.tensor(2.59375)
    assert a[0, 1].item() == torch.round(torch.tensor(1.296875) * inv).item() == 64.0
    assert torch.round(torch.tensor(1.296875) * (127.0 / torch.tensor(2.59375))).item() == 63.0
    assert a[0, 0].item() == 127.0 and finite.all() and a_scale[0].item() == (torch.tensor(2.59375) / 127).item()
