"""kernswap.ops.block_sparse_attention: every backend on this machine against the fp64 oracle, semantics,
mask builders, opcheck and bad input. Tolerance (flash-attention's rule): |ours - ref64| <= 2 * |same-dtype
dense attention - ref64| + floor."""
import math

import pytest
import torch

from attention_nan import check_policy, poisoned_case
from conftest import ISAS, assert_raises, use_isa
from kernswap import ops, sparse
from kernswap.ops.block_sparse_attention import TABLE
from kernswap.reference.block_sparse_attention import block_sparse_attention_ref, element_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends():
    params = [pytest.param(("reference", None), id="reference"), pytest.param(("auto", None), id="auto")]
    ok, reason = TABLE.available("cpu")
    if ok:
        params += [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in ISAS]
    else:
        params.append(pytest.param(("cpu", None), id="cpu", marks=pytest.mark.skip(reason=f"cpu: {reason}")))
    return params


BACKENDS = _backends()


def _inputs(b, hq, hkv, sq, sk, d, dtype, transposed=False):
    if transposed:  # (B, S, H, D) memory seen as (B, H, S, D): the layout models hand over
        q = torch.randn(b, sq, hq, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, s, d).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    return q, k, v


def check_against_oracle(out, lse, q, k, v, mask, bs, causal, scale, what=""):
    ref64, lse64 = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, bs, causal, scale,
                                              compute_dtype=torch.float64)
    same, _ = block_sparse_attention_ref(q, k, v, mask, bs, causal, scale, compute_dtype=q.dtype)
    floor = (1e-5 if q.dtype == torch.float32 else 2e-3) * float(v.abs().max())
    err_same = (same.double() - ref64).abs()
    err = (out.double() - ref64).abs()
    tol = 2 * err_same + floor
    assert out.shape == q.shape and out.dtype == q.dtype
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements over tolerance, max err {err.max():.3e}"
    if lse is not None:
        fin = torch.isfinite(lse64)
        assert torch.equal(torch.isfinite(lse), fin), what
        assert torch.allclose(lse[fin].double(), lse64[fin].double(), atol=1e-3 if q.dtype != torch.float32 else 1e-5,
                              rtol=1e-3), what
        assert (out[~fin] == 0).all(), what


def _random_mask(b, h, nqb, nkb, density, keep_diag=True):
    m = torch.rand(b, h, nqb, nkb) < density
    if keep_diag:
        m[..., torch.arange(nqb), torch.arange(nqb).clamp(max=nkb - 1)] = True
    return m


CASES = [  # b, hq, hkv, sq, sk, d, bs, density
    (1, 2, 2, 77, 77, 64, 16, 0.5),
    (2, 4, 2, 100, 131, 64, 32, 0.3),
    (1, 4, 1, 65, 200, 128, 64, 0.6),
    (1, 2, 1, 33, 33, 256, 16, 1.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_against_oracle(backend, dtype, case):
    name, isa = backend
    b, hq, hkv, sq, sk, d, bs, dens = case
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, dtype, transposed=(sq % 2 == 1))
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    mask = _random_mask(b, hq, nqb, nkb, dens)
    mask[0, 0, 0, :] = False  # a query block with no key at all
    scale = d ** -0.5
    with use_isa(isa):
        out, lse = ops.block_sparse_attention(q, k, v, mask, block_size=bs, scale=scale, backend=name,
                                              return_lse=True)
    check_against_oracle(out, lse, q, k, v, mask, bs, True, scale, f"{name}/{isa}")
    assert (out[0, 0, :bs] == 0).all() and torch.isinf(lse[0, 0, :bs]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_broadcast_mask_and_noncausal(backend, causal):
    name, isa = backend
    q, k, v = _inputs(2, 4, 2, 50, 90, 64, torch.float32)
    mask = _random_mask(1, 1, 4, 6, 0.5)
    with use_isa(isa):
        out, lse = ops.block_sparse_attention(q, k, v, mask, block_size=16, causal=causal, backend=name,
                                              return_lse=True)
    check_against_oracle(out, lse, q, k, v, mask, 16, causal, 64 ** -0.5, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dense_mask_equals_causal_sdpa(backend, dtype):
    """Density 100%: the causal block mask gives dense causal attention (torch's SDPA)."""
    name, isa = backend
    q, k, v = _inputs(1, 4, 2, 97, 97, 64, dtype)
    mask = sparse.causal_block_mask(97, 97, 32)
    with use_isa(isa):
        out = ops.block_sparse_attention(q, k, v, mask, block_size=32, backend=name)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                            v.double().repeat_interleave(2, 1), is_causal=True)
    check_against_oracle(out, None, q, k, v, mask, 32, True, 64 ** -0.5, name)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double(), sdpa, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sk", [1, 63, 1000, 4099])
def test_decode_one_query_against_cache(backend, sk):
    name, isa = backend
    q, k, v = _inputs(1, 8, 2, 1, sk, 128, torch.float32)
    bs = 64
    mask = sparse.topk_block_mask(q, k, bs, density=0.1, per_kv_head=True)
    with use_isa(isa):
        out, lse = ops.block_sparse_attention(q, k, v, mask, block_size=bs, backend=name, return_lse=True)
    check_against_oracle(out, lse, q, k, v, mask, bs, True, 128 ** -0.5, f"decode sk={sk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_block_and_empty_mask(backend):
    name, isa = backend
    q, k, v = _inputs(1, 2, 2, 10, 10, 64, torch.float32)
    with use_isa(isa):
        one = ops.block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), backend=name)
        none, lse = ops.block_sparse_attention(q, k, v, torch.zeros(1, 1, 1, 1, dtype=torch.bool), backend=name,
                                               return_lse=True)
    check_against_oracle(one, None, q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), 64, True, 0.125, name)
    assert (none == 0).all() and torch.isneginf(lse).all()


