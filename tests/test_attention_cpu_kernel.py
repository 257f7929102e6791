"""The CPU block-sparse attention kernel (kernswap.backends.attention_cpu, called directly) against the dense fp64
masked oracle, with flash-attention's tolerance rule:
    |ours - ref_fp64| <= 2 * |ref_same_dtype - ref_fp64| + floor   (floor: 1e-5 fp32, 1e-3 bf16/fp16, x max|v|)
Odd Sq/Sk, decode (Sq << Sk), GQA 1/2/4, D 64/128/256, every dtype, several mask densities incl. empty rows and
a dense mask, strided q/k/v, broadcast masks, every ISA the compiled module supports."""
import math

import pytest
import torch

from conftest import HAVE_C, ISAS, NO_C_REASON, use_isa
from kernswap.backends import attention_cpu
from kernswap.reference.block_sparse_attention import block_sparse_attention_ref

pytestmark = pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _inputs(b, hq, hkv, sq, sk, d, dtype, layout="bhsd"):
    if layout == "bshd":  # strided views of (B, S, H, D) storage, as a model's projections give them
        q = torch.randn(b, sq, hq, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, s, d).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    return q, k, v


def _mask(shape, density):
    return torch.rand(shape) < density


def check(q, k, v, mask, bs, causal, scale=None, isa=None):
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    with use_isa(isa):
        out, lse = attention_cpu.block_sparse_attention(q, k, v, mask, bs, causal, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    same, same_lse = block_sparse_attention_ref(q, k, v, mask, bs, causal, scale, compute_dtype=q.dtype)
    r64, l64 = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, bs, causal, scale,
                                          compute_dtype=torch.float64)
    l64 = l64.double()
    floor = FLOOR[q.dtype] * max(1.0, v.abs().max().item())
    tol = 2 * (same.double() - r64).abs() + floor
    err = (out.double() - r64).abs()
    assert not (err > tol).any(), (f"out: {int((err > tol).sum())}/{err.numel()} over tolerance, max err "
                                   f"{err.max().item():.3e}, max excess {(err - tol).max().item():.3e}")
    # rows with no attended key: exact zeros and -inf
    empty = torch.isneginf(l64)
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.all(out[empty] == 0)
    fin = ~empty
    if fin.any():
        lse_tol = 2 * (same_lse.double() - l64).abs() + 1e-5 * (1 + l64.abs())
        lerr = (lse.double() - l64).abs()
        assert not (lerr[fin] > lse_tol[fin]).any(), f"lse: max err {lerr[fin].max().item():.3e}"
    return out, lse


