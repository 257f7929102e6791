"""moe_experts and moe_combine: against the pure-PyTorch reference (float weights in fp32/bf16/fp16, odd sizes;
quantized experts against the reference of the same format, tight, and against float weights, SQNR),
block-padded alignments, opcheck, bad inputs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import FORMATS, HAVE_C, NO_C_REASON, assert_raises, sqnr_db
from kernswap.formats.experts import QuantizedExperts, quantize_experts
from kernswap.ops import moe_align, moe_combine, moe_experts
from kernswap.reference.moe import moe_align_ref, moe_combine_ref, moe_experts_ref

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON))]


@pytest.fixture
def two_threads():
    """At least two threads, so the cases sized for it run the cpu backend's threaded task scheduler."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(n, 2))
    yield
    torch.set_num_threads(n)


def _ids(t, e, k):
    return torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)


def _weights(e, h, i, dtype=torch.float32):
    return (torch.randn(e, 2 * i, h) / h ** 0.5).to(dtype), (torch.randn(e, h, i) / i ** 0.5).to(dtype)


def _pairs64(x, ids, wgu, wd):
    """fp64 oracle: pair_out[t * k + s] for every pair."""
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    xs = x.double().repeat_interleave(k, 0)
    gu = torch.einsum("pnh,ph->pn", wgu.double()[flat], xs)
    i = gu.shape[1] // 2
    return torch.einsum("phi,pi->ph", wd.double()[flat], F.silu(gu[:, :i]) * gu[:, i:])


