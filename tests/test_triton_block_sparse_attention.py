"""Triton block-sparse attention (kernels/block_sparse_attention.py through backends/attention_triton.py).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors: tiny shapes, D=64, fp32 and fp16 (the
interpreter does not emulate bf16 dots), block sizes 16/32 (split configuration) and 64 (main configuration).
With a GPU the same cases run on CUDA tensors, plus bf16/fp16/fp32 at larger shapes and D=128/256.
Oracle: kernswap.reference in float64.  Tolerance (flash-attention's rule):
|ours - ref64| <= 2 * |ref_same_dtype - ref64| + floor, floor = 1e-5 (fp32) / 1e-3 (fp16, bf16) * max|v|,
where ref_same_dtype is the reference computed in the inputs' dtype; lse likewise (floor relative to max(1,|lse|)).
"""
import importlib
import os

import torch  # does not import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel module are imported

import pytest  # noqa: E402

pytest.importorskip("triton")

from kernswap import _kernels  # noqa: E402
from kernswap.backends import attention_triton as bt  # noqa: E402
from kernswap.reference.block_sparse_attention import block_sparse_attention_ref  # noqa: E402

from attention_nan import check_policy, poisoned_case  # noqa: E402

KM = _kernels.load("block_sparse_attention")
if not KM.HAS_TRITON:
    pytest.skip(f"triton unusable: {KM.TRITON_IMPORT_ERROR}", allow_module_level=True)
if DEVICE == "cpu" and not type(KM.bsa_fwd_kernel).__name__.startswith("Interpreted"):
    KM = importlib.reload(KM)  # loaded earlier without TRITON_INTERPRET: re-decorate the kernels

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 / large shapes)")
F32, F16 = torch.float32, torch.float16


def _inputs(b, hq, hkv, sq, sk, d, dtype, bs, density=0.6, mask_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    mb, mh = mask_shape or (b, hq)
    mask = torch.rand(mb, mh, nqb, nkb, generator=g) < density
    return (*(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v)), mask.to(DEVICE))


def _check(out, lse, q, k, v, mask, bs, causal, scale):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    o64, l64 = block_sparse_attention_ref(q, k, v, mask, bs, causal, scale, compute_dtype=torch.float64)
    osd, lsd = block_sparse_attention_ref(q, k, v, mask, bs, causal, scale, compute_dtype=q.dtype)
    rel = 1e-5 if q.dtype == torch.float32 else 1e-3
    o64, osd = o64.double(), osd.double()  # the oracle's out is rounded to q.dtype; compare in float64
    tol = 2 * (osd - o64).abs() + rel * v.double().abs().max()
    err = (out.double() - o64).abs()
    assert not (err > tol).any(), f"out: {int((err > tol).sum())}/{err.numel()} over; max err {err.max():.3e}"
    empty = torch.isneginf(l64)
    assert torch.equal(torch.isneginf(lse), empty), "rows without attended keys must get lse = -inf"
    assert torch.isfinite(lse[~empty]).all()
    assert (out[empty] == 0).all(), "rows without attended keys must be zero"
    fin = ~empty
    ltol = 2 * (lsd.double() - l64.double()).abs() + rel * l64.double().abs().clamp_min(1.0)
    lerr = (lse.double() - l64.double()).abs()
    assert not (lerr[fin] > ltol[fin]).any(), f"lse: max err {lerr[fin].max():.3e}"


def _run(b, hq, hkv, sq, sk, d, dtype, bs, causal, density=0.6, mask_shape=None, mask_fn=None, seed=0):
    q, k, v, mask = _inputs(b, hq, hkv, sq, sk, d, dtype, bs, density, mask_shape, seed)
    if mask_fn is not None:
        mask_fn(mask)
    assert bt.supports(q, k, v, mask, bs, causal)
    scale = d ** -0.5
    out, lse = bt.block_sparse_attention(q, k, v, mask, bs, causal, scale)
    _check(out, lse, q, k, v, mask, bs, causal, scale)
    return out, lse


