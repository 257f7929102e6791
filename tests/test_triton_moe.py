"""Triton fused-MoE backend (kernswap.backends.moe_triton): block alignment and the grouped SwiGLU expert kernels.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors, tiny shapes, fp32 and fp16 (the interpreter
does not emulate bf16 dots); with one, natively, plus bf16 and larger shapes.
Oracle: the transformers 5.x experts computation (gate = rows [0, I) of w_gate_up, up = rows [I, 2I),
silu(gate) * up, down, times the routing weight, summed over slots) evaluated per pair in float64 (ref64) and in
the activation dtype (ref_same).  Tolerance: |ours - ref64| <= 2 * |ref_same - ref64| + 2 * bound, where bound is
the first-order rounding bound of our own evaluation order: fp32-accumulated dots (n * 2^-24 * magnitude),
the intermediate rounded to the activation dtype, the output rounded once.
"""
import os

import torch  # does not import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel module are imported

import importlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from kernswap import _kernels  # noqa: E402
from kernswap.backends import moe_triton as mt  # noqa: E402

KM = _kernels.load("fused_moe")
if not KM.HAS_TRITON:
    pytest.skip(f"triton unusable: {KM.TRITON_IMPORT_ERROR}", allow_module_level=True)
if DEVICE == "cpu" and not type(KM.moe_gate_up_kernel).__name__.startswith("Interpreted"):
    KM = importlib.reload(KM)  # loaded earlier without TRITON_INTERPRET: re-decorate the kernels

try:  # the MoE reference's alignment (kernswap.reference.moe), when present
    from kernswap.reference.moe import moe_align_ref
except ImportError:
    moe_align_ref = None

gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (native Triton, bf16, larger shapes)")
DTYPES = [torch.float32, torch.float16]
CONFIGS = {"decode": KM._CONFIGS[0], "mid": KM._CONFIGS[1], "prefill": KM._CONFIGS[2]}
U = 2.0 ** -24


def _cfg(name, dtype):
    row = CONFIGS[name]
    return row[2] if dtype == torch.float32 else row[1]


def _route(T, E, k, device=DEVICE):
    logits = torch.randn(T, E, device=device)
    w, ids = torch.topk(logits.softmax(-1), k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def _weights(E, H, I, dtype, device=DEVICE):
    wgu = (torch.randn(E, 2 * I, H, device=device) / H ** 0.5).to(dtype)
    wd = (torch.randn(E, H, I, device=device) / I ** 0.5).to(dtype)
    return wgu, wd


def _oracle(x, w, ids, wgu, wd):
    """(ref64, ref_same, bound) of out[t] = sum_slot w[t,slot] * down_e(silu(gate_e(x_t)) * up_e(x_t))."""
    T, H = x.shape
    E, two_i, _ = wgu.shape
    I = two_i // 2
    k = ids.shape[1]
    dt = x.dtype
    ok = (ids >= 0) & (ids < E)
    e = torch.where(ok, ids, 0).long().reshape(-1)
    wp = (w * ok).reshape(-1)                          # a slot without an expert weighs nothing
    xp = x.repeat_interleave(k, 0)                     # [P, H]
    # float64
    gu = torch.einsum("pnh,ph->pn", wgu[e].double(), xp.double())
    g, u = gu[:, :I], gu[:, I:]
    h = torch.nn.functional.silu(g) * u
    d = torch.einsum("pni,pi->pn", wd[e].double(), h)
    ref64 = (d * wp.double()[:, None]).reshape(T, k, H).sum(1)
    # activation dtype, transformers' order (linear, act * up, linear, weight, sum)
    gu_s = torch.einsum("pnh,ph->pn", wgu[e].float(), xp.float()).to(dt)
    h_s = (torch.nn.functional.silu(gu_s[:, :I].float()) * gu_s[:, I:].float()).to(dt)
    d_s = torch.einsum("pni,pi->pn", wd[e].float(), h_s.float()).to(dt)
    ref_same = (d_s.float() * wp[:, None]).reshape(T, k, H).sum(1).to(dt)
    # first-order bound of our order: fp32 dots, h rounded to dt, fp32 down + weight + combine, one final rounding
    eps = torch.finfo(dt).eps / 2
    gmag = torch.einsum("pnh,ph->pn", wgu[e].double().abs(), xp.double().abs())
    dg, du = H * U * gmag[:, :I], H * U * gmag[:, I:]
    sig = torch.sigmoid(g)
    dsilu = (sig * (1 + g * (1 - sig))).abs()
    dh = dsilu * u.abs() * dg + torch.nn.functional.silu(g).abs() * du + (eps + U) * h.abs()
    wabs = wd[e].double().abs()
    dd = torch.einsum("pni,pi->pn", wabs, dh) + (I + 2) * U * torch.einsum("pni,pi->pn", wabs, h.abs())
    bound = (dd * wp.double().abs()[:, None]).reshape(T, k, H).sum(1) + (k + 1) * U * ref64.abs()
    bound = bound + torch.finfo(dt).eps / 2 * ref64.abs() + 1e-30
    return ref64, ref_same, bound


def _check(out, x, w, ids, wgu, wd):
    ref64, ref_same, bound = _oracle(x, w, ids, wgu, wd)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    tol = 2 * (ref_same.double() - ref64).abs() + 2 * bound
    err = (out.double() - ref64).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())}/{err.numel()} over tolerance, max err {err.max().item():.3e}, "
                           f"max excess {(err - tol).max().item():.3e}")