def test_element_mask_semantics():
    m = element_mask(torch.ones(1, 1, 1, 2, dtype=torch.bool), 3, 20, 16, True)
    assert m.shape == (1, 1, 3, 20)
    assert m[0, 0].sum(dim=1).tolist() == [18, 19, 20]  # queries sit at positions 17, 18, 19


# ---------------------------------------------------------------------------------------------- mask builders
@pytest.mark.parametrize("sq,sk,bs", [(1, 1, 16), (100, 100, 16), (37, 300, 64), (1, 4097, 64), (256, 256, 128)])
def test_builders_never_leave_a_row_without_its_own_key(sq, sk, bs):
    for mask in (sparse.causal_block_mask(sq, sk, bs),
                 sparse.sink_window_block_mask(sq, sk, bs, sink_blocks=1, local_blocks=1),
                 sparse.topk_block_mask(torch.randn(1, 2, sq, 64), torch.randn(1, 1, sk, 64), bs, density=0.05,
                                        local_blocks=1, sink_blocks=0)):
        em = element_mask(mask, sq, sk, bs, True)
        rows = torch.arange(sq) + sk - sq
        assert em[..., torch.arange(sq), rows].all()  # the query's own position is always attended
        causal = sparse.causal_block_mask(sq, sk, bs)
        assert not (mask & ~causal).any()  # nothing entirely in the future


def test_topk_density_budget_and_mandatory_blocks():
    torch.manual_seed(1)
    sq = sk = 2048
    q, k = torch.randn(1, 4, sq, 64), torch.randn(1, 2, sk, 64)
    must = sparse.sink_window_block_mask(sq, sk, 64, sink_blocks=1, local_blocks=2)
    for dens in (0.1, 0.25, 0.5, 1.0):
        m = sparse.topk_block_mask(q, k, 64, density=dens, sink_blocks=1, local_blocks=2)
        assert m.shape == (1, 4, 32, 32)
        assert (m | ~must).all()  # sinks and window always kept
        visible = sparse.causal_block_mask(sq, sk, 64)[0, 0].sum(dim=1)
        kept = m.sum(dim=-1)
        budget = torch.maximum(torch.ceil(visible * dens), must[0, 0].sum(dim=1))
        assert torch.equal(kept, budget.expand_as(kept).long())
        got = sparse.block_mask_density(m, sq, sk, 64)
        assert got == pytest.approx(float(budget.sum() / visible.sum()))
        assert got >= dens - 1e-9 and (dens < 0.2 or got <= dens + 0.05)
    assert sparse.block_mask_density(sparse.topk_block_mask(q, k, 64, density=1.0), sq, sk, 64) == 1.0


def test_topk_picks_the_high_scoring_block():
    q = torch.zeros(1, 1, 512, 64)
    k = torch.randn(1, 1, 512, 64) * 0.01
    k[0, 0, 64 * 3:64 * 4] += 1.0  # key block 3 aligned with every query
    q[..., :] = 1.0
    m = sparse.topk_block_mask(q, k, 64, density=0.3, sink_blocks=0, local_blocks=1)
    assert m[0, 0, 5:, 3].all()


def test_pooled_keys_match_and_per_kv_head_is_shared():
    q, k = torch.randn(2, 6, 1, 64), torch.randn(2, 3, 1000, 64)
    pk = sparse.pool_key_blocks(k, 64)
    assert torch.allclose(pk[:, :, -1], k[:, :, 960:].mean(dim=2), atol=1e-6)
    a = sparse.topk_block_mask(q, k, 64, density=0.2)
    b = sparse.topk_block_mask(q, None, 64, density=0.2, pooled_k=pk, sk=1000)
    assert torch.equal(a, b)
    g = sparse.topk_block_mask(q, k, 64, density=0.2, per_kv_head=True)
    assert torch.equal(g[:, 0::2], g[:, 1::2])


