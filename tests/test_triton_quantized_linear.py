"""Triton quantized-linear kernels under TRITON_INTERPRET=1 (CPU) against the SPEC reference semantics.

Every format (int8; int4 g32/g64/g128 symmetric, asymmetric with integer and with float zero-points), weight-only
and dynamic activations (W8A8/W4A8), fp32 and fp16 activations, small odd shapes (M and N tails, int8 K tail), both default tile configs.
Tolerance: |ours - ref_fp64| <= 2 * |ref_same_dtype - ref_fp64| + K * 2^-24 * (|x| @ |W|^T + |b|), where
ref_same_dtype is kernswap.reference (fp32 accumulation, output in x.dtype) and ref_fp64 is the same quantized
semantics evaluated in float64.  bf16 is covered on a GPU (the interpreter does not emulate bf16 dots).
"""
import importlib
import os
import sys

import torch  # does not import triton

# Without a GPU the kernels run in Triton's interpreter on CPU tensors; with one, natively on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel module are imported

import pytest  # noqa: E402

pytest.importorskip("triton")


from kernswap import _kernels  # noqa: E402
from kernswap.backends import triton as tb  # noqa: E402
from kernswap.formats import quantize_int4, quantize_int8  # noqa: E402
from kernswap.reference import quantize_activations, reference_linear  # noqa: E402

KM = _kernels.load("quantized_linear")
if not KM.HAS_TRITON:
    pytest.skip(f"triton unusable: {KM.TRITON_IMPORT_ERROR}", allow_module_level=True)
if DEVICE == "cpu" and not type(KM.qlinear_kernel).__name__.startswith("Interpreted"):
    KM = importlib.reload(KM)  # loaded earlier without TRITON_INTERPRET: re-decorate the kernels

# (bits, group_size, symmetric: True, False (integer zero-points) or "float" (float zero-points))
FORMATS = [(8, None, True), (4, 32, True), (4, 32, False), (4, 64, True), (4, 64, False), (4, 128, True),
           (4, 128, False), (4, 32, "float"), (4, 128, "float")]
FMT_IDS = ["int8"] + [f"int4-g{g}-{'sym' if s is True else 'fzero' if s == 'float' else 'asym'}"
                      for _, g, s in FORMATS[1:]]
DTYPES = [torch.float32, torch.float16]


def _shapes(bits, g):
    """(M, N, K, bias): decode-size M with N tails, and M > 16 (large-tile config); K tails for int8."""
    if bits == 8:
        return [(1, 24, 131, True), (5, 40, 192, False), (20, 24, 70, True)]
    k2 = 192 if g < 128 else 256
    return [(1, 24, 128, True), (5, 40, k2, False), (20, 24, 128, True)]


def _make(bits, g, sym, dyn, n, k):
    w = torch.randn(n, k)
    if bits == 8:
        return quantize_int8(w, dynamic_activations=dyn).to(DEVICE)
    return quantize_int4(w, g, sym is True, dynamic_activations=dyn, float_zero=sym == "float").to(DEVICE)


def _w64(qw):
    q, scale, zero = qw.unpack()  # [N,K] int32, [N, K/G] fp32, [N, K/G] int32 (fp32: float zero-points)
    g = qw.group_size
    return (q.double() - zero.double().repeat_interleave(g, dim=1)) * scale.double().repeat_interleave(g, dim=1)


def _ref64_and_mag(x, qw, bias, dyn):
    w64 = _w64(qw)
    if dyn:
        a, a_scale, finite = quantize_activations(x)
        xin = a.double() * a_scale.double()[:, None]
    else:
        xin = x.double()
    ref = xin @ w64.t()
    mag = xin.abs() @ w64.abs().t()
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    return ref, mag


def _check(y, x, qw, bias, dyn):
    ref_same = reference_linear(x, qw, bias, dyn)
    ref64, mag = _ref64_and_mag(x, qw, bias, dyn)
    assert y.shape == ref_same.shape and y.dtype == x.dtype, (y.shape, y.dtype)
    tol = 2 * (ref_same.double() - ref64).abs() + qw.in_features * 2.0 ** -24 * mag + 1e-12
    err = (y.double() - ref64).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())}/{err.numel()} over tolerance, max err {err.max().item():.3e}, "
                           f"max excess {(err - tol).max().item():.3e}")