# ---------------------------------------------------------------------------- interpreter-sized cases
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_odd_sizes_gqa(dtype, causal):
    # Sq < Sk with Sk - Sq not a multiple of the block size; GQA ratio 2; per-(b, h) masks
    _run(1, 4, 2, 29, 53, 64, dtype, 16, causal)


def test_noncausal_more_queries_than_keys():
    _run(1, 2, 1, 45, 30, 64, F32, 32, False)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_decode_single_query_gqa(dtype):
    # Sq = 1 against a long odd Sk: split-KV configuration with merged partials
    _run(2, 4, 2, 1, 75, 64, dtype, 16, True, density=0.7)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_forced_splits(splits):
    q, k, v, mask = _inputs(1, 2, 1, 5, 77, 64, F32, 16, density=0.8, seed=1)
    counts, n_full, idx = bt.compress_block_mask(mask, 16, 5, 77, True)
    out, lse = KM.launch_block_sparse_attention(q, k, v, counts, n_full, idx, 16, True, 0.125, num_splits=splits)
    _check(out, lse, q, k, v, mask, 16, True, 0.125)


def test_main_config_block64():
    # fp16, block_size 64 with Sq > 16: the main (64-row) configuration, odd sizes, Sk - Sq = 11
    assert not KM.pick_config("fp16", 64, 64, 70).split
    _run(1, 2, 1, 70, 81, 64, F16, 64, True, density=0.8)


def test_fp32_block64():
    _run(1, 2, 1, 37, 81, 64, F32, 64, True, density=0.8)


def test_main_config_block64_fp16_dense_mask():
    _run(1, 2, 2, 67, 67, 64, F16, 64, True, density=1.1)


def test_empty_rows_and_dense_mask():
    def fn(mask):
        mask[0, 0, 1, :] = False   # a whole query block with no kept key block
        mask[0, 1] = True          # a dense head
        mask[1, 0] = False         # an empty head

    _run(2, 2, 1, 40, 40, 64, F32, 16, True, mask_fn=fn)


def test_causal_kept_block_without_visible_key():
    # Sq < Sk: the first query block's rows see only keys <= i + 24; keep only the diagonal-crossing key block
    def fn(mask):
        mask.zero_()
        mask[..., 0, 2] = True     # keys 32..47: rows 0..7 (positions 24..31) see none of them
        mask[..., 1, 0] = True

    out, lse = _run(1, 1, 1, 24, 48, 64, F32, 16, True, mask_fn=fn)
    assert torch.isneginf(lse[0, 0, :8]).all() and torch.isfinite(lse[0, 0, 8:16]).all()


@pytest.mark.parametrize("mask_shape", [(1, 1), (1, 3), (2, 1)], ids=["b1h1", "b1hq", "bh1"])
def test_broadcast_masks(mask_shape):
    _run(2, 3, 3, 33, 33, 64, F32, 16, True, mask_shape=mask_shape)


