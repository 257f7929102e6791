"""CUDA backends (kernswap._C_cuda small-M GEMV and native Triton) against the reference, bf16 / fp16.

Skipped without a CUDA device.  The _C_cuda cases are skipped when the module was not built; the Triton
cases when triton is missing or the session runs Triton in interpreter mode.
Tolerance: |ours - ref_fp64| <= 2 * |ref_same_dtype - ref_fp64| + K * 2^-24 * (|x| @ |W|^T + |b|).
"""
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


from kernswap.backends import cuda as cb  # noqa: E402
from kernswap.backends import triton as tb  # noqa: E402
from kernswap.formats import quantize_int4, quantize_int8  # noqa: E402
from kernswap.reference import quantize_activations, reference_linear  # noqa: E402

FORMATS = [(8, None, True), (4, 32, True), (4, 64, False), (4, 128, True), (4, 128, False)]
FMT_IDS = ["int8", "int4-g32-sym", "int4-g64-asym", "int4-g128-sym", "int4-g128-asym"]
DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]
# (M, N, K): decode sizes incl. every M tile (1, 2, 4, 8, 16), N tails, int8 K tails; one larger layer
SHAPES = [(1, 24, 256), (2, 40, 384), (3, 72, 128), (5, 16, 512), (8, 200, 1024), (16, 4096, 4096)]


def _backend_or_skip(mod, name):
    ok, reason = mod.available()
    if not ok:
        pytest.skip(f"{name} backend unavailable: {reason}")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this session")


def _make(bits, g, sym, dyn, n, k):
    w = torch.randn(n, k, device="cuda") * 0.05
    qw = quantize_int8(w, dynamic_activations=dyn) if bits == 8 else quantize_int4(w, g, sym, dynamic_activations=dyn)
    return qw


def _k_for(bits, g, k):
    if bits == 8:  # some K % 4 != 0: Kp padding and the scalar activation-load path
        return k + (3 if k % 256 else 0)
    return max(g, k // g * g)


def _check(y, x, qw, bias, dyn):
    ref_same = reference_linear(x, qw, bias, dyn)
    q, scale, zero = qw.unpack()
    g = qw.group_size
    w64 = (q - zero.repeat_interleave(g, dim=1)).double() * scale.double().repeat_interleave(g, dim=1)
    if dyn:
        a, a_scale, _ = quantize_activations(x)
        xin = a.double() * a_scale.double()[:, None]
    else:
        xin = x.double()
    ref64, mag = xin @ w64.t(), xin.abs() @ w64.abs().t()
    if bias is not None:
        ref64, mag = ref64 + bias.double(), mag + bias.double().abs()
    assert y.shape == ref_same.shape and y.dtype == x.dtype and y.device == x.device
    tol = 2 * (ref_same.double() - ref64).abs() + qw.in_features * 2.0 ** -24 * mag + 1e-12
    err = (y.double() - ref64).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())}/{err.numel()} over tolerance, max err {err.max().item():.3e}, "
                           f"max excess {(err - tol).max().item():.3e}")


def test_availability_reasons():
    for mod in (cb, tb):
        ok, reason = mod.available()
        assert isinstance(ok, bool) and isinstance(reason, str) and (ok or reason)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_cuda_gemv_matches_reference(shape, fmt, dtype):
    _backend_or_skip(cb, "cuda")
    bits, g, sym = fmt
    m, n, k = shape
    k = _k_for(bits, g, k)
    qw = _make(bits, g, sym, False, n, k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    assert cb.supports(x, bits, qw.group_size, False)
    for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
        y = cb.quantized_linear(x, qw.packed, qw.scale, qw.zero, bias, bits, qw.group_size, k, n, False)
        torch.cuda.synchronize()
        _check(y, x, qw, bias, False)


def test_cuda_supports_and_strided_input():
    _backend_or_skip(cb, "cuda")
    x = torch.randn(17, 256, device="cuda", dtype=torch.float16)
    assert not cb.supports(x, 8, 256, False)              # M > 16
    assert not cb.supports(x[:4], 8, 256, True)           # dynamic activations
    assert not cb.supports(x[:4].float(), 8, 256, False)  # fp32
    assert cb.supports(x[:4], 4, 128, False)
    # odd row stride and an unaligned start: scalar activation loads
    qw = _make(8, None, True, False, 40, 255)
    base = torch.randn(3, 257, device="cuda", dtype=torch.bfloat16)
    xs = base[:, 1:256]
    y = cb.quantized_linear(xs, qw.packed, qw.scale, None, None, 8, 255, 255, 40, False)
    _check(y, xs.contiguous(), qw, None, False)


def test_cuda_current_stream_is_used():
    _backend_or_skip(cb, "cuda")
    qw = _make(4, 128, True, False, 512, 1024)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = cb.quantized_linear(x, qw.packed, qw.scale, None, None, 4, 128, 1024, 512, False)
    s.synchronize()
    _check(y, x, qw, None, False)


@pytest.mark.parametrize("dyn", [False, True], ids=["weight-only", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_triton_native_matches_reference(fmt, dtype, dyn):
    _backend_or_skip(tb, "triton")
    bits, g, sym = fmt
    for m, n, k in [(1, 40, 256), (16, 200, 512), (17, 72, 384), (300, 520, 1024)]:
        k = _k_for(bits, g, k)
        qw = _make(bits, g, sym, dyn, n, k)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        y = tb.quantized_linear(x, qw.packed, qw.scale, qw.zero, bias, bits, qw.group_size, k, n, dyn)
        _check(y, x, qw, bias, dyn)


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_cuda_and_triton_agree(fmt):
    _backend_or_skip(cb, "cuda")
    _backend_or_skip(tb, "triton")
    bits, g, sym = fmt
    k = _k_for(bits, g, 2048)
    qw = _make(bits, g, sym, False, 1000, k)
    x = torch.randn(7, k, device="cuda", dtype=torch.float16)
    yc = cb.quantized_linear(x, qw.packed, qw.scale, qw.zero, None, bits, qw.group_size, k, 1000, False)
    yt = tb.quantized_linear(x, qw.packed, qw.scale, qw.zero, None, bits, qw.group_size, k, 1000, False)
    _check(yc, x, qw, None, False)
    _check(yt, x, qw, None, False)
