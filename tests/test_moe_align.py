"""moe_align: stable counting sort of (token, slot) pairs by expert; offsets; block padding (reference);
degenerate cases; opcheck; bad inputs."""
import pytest
import torch

from conftest import HAVE_C, NO_C_REASON, assert_raises
from kernswap.ops import moe_align
from kernswap.reference.moe import moe_align_ref

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON))]


def _distinct_ids(t, e, k):
    return torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32) if t else \
        torch.zeros(0, k, dtype=torch.int32)


def _check(ids, sorted_ids, offsets, e):
    flat = ids.reshape(-1).to(torch.int64)
    p = flat.numel()
    assert sorted_ids.dtype == torch.int32 and offsets.dtype == torch.int32 and offsets.shape == (e + 1,)
    assert int(offsets[0]) == 0 and int(offsets[-1]) == p
    assert sorted(sorted_ids.tolist()) == list(range(p)), "every pair exactly once (dropless)"
    counts = torch.bincount(flat, minlength=e)
    assert torch.equal((offsets[1:] - offsets[:-1]).to(torch.int64), counts)
    for x in range(e):
        seg = sorted_ids[int(offsets[x]):int(offsets[x + 1])].to(torch.int64)
        assert bool((flat[seg] == x).all())
        assert bool((seg[1:] > seg[:-1]).all()), "stable: token order within an expert"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (53, 7, 3), (40, 128, 8), (9, 5, 5), (0, 4, 2)])
def test_align_invariants(backend, t, e, k):
    ids = _distinct_ids(t, e, k)
    s, o = moe_align(ids, e, backend=backend)
    _check(ids, s, o, e)
    sr, orr = moe_align_ref(ids, e)
    assert torch.equal(s, sr) and torch.equal(o, orr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_align_all_to_one_expert_and_empty_experts(backend):
    ids = torch.full((21, 1), 3, dtype=torch.int64)
    s, o = moe_align(ids, 6, backend=backend)
    _check(ids, s, o, 6)
    assert o.tolist() == [0, 0, 0, 0, 21, 21, 21]


@pytest.mark.parametrize("block", [1, 4, 16])
def test_align_block_padding_reference(block):
    ids = _distinct_ids(11, 6, 2)
    s, o = moe_align(ids, 6, block_size=block, backend="reference")
    p = ids.numel()
    assert bool(((o[1:] - o[:-1]) % block == 0).all())
    real = s[s < p]
    assert sorted(real.tolist()) == list(range(p)) and int((s == p).sum()) == s.numel() - p
    flat = ids.reshape(-1)
    for x in range(6):
        seg = s[int(o[x]):int(o[x + 1])]
        seg = seg[seg < p].to(torch.int64)
        assert bool((flat[seg] == x).all())


def test_align_cpu_backend_rejects_block_size():
    if not HAVE_C:
        pytest.skip(NO_C_REASON)
    assert_raises(lambda: moe_align(_distinct_ids(3, 4, 2), 4, block_size=16, backend="cpu"), NotImplementedError,
                  "does not support")
    s, o = moe_align(_distinct_ids(3, 4, 2), 4, block_size=16)  # auto: falls back to the reference
    assert int(o[-1]) % 16 == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_align_opcheck(backend):
    torch.library.opcheck(torch.ops.kernswap.moe_align.default, (_distinct_ids(9, 7, 2), 7, None, backend))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: moe_align(torch.zeros(3, 2), 4), TypeError, "topk_ids.dtype must be one of"),
    (lambda: moe_align(torch.zeros(6, dtype=torch.int32), 4), ValueError, "topk_ids must be 2-D"),
    (lambda: moe_align(torch.tensor([[0, 4]]), 4), ValueError, "must be in [0, num_experts=4), got values in [0, 4]"),
    (lambda: moe_align(torch.tensor([[-1, 2]]), 4), ValueError, "got values in [-1, 2]"),
    (lambda: moe_align(torch.tensor([[0, 1]]), 0), ValueError, "num_experts must be >= 1, got 0"),
    (lambda: moe_align(torch.tensor([[0, 1]]), 2, block_size=0), ValueError, "block_size must be >= 1"),
    (lambda: moe_align("ids", 2), TypeError, "topk_ids must be a torch.Tensor"),
])
def test_align_bad_inputs(call, exc, msg):
    assert_raises(call, exc, msg)