def test_strided_inputs_bshd_layout():
    # q/k/v as (B, S, H, D) storage viewed as (B, H, S, D): only stride(-1) == 1
    b, hq, hkv, sq, sk, d, bs = 1, 2, 1, 21, 37, 64, 16
    q = torch.randn(b, sq, hq, d, device=DEVICE).transpose(1, 2)
    kv = torch.randn(b, sk, 2, hkv, d, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = torch.rand(b, hq, 2, 3, device=DEVICE) < 0.7
    out, lse = bt.block_sparse_attention(q, k, v, mask, bs, True, 0.1)
    _check(out, lse, q, k, v, mask, bs, True, 0.1)


def test_compress_block_mask_lists():
    bs, sq, sk = 16, 20, 70  # 2 query blocks, 5 key blocks, offset 50
    mask = torch.rand(2, 3, 2, 5, generator=torch.Generator().manual_seed(3)) < 0.6
    counts, n_full, idx = bt.compress_block_mask(mask, bs, sq, sk, True)
    assert counts.dtype == n_full.dtype == idx.dtype == torch.int32 and idx.shape == mask.shape
    for b in range(2):
        for h in range(3):
            for qb in range(2):
                last = min((qb + 1) * bs, sq) - 1 + sk - sq
                first = qb * bs + sk - sq
                want = [j for j in range(5) if mask[b, h, qb, j] and j * bs <= last]
                full = [j for j in want if j * bs + bs - 1 <= first and j * bs + bs <= sk]
                assert counts[b, h, qb] == len(want) and n_full[b, h, qb] == len(full)
                assert idx[b, h, qb, :len(want)].tolist() == want


def test_supports():
    q, k, v, mask = _inputs(1, 2, 1, 8, 8, 64, F32, 16)
    assert bt.supports(q, k, v, mask, 16, True)
    assert not bt.supports(q, k, v, mask, 24, True)  # not a multiple of 16
    q80 = torch.randn(1, 2, 8, 80, device=DEVICE)
    assert not bt.supports(q80, q80[:, :1], q80[:, :1], mask, 16, True)  # head dim 80
    if DEVICE == "cpu":
        qb = q.bfloat16()
        assert not bt.supports(qb, k.bfloat16(), v.bfloat16(), mask, 16, True)  # interpreter: no bf16 dots
    ok, reason = bt.available()
    assert ok, reason


def test_public_op_forced_triton_backend():
    from kernswap.ops import block_sparse_attention

    q, k, v, mask = _inputs(1, 2, 1, 19, 35, 64, F32, 16, seed=4)
    out, lse = block_sparse_attention(q, k, v, mask, block_size=16, causal=True, backend="triton", return_lse=True)
    _check(out, lse, q, k, v, mask, 16, True, 64 ** -0.5)


def test_aot_variants_cover_launches():
    consts = {(v.signature["q_ptr"], v.signature["o_ptr"], v.constexprs["HEAD_DIM"], v.constexprs["BLOCK_M"],
               v.constexprs["BLOCK_N"], v.num_warps, v.num_stages) for v in KM.aot_variants()}
    assert len(consts) == len(list(KM.aot_variants())) <= 32
    for dt in ("fp16", "bf16", "fp32"):
        for d in KM.HEAD_DIMS:
            for arch in (80, 86, 89, 90, 100):
                for bs in range(16, 257, 16):
                    for sq in (1, 16, 17, 4096):
                        c = KM.pick_config(dt, d, bs, sq, arch)
                        assert bs % c.block_m == 0 and bs % c.block_n == 0
                        o = "*fp32" if c.split else f"*{dt}"
                        assert (f"*{dt}", o, d, c.block_m, c.block_n, c.num_warps, c.num_stages) in consts


# ---------------------------------------------------------------------------- GPU-only cases
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("decode,bs", [(False, 16), (True, 16), (False, 64)], ids=["prefill", "decode", "main"])
def test_nan_policy(dtype, decode, bs):
    """A row whose q, or a visible key's k or v, is non-finite is NaN; keys a row cannot see never reach it
    (split and main configurations, masked and unmasked sub-tiles, merged splits)."""
    q, k, v, mask, bs = poisoned_case(dtype, decode, DEVICE, bs=bs)
    out, lse = bt.block_sparse_attention(q, k, v, mask, bs, True, q.shape[-1] ** -0.5)
    check_policy(out, lse, q, k, v, mask, bs)
    if decode:  # poisoned partials through the launcher's log-sum-exp merge
        counts, n_full, idx = bt.compress_block_mask(mask, bs, q.shape[2], k.shape[2], True)
        out, lse = KM.launch_block_sparse_attention(q, k, v, counts, n_full, idx, bs, True, q.shape[-1] ** -0.5,
                                                    num_splits=4)
        check_policy(out, lse, q, k, v, mask, bs)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_prefill(dtype, d):
    _run(2, 8, 2, 509, 777, d, dtype, 64, True, density=0.5)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bs", [128, 48])
def test_gpu_prefill_block_sizes(dtype, bs):
    _run(1, 4, 4, 333, 333, 128, dtype, bs, True, density=0.4)
    _run(1, 4, 1, 300, 200, 128, dtype, bs, False, density=0.4, mask_shape=(1, 1))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("sq", [1, 7])
def test_gpu_decode(dtype, d, sq):
    _run(2, 16, 4, sq, 4093, d, dtype, 64, True, density=0.3)