def _maxerr(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# rows per expert cover the cpu backend's three product paths: <= 4 (dot products), 5..64 (weight-stationary),
# > 64 (packed GEMM); (70, 5, 4): about 56 per expert, so some experts on either side of 64
# (200, 6, 2, 128, 96) has enough work (> 2M multiply-adds) for the cpu backend to use its threads
# top-2 of 2 experts: every expert gets exactly t rows (9, 24, 30, 37: the vector tails of the AVX2 column slices)
@pytest.mark.parametrize("t,e,k,h,i", [(1, 8, 2, 64, 48), (29, 6, 2, 72, 40), (13, 5, 5, 33, 17),
                                       (7, 128, 8, 64, 24), (70, 5, 4, 33, 20), (150, 3, 2, 40, 36),
                                       (200, 6, 2, 128, 96), (9, 2, 2, 40, 36), (24, 2, 2, 40, 20),
                                       (30, 2, 2, 36, 28), (37, 2, 2, 33, 44)])
def test_experts_and_combine_float(backend, dtype, t, e, k, h, i, two_threads):
    x = torch.randn(t, h).to(dtype)
    wgu, wd = _weights(e, h, i, dtype)
    ids = _ids(t, e, k)
    w = torch.softmax(torch.randn(t, k), -1)
    s, o = moe_align(ids, e)
    pair = moe_experts(x, s, o, wgu, wd, k, backend=backend)
    assert pair.dtype == dtype and tuple(pair.shape) == (t * k, h)
    ref = moe_experts_ref(x, s, o, wgu, wd, k)  # fp32 arithmetic, rounded to dtype
    exact = _pairs64(x, ids, wgu, wd)
    # flash-attention's rule: our error vs fp64 at most twice the same-dtype reference's (plus fp32 noise)
    assert _maxerr(pair, exact) <= 2 * _maxerr(ref, exact) + 1e-6 * exact.abs().max().item()
    out = moe_combine(pair, w, backend=backend)
    out_ref = moe_combine_ref(ref, w)
    exact_out = (exact.view(t, k, h) * w.double()[..., None]).sum(1)
    assert out.dtype == dtype
    assert _maxerr(out, exact_out) <= 2 * _maxerr(out_ref, exact_out) + 1e-6 * exact_out.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_float_saturating_gate(backend):
    """Gate values far into both tails of silu (|g| up to ~300): the vectorised exp overflows to inf / underflows
    to 0 exactly like the reference (silu(g) -> 0 or g), odd intermediate size for the SwiGLU vector tail."""
    t, e, k, h, i = 12, 3, 2, 32, 21
    x = torch.randn(t, h) * 40
    wgu, wd = _weights(e, h, i)
    ids = _ids(t, e, k)
    s, o = moe_align(ids, e)
    pair = moe_experts(x, s, o, wgu, wd, k, backend=backend)
    ref = moe_experts_ref(x, s, o, wgu, wd, k)
    exact = _pairs64(x, ids, wgu, wd)
    assert torch.isfinite(pair).all()
    assert _maxerr(pair, exact) <= 2 * _maxerr(ref, exact) + 1e-6 * exact.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4-g32", "int4-g64-asym", "w4a8-g32-asym"])
@pytest.mark.parametrize("t", [23, 97], ids=["one-thread", "threaded"])  # 97 tokens: > 2M multiply-adds
def test_experts_quantized(backend, fmt, t, two_threads):
    e, k, h, i = 6, 2, 128, 64
    cfg = FORMATS[fmt]
    x = torch.randn(t, h)
    wgu, wd = _weights(e, h, i)
    cfg_d = cfg if cfg.weight_bits == 8 or i % cfg.group_size == 0 else dataclasses.replace(cfg, group_size=32)
    qgu, qd = quantize_experts(wgu, cfg), quantize_experts(wd, cfg_d)
    ids = _ids(t, e, k)
    s, o = moe_align(ids, e)
    pair = moe_experts(x, s, o, qgu, qd, k, backend=backend)
    ref = moe_experts_ref(x, s, o, qgu, qd, k)
    scale = ref.abs().max().item()
    if cfg.dynamic_activations:  # one int8 step of a requantized activation may differ (fp32 SwiGLU rounding)
        assert (pair - ref).norm() <= 1e-3 * ref.norm() and _maxerr(pair, ref) <= 2e-2 * scale
    else:
        assert _maxerr(pair, ref) <= 1e-5 * scale
    db = sqnr_db(_pairs64(x, ids, wgu, wd), pair)
    assert db >= (30 if cfg.weight_bits == 8 else 12), f"{fmt}: SQNR {db:.1f} dB vs float"


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_block_padded_alignment(backend):
    t, e, k, h, i = 9, 5, 2, 40, 24
    x, (wgu, wd), ids = torch.randn(t, h), _weights(e, h, i), _ids(t, e, k)
    s, o = moe_align_ref(ids, e, block_size=4)
    pair = moe_experts(x, s, o, wgu, wd, k, backend=backend)
    s2, o2 = moe_align_ref(ids, e)
    torch.testing.assert_close(pair, moe_experts_ref(x, s2, o2, wgu, wd, k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_opcheck(backend):
    t, e, k, h, i = 5, 4, 2, 32, 16
    x, (wgu, wd), ids = torch.randn(t, h), _weights(e, h, i), _ids(t, e, k)
    s, o = moe_align(ids, e)
    none = (None, None, None, None, 0, 0, 0, True, False)
    torch.library.opcheck(torch.ops.kernswap.moe_experts.default, (x, s, o, wgu, wd, *none, k, backend))
    q, qd = quantize_experts(wgu, "int8"), quantize_experts(wd, "int8")
    args = (x, s, o, q.packed, qd.packed, q.scale, None, qd.scale, None, 8, h, i, True, False, k, backend)
    torch.library.opcheck(torch.ops.kernswap.moe_experts.default, args)
    torch.library.opcheck(torch.ops.kernswap.moe_combine.default, (torch.randn(t * k, h), torch.rand(t, k), backend))


def test_quantized_experts_container():
    wgu, _ = _weights(3, 128, 32)
    q = quantize_experts(wgu, "int4")
    assert q.num_experts == 3 and q.format_name == "int4-g128" and tuple(q.packed.shape[:1]) == (3,)
    torch.testing.assert_close(q.dequantize()[1], q.expert(1).dequantize())
    assert q.nbytes() < wgu.numel() * 4 / 6
    assert_raises(lambda: dataclasses.replace(q, scale=q.scale[:2]), ValueError, "QuantizedExperts.scale must be")
    assert_raises(lambda: quantize_experts(wgu[0], "int8"), ValueError, "3-D")


def test_experts_bad_inputs():
    t, e, k, h, i = 4, 3, 2, 16, 8
    x, (wgu, wd), ids = torch.randn(t, h), _weights(e, h, i), _ids(t, e, k)
    s, o = moe_align(ids, e)
    cases = [
        (lambda: moe_experts(x, s, o, wgu, wd[:, :, :5], k), ValueError,
         "w_down must be [num_experts=3, hidden_size=16, intermediate_size=8], got [3, 16, 5]"),
        (lambda: moe_experts(x, s, o, wgu[:, :, :10], wd, k), ValueError, "hidden_size=16], got [3, 16, 10]"),
        (lambda: moe_experts(x, s, o, wgu, wd.double(), k), TypeError, "w_down.dtype must be one of"),
        (lambda: moe_experts(x, s, o, wgu, wd.half(), k), TypeError, "w_down.dtype must equal"),
        (lambda: moe_experts(x, s, o[:-1], wgu, wd, k), ValueError, "expert_offsets must have shape [num_experts + 1"),
        (lambda: moe_experts(x, s + 100, o, wgu, wd, k), ValueError, "sorted_pair_ids must be in [0, num_tokens"),
        (lambda: moe_experts(x, s, o.flip(0), wgu, wd, k), ValueError, "expert_offsets must start at 0"),
        (lambda: moe_experts(x.int(), s, o, wgu, wd, k), TypeError, "hidden.dtype"),
        (lambda: moe_experts(x, s.float(), o, wgu, wd, k), TypeError, "sorted_pair_ids.dtype"),
        (lambda: moe_experts(x, s, o, quantize_experts(wgu, "int8"), wd, k), TypeError,
         "w_down must be a kernswap.formats.QuantizedExperts"),
        (lambda: moe_experts(x, s, o, quantize_experts(wgu, "int8"), quantize_experts(wd, "w8a8"), k), ValueError,
         "must share one format"),
        (lambda: moe_combine(torch.randn(7, h), torch.rand(t, k)), ValueError, "must have num_tokens * top_k"),
        (lambda: moe_combine(torch.randn(8, h), torch.rand(t, k).long()), TypeError, "topk_weights.dtype"),
    ]
    for call, exc, msg in cases:
        assert_raises(call, exc, msg)
    assert isinstance(quantize_experts(wgu, "int8"), QuantizedExperts)