def test_available_under_interpreter():
    ok, reason = tb.available()
    assert ok, reason
    x = torch.zeros(2, 64, device=DEVICE)
    assert tb.supports(x, 8, 64, False) and tb.supports(x.half(), 4, 32, True)
    # the interpreter cannot emulate bf16 dots; natively bf16 is supported
    assert tb.supports(x.bfloat16(), 4, 32, False) == (DEVICE == "cuda")
    assert not tb.supports(x, 4, 16, False) and not tb.supports(x, 3, 32, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("dyn", [False, True], ids=["weight-only", "dynamic"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_quantized_linear_matches_reference(fmt, dyn, dtype):
    bits, g, sym = fmt
    for m, n, k, with_bias in _shapes(bits, g):
        qw = _make(bits, g, sym, dyn, n, k)
        x = torch.randn(m, k, device=DEVICE).to(dtype)
        bias = torch.randn(n, device=DEVICE) if with_bias else None
        y = tb.quantized_linear(x, qw.packed, qw.scale, qw.zero, bias, bits, qw.group_size, k, n, dyn)
        _check(y, x, qw, bias, dyn)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_quantize_rows_kernel_exact(dtype):
    """int8 activations and row scales equal the reference bit for bit (ties round half to even)."""
    k = 150
    x = torch.randn(6, k) * 3
    x[1] = 0.0                                                    # amax == 0 -> a = 0, scale 0
    x[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])  # inv == 1: exact ties
    x[2, 8:] = 0.25
    x[3, 5] = float("nan")
    x[4, 9] = float("-inf")
    x = x.to(DEVICE, dtype)
    a = torch.empty(6, k, dtype=torch.int8, device=DEVICE)
    s = torch.empty(6, dtype=torch.float32, device=DEVICE)
    KM.quantize_rows_kernel[(6,)](x, a, s, k, x.stride(0), a.stride(0), BLOCK=64)
    a_ref, s_ref, finite = quantize_activations(x)
    assert finite.tolist() == [True, True, True, False, False, True]
    assert torch.equal(a[finite].to(torch.float32), a_ref[finite])
    assert torch.equal(s[finite], s_ref[finite])
    assert torch.isnan(s[~finite]).all()


@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)], ids=["w8a8", "w4a8"])
def test_dynamic_nonfinite_rows_give_nan(bits, g):
    m, n, k = 4, 24, 64
    qw = _make(bits, g, True, True, n, k)
    x = torch.randn(m, k, device=DEVICE)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    y = tb.quantized_linear(x, qw.packed, qw.scale, qw.zero, torch.randn(n, device=DEVICE), bits, qw.group_size, k, n, True)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def test_degenerate_zero_weight_and_rows():
    """All-zero weight rows (scale 0), a zero activation row, M == 0."""
    n, k = 24, 64
    w = torch.randn(n, k)
    w[3] = 0.0
    for dyn in (False, True):
        qw = quantize_int8(w, dynamic_activations=dyn).to(DEVICE)
        x = torch.randn(3, k, device=DEVICE)
        x[1] = 0.0
        bias = torch.randn(n, device=DEVICE)
        y = tb.quantized_linear(x, qw.packed, qw.scale, qw.zero, bias, 8, qw.group_size, k, n, dyn)
        _check(y, x, qw, bias, dyn)
        assert torch.equal(y[:, 3], bias[3].expand(3))
        assert torch.allclose(y[1], bias)
        y0 = tb.quantized_linear(x[:0], qw.packed, qw.scale, qw.zero, None, 8, qw.group_size, k, n, dyn)
        assert y0.shape == (0, n)


def test_pick_config_tiles():
    for m in (1, 16, 17, 4096):
        for bits, g in ((8, 4096), (4, 32), (4, 64), (4, 128)):
            for fp32 in (False, True):
                c = KM.pick_config(m, bits, g, fp32)
                assert c.block_n % 16 == 0
                if bits == 4:
                    assert g % c.block_k == 0 and c.block_k >= 32
                assert (c.block_m == 16) == (m <= 16)
