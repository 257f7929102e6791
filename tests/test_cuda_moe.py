"""CUDA MoE alignment kernel (kernswap._C_cuda.moe_align via kernswap.backends.moe_cuda) against the torch
alignment of the Triton backend (same layout, bit for bit) and the layout invariants; then the Triton expert
kernels fed with the CUDA alignment.

Skipped without a CUDA device, or when kernswap._C_cuda was built without moe_align.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from kernswap.backends import moe_cuda as mc  # noqa: E402
from kernswap.backends import moe_triton as mt  # noqa: E402


def _cuda_or_skip():
    ok, reason = mc.available()
    if not ok:
        pytest.skip(f"cuda moe backend unavailable: {reason}")


def _check_layout(ids, E, bs, sorted_ids, offsets):
    """Stable per-expert segments in token order, sentinel padding to a multiple of bs, sentinel tail."""
    P = ids.numel()
    flat = ids.reshape(-1).long().cpu()
    s, off = sorted_ids.cpu().long(), offsets.cpu().long()
    step = bs or 1
    assert off[0] == 0 and bool((off[1:] >= off[:-1]).all()) and int(off[E]) <= s.numel()
    for e in range(E):
        want = torch.nonzero(flat == e).flatten()
        seg = s[off[e]:off[e + 1]]
        assert torch.equal(seg[:want.numel()], want), e
        assert bool((seg[want.numel():] == P).all())
        assert seg.numel() == -(-want.numel() // step) * step
    assert bool((s[off[E]:] == P).all())


CASES = [  # (T, top_k, E, block_size)
    (1, 2, 8, 16), (7, 2, 8, None), (513, 8, 128, 16), (4096, 8, 128, 64), (3000, 2, 8, 64),
    (2500, 4, 1024, 32), (1, 1, 1, 1), (333, 6, 64, 128),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{t}k{k}E{e}bs{b}" for t, k, e, b in CASES])
def test_cuda_align_matches_torch_align(case):
    _cuda_or_skip()
    T, k, E, bs = case
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]).to(torch.int32)
    for exact in (True, False):
        s_c, o_c = mc.align(ids, E, bs, exact_length=exact)
        s_t, o_t = mt.align(ids, E, bs, exact_length=exact)
        torch.cuda.synchronize()
        assert s_c.dtype == torch.int32 and o_c.dtype == torch.int32
        assert torch.equal(o_c, o_t)
        assert torch.equal(s_c, s_t)
        if T * k <= 4096:
            _check_layout(ids, E, bs, s_c, o_c)


def test_cuda_align_skewed_and_degenerate():
    """All pairs to one expert across several CTAs (stable across CTA chunks), empty experts, ids without an
    expert (E, -1) left out, no pairs at all, int64 ids."""
    _cuda_or_skip()
    E = 16
    ids = torch.full((5000, 1), 3, dtype=torch.int32, device="cuda")
    ids[::7] = 11
    ids[::13] = E      # no expert
    ids[::29] = -1     # no expert
    for bs in (None, 16, 64):
        s_c, o_c = mc.align(ids, E, bs)
        s_t, o_t = mt.align(ids, E, bs)
        assert torch.equal(o_c, o_t) and torch.equal(s_c, s_t)
        _check_layout(ids, E, bs, s_c, o_c)
    s, o = mc.align(torch.empty(0, 2, dtype=torch.int64, device="cuda"), E, 16)
    assert s.numel() == 0 and o.tolist() == [0] * (E + 1)
    ids64 = torch.randint(0, E, (40, 2), device="cuda")
    assert torch.equal(mc.align(ids64, E, 16)[0], mt.align(ids64, E, 16)[0])


def test_cuda_align_current_stream_and_supports():
    _cuda_or_skip()
    ids = torch.randint(0, 64, (2000, 1), device="cuda", dtype=torch.int32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ids2 = ids * 1  # produced on s: the align must run after it
        s_c, o_c = mc.align(ids2, 64, 32)
    s.synchronize()
    s_t, o_t = mt.align(ids, 64, 32)
    assert torch.equal(o_c, o_t) and torch.equal(s_c, s_t)
    assert not mc.supports_align(ids.cpu(), 64, 32)
    assert not mc.supports_align(ids, 2000, 32)
    assert not mc.supports_align(ids, 64, 0)
    assert not mc.supports_align(ids.float(), 64, 32)
    assert mc.supports("align", topk_ids=ids, num_experts=64, block_size=None)
    assert not mc.supports("fused_experts", hidden2d=ids.float())
    with pytest.raises(ValueError, match="num_experts"):
        mc.align(ids, 0, 16)


def test_compiled_entry_rejects_bad_arguments():
    """The C++ entry point checks sizes before launching anything (ValueError, nothing written)."""
    _cuda_or_skip()
    from kernswap import _ext

    mod = _ext.get_C_cuda()
    ids = torch.zeros(10, dtype=torch.int32, device="cuda")
    out = torch.empty(16, dtype=torch.int32, device="cuda")
    off = torch.empty(5, dtype=torch.int32, device="cuda")
    ws = torch.empty(4, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="sorted_len"):   # needs min(10*16, 10 + 4*15) = 70
        mod.moe_align(ids.data_ptr(), 10, 10, 4, 16, out.data_ptr(), 16, off.data_ptr(), 5, ws.data_ptr(), 4,
                      stream)
    with pytest.raises(ValueError, match="workspace"):
        mod.moe_align(ids.data_ptr(), 10, 10, 4, 1, out.data_ptr(), 10, off.data_ptr(), 5, ws.data_ptr(), 3,
                      stream)
    with pytest.raises(ValueError, match="num_experts"):
        mod.moe_align(ids.data_ptr(), 10, 10, 2000, 1, out.data_ptr(), 10, off.data_ptr(), 2001, ws.data_ptr(),
                      4, stream)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 in this session")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_experts_on_cuda_alignment(dtype):
    """The CUDA alignment drives the Triton grouped kernels; same output as the backend's own alignment."""
    _cuda_or_skip()
    ok, reason = mt.available()
    if not ok:
        pytest.skip(reason)
    from kernswap import _kernels

    km = _kernels.load("fused_moe")
    T, E, k, H, I = 200, 16, 4, 256, 160
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    logits = torch.randn(T, E, device="cuda")
    w, ids = torch.topk(logits.softmax(-1), k)
    w, ids = (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.to(torch.int32).contiguous()
    wgu = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(dtype)
    wd = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(dtype)
    cfg = km.pick_config(T * k, E, False)
    s_c, o_c = mc.align(ids, E, cfg.block_m, exact_length=False)
    out_c = km.launch_fused_experts(x, w, ids, s_c, o_c, wgu, wd, cfg)
    out_t = mt.fused_experts(x, w, ids, wgu, wd)
    torch.cuda.synchronize()
    assert torch.equal(out_c, out_t)  # same alignment -> same programs -> same bits
