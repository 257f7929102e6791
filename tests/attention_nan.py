"""The NaN / Inf policy of block_sparse_attention, shared by the CPU and Triton test files.

Planted: a NaN and an Inf in two q rows; an Inf in a k row and a NaN in a v row that the causal mask hides
from the earlier rows of their own (kept) block; a NaN k row in a dropped block; in decode, an Inf in a k row
and in a v row of blocks that every row of their kv head sees. Expected (the policy, stated
here independently of the reference's code): a row is NaN (out and lse) iff its q row, or the k or v row of a
key it attends, is non-finite; every other row equals the oracle on the same inputs with the non-finite
values replaced by finite ones (which those rows never see)."""
import math

import torch

from kernswap.reference.block_sparse_attention import block_sparse_attention_ref, element_mask


def poisoned_case(dtype, decode: bool, device="cpu", d: int = 64, bs: int = 16):
    g = torch.Generator().manual_seed(7)
    b, hq, hkv = 2, 4, 2
    sq, sk = (3, 300) if decode else (100, 100)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    mask = torch.rand(b, hq, nqb, nkb, generator=g) < 0.6
    mask[..., -1, -1] = True  # every row's own (diagonal) block
    mask[1, :, :, 1] = False  # key block 1 of batch 1: nobody attends it
    q[0, 1, sq - 1, 3] = math.nan
    q[1, 2, 0, 5] = math.inf
    j, jv = (sk - 2, sk - 1) if decode else (45, 47)  # in a kept diagonal block: hidden from the rows before
    mask[0, :, -1 if decode else j // bs, j // bs] = True
    k[0, 0, j, 2] = -math.inf
    v[0, 1, jv, 4] = math.nan
    k[1, 1, bs + 3, 0] = math.nan  # in the dropped block
    if decode:  # blocks every row of a kv head's merged decode tile sees whole (not scanned: S and O checked)
        mask[0, 2:, 0, 1] = True
        k[0, 1, bs + 4, 1] = math.inf
        mask[0, :2, 0, 4] = True
        v[0, 0, 4 * bs + 6, 3] = -math.inf
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), mask.to(device), bs


def expected_poison(q, k, v, mask, bs):
    em = element_mask(mask.cpu(), q.shape[2], k.shape[2], bs, True)
    group = q.shape[1] // k.shape[1]
    kv_bad = ~(torch.isfinite(k.cpu()).all(-1) & torch.isfinite(v.cpu()).all(-1))
    seen = (em & kv_bad.repeat_interleave(group, 1)[:, :, None, :]).any(-1)
    return seen | ~torch.isfinite(q.cpu()).all(-1)


def check_policy(out, lse, q, k, v, mask, bs):
    want = expected_poison(q, k, v, mask, bs)
    assert 0 < int(want.sum()) < want.numel() and not want[1].all(), "the case must poison some rows only"
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(torch.isnan(out).all(-1), want), "poisoned rows: NaN in every element"
    assert torch.equal(torch.isnan(lse), want), "poisoned rows: lse NaN"
    assert torch.isfinite(out[~want]).all() and not torch.isnan(lse[~want]).any(), "other rows: finite"
    fix = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t)).double().cpu()  # noqa: E731
    ref, ref_lse = block_sparse_attention_ref(fix(q), fix(k), fix(v), mask.cpu(), bs, True, q.shape[-1] ** -0.5,
                                              compute_dtype=torch.float64)
    tol = (1e-5 if q.dtype == torch.float32 else 2e-2) * float(fix(v).abs().max())
    err = (out[~want].double() - ref[~want]).abs().max()
    assert err <= tol, f"rows that see no non-finite value must be unaffected: max err {err:.3e} > {tol:.3e}"
    fin = torch.isfinite(ref_lse[~want])
    assert torch.equal(torch.isneginf(lse[~want]), ~fin), "rows without an attended key: lse -inf"
    assert torch.allclose(lse[~want][fin].double(), ref_lse[~want][fin].double(), atol=1e-2, rtol=1e-3)
