import pytest
import torch

from kernswap import formats
from kernswap.formats import (QuantizedWeight, pack_int4, pack_int8, padded_n, quantize, quantize_int4,
                              quantize_int8, unpack_int4, unpack_int8)

SHAPES = [(1, 128), (8, 32), (17, 96), (72, 384), (1000, 128)]


def _loop_pack_int8(q):
    """Byte-by-byte packer written from the SPEC text (test oracle for the vectorised one)."""
    n, k = q.shape
    np_, kp = padded_n(n), (k + 3) // 4 * 4
    out = torch.zeros(np_ // 16, kp * 16, dtype=torch.int8)
    for t in range(np_ // 16):
        for kq in range(kp // 4):
            for nn in range(16):
                for kk in range(4):
                    r, c = t * 16 + nn, kq * 4 + kk
                    if r < n and c < k:
                        out[t, (kq * 16 + nn) * 4 + kk] = int(q[r, c])
    return out


def _loop_pack_int4(q):
    n, k = q.shape
    np_ = padded_n(n)
    out = torch.zeros(np_ // 16, k * 8, dtype=torch.uint8)
    for t in range(np_ // 16):
        for ko in range(k // 8):
            for nn in range(16):
                r = t * 16 + nn
                if r >= n:
                    continue
                for j in range(4):
                    out[t, (ko * 16 + nn) * 4 + j] = int(q[r, ko * 8 + j]) | (int(q[r, ko * 8 + 4 + j]) << 4)
    return out


@pytest.mark.parametrize("n,k", [(3, 5), (17, 8), (16, 12)])
def test_int8_layout_byte_exact(n, k):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int32)
    assert torch.equal(pack_int8(q), _loop_pack_int8(q))


@pytest.mark.parametrize("n,k", [(3, 8), (17, 16), (16, 32)])
def test_int4_layout_byte_exact(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    assert torch.equal(pack_int4(q), _loop_pack_int4(q))


@pytest.mark.parametrize("n,k", SHAPES + [(5, 7), (33, 130)])
def test_int8_roundtrip(n, k):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int32)
    p = pack_int8(q)
    assert p.dtype == torch.int8 and tuple(p.shape) == (padded_n(n) // 16, (k + 3) // 4 * 4 * 16)
    assert torch.equal(unpack_int8(p, n, k), q)


@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_roundtrip(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (padded_n(n) // 16, k * 8)
    assert torch.equal(unpack_int4(p, n, k), q)


def _check_padding(qw):
    n = qw.out_features
    rows = qw.packed.shape[0] * 16
    if rows > n:  # padding rows live in the last tile row: every byte whose nn >= n % 16 is zero
        last = qw.packed[-1].view(-1, 16, 4) if qw.bits == 4 else qw.packed[-1].view(-1, 16, 4)
        assert (last[:, n % 16:, :] == 0).all()
    assert (qw.scale[:, n:] == 0).all()
    if qw.zero is not None:
        assert (qw.zero[:, n:] == 0).all()


@pytest.mark.parametrize("n,k", [(17, 100), (72, 384), (1000, 128)])
def test_quantize_int8_error_bound(n, k):
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    w[1] = 0  # an all-zero row: scale 0, q 0
    qw = quantize_int8(w)
    q, scale, zero = qw.unpack()
    assert q.abs().max() <= 127 and scale.shape == (n, 1) and (zero == 0).all()
    assert scale[1, 0] == 0 and (q[1] == 0).all()
    torch.testing.assert_close(scale[:, 0], w.abs().amax(1) / 127, rtol=0, atol=0)
    err = (qw.dequantize() - w).abs()
    assert (err <= scale * 0.5 * (1 + 1e-5) + 1e-12).all()
    _check_padding(qw)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n,k", [(17, 384), (72, 128)])
def test_quantize_int4_error_bound(n, k, g, sym):
    w = torch.randn(n, k)
    w[2, :g] = 0  # an all-zero group
    w[3] = w[3].abs() + 0.1  # an all-positive row (asym: zero point 0)
    qw = quantize_int4(w, g, sym)
    q, scale, zero = qw.unpack()
    assert q.min() >= 0 and q.max() <= 15 and scale.shape == (n, k // g) == zero.shape
    assert scale[2, 0] == 0
    if sym:
        assert qw.zero is None and (zero == 8).all()
    else:
        assert qw.zero.dtype == torch.uint8 and zero.max() <= 15 and (zero[3] == 0).all()
    bound = scale.repeat_interleave(g, dim=1) * 0.5 * (1 + 1e-5) + 1e-12
    assert ((qw.dequantize() - w).abs() <= bound).all()
    _check_padding(qw)


def test_quantize_accepts_half_dtypes_and_config():
    w = torch.randn(24, 256)
    for dt in (torch.bfloat16, torch.float16):
        a = quantize(w.to(dt), "int4")
        b = quantize_int4(w.to(dt).float(), 128, True, method="mse")  # "int4": error-minimising scales
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
    qw = quantize(w, "w8a8")
    assert qw.bits == 8 and qw.dynamic_activations and qw.group_size == 256 and qw.format_name == "w8a8"
    assert formats.layout(4, 64, False, 24, 256)["zero"] == ((4, 32), torch.uint8)
    assert qw.nbytes() == qw.packed.numel() + qw.scale.numel() * 4


@pytest.mark.parametrize("call,exc,substr", [
    (lambda: quantize_int4(torch.randn(8, 100), 32), ValueError, "in_features must be divisible by group_size=32, got 100"),
    (lambda: quantize_int4(torch.randn(8, 128), 48), ValueError, "group_size must be one of [32, 64, 128], got 48"),
    (lambda: quantize_int8(torch.randn(8)), ValueError, "non-empty 2-D"),
    (lambda: quantize_int8(torch.ones(4, 4, dtype=torch.int32)), TypeError, "must be floating point"),
    (lambda: quantize_int8([[1.0]]), TypeError, "w must be a torch.Tensor, got list"),
])
def test_quantize_bad_inputs(call, exc, substr):
    with pytest.raises(exc) as ei:
        call()
    assert substr in str(ei.value)


def test_quantized_weight_validation():
    qw = quantize_int4(torch.randn(20, 64), 32, False)
    with pytest.raises(ValueError, match=r"QuantizedWeight.scale must be torch.float32 of shape \[2, 32\]"):
        QuantizedWeight(qw.packed, qw.scale[:, :16], qw.zero, 4, 32, False, 64, 20)
    with pytest.raises(ValueError, match="QuantizedWeight.zero must be None"):
        QuantizedWeight(qw.packed, qw.scale, qw.zero, 4, 32, True, 64, 20)
    with pytest.raises(ValueError, match="int8 needs group_size == in_features=64"):
        QuantizedWeight(qw.packed, qw.scale, None, 8, 32, True, 64, 20)
    moved = qw.to("cpu")
    assert torch.equal(moved.packed, qw.packed) and moved.device.type == "cpu"