# (B, Hq, Hkv, Sq, Sk, D, block_size, causal): odd sizes, Sq < Sk, GQA 1/2/4, query blocks straddling the diagonal
SHAPES = [
    (1, 2, 2, 100, 100, 64, 16, True),
    (2, 4, 2, 77, 131, 128, 32, True),
    (1, 4, 1, 45, 200, 64, 64, True),
    (1, 2, 1, 130, 70, 256, 32, False),
    (2, 4, 4, 33, 33, 128, 16, False),
    (1, 8, 2, 70, 97, 64, 48, True),
    (1, 8, 1, 200, 260, 128, 128, True),  # GQA 8 with large blocks: a query block's heads split over tasks
    (1, 2, 1, 300, 300, 256, 256, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + ("c" if s[7] else "n"))
def test_prefill_shapes(shape, dtype):
    b, hq, hkv, sq, sk, d, bs, causal = shape
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, dtype)
    mask = _mask((b, hq, -(-sq // bs), -(-sk // bs)), 0.6)
    check(q, k, v, mask, bs, causal)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    """Prefill, decode (GQA heads sharing lanes, key blocks split and merged) and bf16/fp16 on each ISA."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = _inputs(1, 4, 2, 70, 150, 64, dtype, layout="bshd")
        check(q, k, v, _mask((1, 4, 3, 5), 0.7), 32, True, isa=isa)
        q, k, v = _inputs(2, 4, 1, 1, 700, 128, dtype)
        check(q, k, v, _mask((2, 4, 1, 44), 0.5), 16, True, isa=isa)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_densities(density):
    b, hq, hkv, sq, sk, d, bs = 1, 4, 2, 150, 150, 64, 32
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, torch.float32)
    mask = _mask((b, hq, 5, 5), density)
    out, lse = check(q, k, v, mask, bs, True)
    if density == 0.0:
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_empty_query_blocks_and_future_only_blocks():
    """Query blocks whose kept blocks all lie in the future (causal) or that keep nothing give zero rows."""
    q, k, v = _inputs(1, 2, 1, 96, 96, 64, torch.float32)
    mask = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    mask[0, 0, 0, 2] = True  # only future keys for query block 0
    mask[0, 0, 1, :2] = True
    mask[0, 1, 2, 2] = True  # diagonal only
    out, lse = check(q, k, v, mask, 32, True)
    assert torch.all(out[0, 0, :32] == 0) and torch.all(torch.isneginf(lse[0, 0, :32]))
    assert torch.all(out[0, 1, :64] == 0)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("mask_shape", ["full", "batch", "head", "shared"])
def test_strides_and_broadcast_masks(layout, mask_shape):
    b, hq, hkv, sq, sk, d, bs = 2, 4, 2, 50, 90, 128, 16
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, torch.bfloat16, layout=layout)
    mb, mh = {"full": (b, hq), "batch": (b, 1), "head": (1, hq), "shared": (1, 1)}[mask_shape]
    mask = _mask((mb, mh, 4, 6), 0.5)
    check(q, k, v, mask, bs, True)
    # an expanded (stride-0) view gives the same result as the materialised mask
    out1, _ = attention_cpu.block_sparse_attention(q, k, v, mask.expand(b, hq, 4, 6), bs, True, d ** -0.5)
    out2, _ = attention_cpu.block_sparse_attention(q, k, v, mask, bs, True, d ** -0.5)
    assert torch.equal(out1, out2)


@pytest.mark.parametrize("sq", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 4])
def test_decode(sq, group):
    """Few query rows against a long cache: GQA heads share the vector lanes, key blocks are split across
    threads and merged with the log-sum-exp rule."""
    hkv, sk, bs = 2, 2000, 32
    q, k, v = _inputs(1, hkv * group, hkv, sq, sk, 64, torch.float32)
    mask = _mask((1, hkv * group, 1, -(-sk // bs)), 0.2)
    check(q, k, v, mask, bs, True)
    check(q, k, v, mask[:, :1], bs, False)


def test_dense_mask_matches_sdpa():
    """A fully kept causal mask is plain causal attention (torch SDPA, queries aligned to the end)."""
    q, k, v = _inputs(1, 4, 2, 129, 129, 64, torch.float32)
    out, _ = check(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), 64, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_scale_and_zero_sizes():
    q, k, v = _inputs(1, 2, 1, 40, 60, 64, torch.float32)
    check(q, k, v, _mask((1, 2, 3, 4), 0.7), 16, True, scale=0.37)
    for shape_q, shape_k in (((0, 2, 5, 64), (0, 1, 5, 64)), ((1, 2, 0, 64), (1, 1, 5, 64))):
        out, lse = attention_cpu.block_sparse_attention(torch.randn(shape_q), torch.randn(shape_k),
                                                        torch.randn(shape_k), torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                                        16, False, 0.125)
        assert out.shape == shape_q and lse.shape == shape_q[:3]
    out, lse = attention_cpu.block_sparse_attention(torch.randn(1, 2, 3, 64), torch.randn(1, 1, 0, 64),
                                                    torch.randn(1, 1, 0, 64), torch.ones(1, 1, 1, 0, dtype=torch.bool),
                                                    16, False, 0.125)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_supports_and_available():
    ok, reason = attention_cpu.available()
    assert ok, reason
    q, k, v = _inputs(1, 2, 1, 8, 8, 64, torch.float32)
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert attention_cpu.supports(q, k, v, m, 64, True)
    assert not attention_cpu.supports(q.double(), k.double(), v.double(), m, 64, True)
    q96 = torch.randn(1, 2, 8, 96)
    assert not attention_cpu.supports(q96, q96[:, :1], q96[:, :1], m, 64, True)
    assert not attention_cpu.supports(q, k, v, m, 24, True)
    assert math.isfinite(attention_cpu.block_sparse_attention(q, k, v, m, 64, True, 0.125)[1].sum().item())