# ------------------------------------------------------------------------------------------------ alignment
def _check_align(ids, E, bs, sorted_ids, offsets, exact=True):
    T, k = ids.shape
    P = T * k
    flat = ids.reshape(-1).tolist()
    s, off = sorted_ids.tolist(), offsets.tolist()
    assert sorted_ids.dtype == torch.int32 and offsets.dtype == torch.int32 and len(off) == E + 1
    assert off[0] == 0 and all(a <= b for a, b in zip(off, off[1:])) and off[E] <= len(s)
    if bs is None or exact:
        assert len(s) == (P if bs is None else off[E])
    else:
        assert len(s) == KM.max_padded_pairs(P, E, bs)
    step = bs or 1
    for e in range(E):
        want = [p for p in range(P) if flat[p] == e]     # stable: token order
        seg = s[off[e]:off[e + 1]]
        assert seg[:len(want)] == want, (e, seg, want)
        assert all(v == P for v in seg[len(want):])       # sentinel padding
        assert len(seg) == -(-len(want) // step) * step   # padded to a multiple of the block, no more
    assert all(v == P for v in s[off[E]:])


@pytest.mark.parametrize("bs", [None, 1, 4, 16])
def test_align_layout(bs):
    E = 5
    cases = [torch.randint(0, E, (9, 2)), torch.zeros(7, 3, dtype=torch.int64), torch.tensor([[4]]),
             torch.tensor([[3, 1], [1, 3], [3, 0]]), torch.empty(0, 2, dtype=torch.int64)]
    for ids in cases:
        ids = ids.to(DEVICE)
        sorted_ids, offsets = mt.align(ids, E, bs)
        _check_align(ids.cpu(), E, bs, sorted_ids.cpu(), offsets.cpu())
        if moe_align_ref is not None:  # the reference's layout, entry for entry
            s_ref, o_ref = moe_align_ref(ids, E, bs)
            assert torch.equal(sorted_ids, s_ref) and torch.equal(offsets, o_ref)
        sorted_ids, offsets = mt.align(ids, E, bs, exact_length=False)  # what fused_experts reads: no sync
        _check_align(ids.cpu(), E, bs, sorted_ids.cpu(), offsets.cpu(), exact=False)


def test_align_drops_ids_without_expert():
    ids = torch.tensor([[0, 5], [2, -1], [5, 0]], dtype=torch.int32, device=DEVICE)  # 5 / -1: no expert (E = 5)
    sorted_ids, offsets = mt.align(ids, 5, 4, exact_length=False)
    assert offsets.tolist() == [0, 4, 4, 8, 8, 8]
    assert sorted_ids.tolist()[:8] == [0, 5, 6, 6, 2, 6, 6, 6]
    assert len(sorted_ids) == KM.max_padded_pairs(6, 5, 4) and all(v == 6 for v in sorted_ids.tolist()[8:])
    assert mt.align(ids, 5, 4)[0].tolist() == [0, 5, 6, 6, 2, 6, 6, 6]


def test_available_and_supports():
    ok, reason = mt.available()
    assert ok, reason
    x = torch.zeros(3, 8, device=DEVICE)
    wgu, wd = _weights(2, 8, 4, torch.float32)

    def sup(h, a=wgu, b=wd):
        return mt.supports("fused_experts", hidden2d=h, topk_weights=None, topk_ids=None, w_gate_up=a, w_down=b)

    assert sup(x) and sup(x.half(), wgu.half(), wd.half())
    assert sup(x.bfloat16(), wgu.bfloat16(), wd.bfloat16()) == (DEVICE == "cuda")
    assert not sup(x.half())                              # weights in another dtype
    assert not sup(x.double(), wgu.double(), wd.double())
    assert not sup(x, object(), wd)                      # quantized experts are not covered
    ids = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    assert mt.supports("align", topk_ids=ids, num_experts=4, block_size=16)
    assert not mt.supports("align", topk_ids=ids.to(torch.int8), num_experts=4, block_size=16)
    assert not mt.supports("route", router_logits=x, top_k=1)


def test_pick_config_table():
    for fp32 in (False, True):
        assert KM.pick_config(1, 8, fp32).block_m == 16
        assert KM.pick_config(8 * 40, 8, fp32).block_m == 32
        assert KM.pick_config(4096 * 2, 8, fp32).block_m == 64
    # padding bound: reached by the worst routing (one pair in each of min(E, P) - 1 experts, the rest in one)
    for P, E, bm in ((1, 128, 16), (8, 128, 16), (300, 128, 32), (100, 3, 64)):
        n = min(E, P)
        ids = torch.tensor(list(range(n - 1)) + [n - 1] * (P - n + 1)).reshape(P, 1)
        worst = int(mt.align(ids, E, bm)[1][E])
        assert worst <= KM.max_padded_pairs(P, E, bm) <= worst + bm


def test_aot_variants_cover_every_launch():
    """Every (kernel, tiles, dtype) launch_fused_experts can pick is in aot_variants (compiled by
    tests/test_triton_aot_compile.py for sm_80 / sm_90)."""
    names = [v.name for v in KM.aot_variants()]
    assert len(names) == len(set(names)) and len(names) <= 24
    for dt in ("fp16", "bf16", "fp32"):
        assert f"moe_combine[{dt}]" in names
        for P, E in ((1, 8), (16, 1), (64, 2), (300, 8), (4096, 128), (32768, 8)):
            c = KM.pick_config(P, E, dt == "fp32")
            tiles = f"{c.block_m}x{c.block_n}x{c.block_k}"
            assert f"moe_gate_up[{dt},{tiles}]" in names and f"moe_down[{dt},{tiles}]" in names


# ------------------------------------------------------------------------------------------------ experts
# (T, E, top_k, H, I): one token; odd sizes; top_k == E; H, I not multiples of the tiles
SHAPES = [(1, 4, 2, 40, 24), (9, 4, 2, 33, 20), (5, 3, 3, 17, 48), (6, 4, 1, 48, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}E{e}k{k}H{h}I{i}" for t, e, k, h, i in SHAPES])
def test_fused_experts_matches_oracle(shape, dtype):
    T, E, k, H, I = shape
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w, ids = _route(T, E, k)
    wgu, wd = _weights(E, H, I, dtype)
    out = mt.fused_experts(x, w, ids, wgu, wd)
    _check(out, x, w, ids, wgu, wd)


@pytest.mark.parametrize("cfg", ["decode", "mid", "prefill"])
def test_every_tile_config(cfg):
    """Each row of the config table (different BLOCK_M = alignment block), fp16 activations."""
    T, E, k, H, I = 8, 3, 2, 36, 20
    dtype = torch.float16
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w, ids = _route(T, E, k)
    wgu, wd = _weights(E, H, I, dtype)
    out = mt.fused_experts(x, w, ids, wgu, wd, config=_cfg(cfg, dtype))
    _check(out, x, w, ids, wgu, wd)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_degenerate_routings(dtype):
    """All tokens to one expert (more pairs than one block), an expert with no token, a slot with no expert."""
    T, E, H, I = 9, 4, 24, 16
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    wgu, wd = _weights(E, H, I, dtype)
    w = torch.rand(T, 2, device=DEVICE) + 0.1
    # first slot: every token to expert 2; second slot: expert 0 or 1; expert 3 gets nothing
    all_one = torch.stack([torch.full((T,), 2), torch.randint(0, 2, (T,))], 1).to(torch.int32).to(DEVICE)
    out = mt.fused_experts(x, w, all_one, wgu, wd)
    _check(out, x, w, all_one, wgu, wd)
    # top-1, 20 tokens all to expert 1: two 16-row blocks of one expert, the second one partly padding
    x20 = torch.randn(20, H, device=DEVICE).to(dtype)
    one = torch.full((20, 1), 1, dtype=torch.int32, device=DEVICE)
    w20 = torch.rand(20, 1, device=DEVICE) + 0.5
    out = mt.fused_experts(x20, w20, one, wgu, wd, config=KM.MoEKernelConfig(16, 16, 16, 4, 1))
    _check(out, x20, w20, one, wgu, wd)
    masked = all_one.clone()
    masked[::3, 1] = E                                                      # "no expert" slots add nothing
    out = mt.fused_experts(x, w, masked, wgu, wd)
    _check(out, x, w, masked, wgu, wd)


def test_strided_and_empty_inputs():
    T, E, k, H, I = 4, 2, 2, 20, 12
    base = torch.randn(T, H + 3, device=DEVICE)
    x = base[:, 1:H + 1]                                                   # row stride H + 3
    w, ids = _route(T, E, k)
    wgu, wd = _weights(E, H, I, torch.float32)
    _check(mt.fused_experts(x, w, ids, wgu, wd), x.contiguous(), w, ids, wgu, wd)
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)               # last dim not unit-stride
    _check(mt.fused_experts(x, w, ids, wgu_t, wd), x.contiguous(), w, ids, wgu, wd)
    out = mt.fused_experts(x[:0], w[:0], ids[:0], wgu, wd)
    assert out.shape == (0, H)


# ------------------------------------------------------------------------------------------------ GPU only
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 8, 2, 1024, 704), (37, 128, 8, 256, 96), (300, 8, 2, 512, 352),
                                   (1029, 64, 6, 264, 136)], ids=["mixtral-decode", "qwen3-small", "prefill", "odd"])
def test_fused_experts_gpu(shape, dtype):
    T, E, k, H, I = shape
    x = torch.randn(T, H, device="cuda").to(dtype)
    w, ids = _route(T, E, k, "cuda")
    wgu, wd = _weights(E, H, I, dtype, "cuda")
    out = mt.fused_experts(x, w, ids, wgu, wd)
    _check(out, x, w, ids, wgu, wd)


@gpu_only
def test_fused_experts_gpu_stream_and_bf16_configs():
    T, E, k, H, I = 70, 8, 2, 128, 80
    dtype = torch.bfloat16
    x = torch.randn(T, H, device="cuda").to(dtype)
    w, ids = _route(T, E, k, "cuda")
    wgu, wd = _weights(E, H, I, dtype, "cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        outs = [mt.fused_experts(x, w, ids, wgu, wd, config=_cfg(c, dtype)) for c in CONFIGS]
    s.synchronize()
    for out in outs:
        _check(out, x, w, ids, wgu, wd)