# ---------------------------------------------------------------------------------------------- op plumbing
def test_opcheck():
    q, k, v = _inputs(1, 2, 1, 40, 40, 64, torch.float32)
    mask = _random_mask(1, 2, 3, 3, 0.6)
    for backend in ("reference", "auto"):
        torch.library.opcheck(torch.ops.kernswap.block_sparse_attention.default,
                              (q, k, v, mask, 16, True, 0.125, backend))


def test_gradients_flow_through_reference():
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 1, 20, 20, 64, torch.float32))
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    ops.block_sparse_attention(q, k, v, mask, block_size=16).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    block_sparse_attention_ref(qd, kd, vd, mask, 16, True, 0.125, compute_dtype=torch.float64)[0].sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-4)


def test_compile_no_graph_break():
    q, k, v = _inputs(1, 2, 1, 40, 40, 64, torch.float32)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    fn = torch.compile(lambda q, k, v: ops.block_sparse_attention(q, k, v, mask, block_size=16), fullgraph=True,
                       backend="eager")
    assert torch.allclose(fn(q, k, v), ops.block_sparse_attention(q, k, v, mask, block_size=16))


BAD = [
    (dict(q=torch.randn(2, 3, 4)), ValueError, "q must be 4-D"),
    (dict(q=torch.randn(1, 2, 8, 64, dtype=torch.float64)), TypeError, "q.dtype must be"),
    (dict(k=torch.randn(1, 2, 8, 64).half()), TypeError, "same dtype"),
    (dict(q=torch.randn(1, 3, 8, 64)), ValueError, "multiple of k/v heads"),
    (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), ValueError, "D=64"),
    (dict(v=torch.randn(1, 2, 9, 64)), ValueError, "same shape"),
    (dict(block_mask=torch.ones(1, 1, 1, 1)), TypeError, "block_mask.dtype"),
    (dict(block_mask=torch.ones(1, 1, 2, 1, dtype=torch.bool)), ValueError, "block_mask must have shape"),
    (dict(block_size=24), ValueError, "block_size"),
    (dict(q=torch.randn(1, 2, 9, 64)), ValueError, "Sq <= Sk"),
    (dict(scale=float("nan")), TypeError, "scale"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(q="x"), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[b[2] for b in BAD])
def test_bad_input(kw, exc, msg):
    args = dict(q=torch.randn(1, 2, 8, 64), k=torch.randn(1, 2, 8, 64), v=torch.randn(1, 2, 8, 64),
                block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=16)
    args.update(kw)
    q, k, v, m = (args.pop(n) for n in ("q", "k", "v", "block_mask"))
    assert_raises(lambda: ops.block_sparse_attention(q, k, v, m, **args), exc, msg)


def test_forced_unavailable_backend_is_a_clear_error():
    q, k, v = _inputs(1, 2, 2, 8, 8, 64, torch.float32)
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    if not torch.cuda.is_available():
        ok, _ = TABLE.available("triton")
        if not ok:
            assert_raises(lambda: ops.block_sparse_attention(q, k, v, m, backend="triton"), RuntimeError,
                          "unavailable")


def test_zero_length():
    q, k, v = _inputs(1, 2, 2, 0, 5, 64, torch.float32)
    out = ops.block_sparse_attention(q, k, v, torch.ones(1, 1, 0, 1, dtype=torch.bool), block_size=16)
    assert out.shape == (1, 2, 0, 64)
    assert math.isfinite(float(out.sum()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_nan_policy(backend, dtype, decode):
    """A row whose q, or a visible key's k or v, is non-finite is NaN; keys a row cannot see never reach it."""
    name, isa = backend
    q, k, v, mask, bs = poisoned_case(dtype, decode)
    with use_isa(isa):
        out, lse = ops.block_sparse_attention(q, k, v, mask, block_size=bs, backend=name, return_lse=True)
    check_policy(out, lse, q, k, v, mask, bs)


def test_nan_q_row_without_keys():
    q, k, v = _inputs(1, 2, 2, 4, 0, 64, torch.float32)
    q[0, 1, 2, 0] = math.inf
    out, lse = ops.block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 0, dtype=torch.bool), block_size=16,
                                          causal=False, return_lse=True)
    bad = torch.zeros(1, 2, 4, dtype=torch.bool)
    bad[0, 1, 2] = True
    assert torch.equal(torch.isnan(out).all(-1), bad) and torch.equal(torch.isnan(lse), bad)
    assert (out[~bad] == 0).all() and torch.isneginf(lse[~bad]).all()
