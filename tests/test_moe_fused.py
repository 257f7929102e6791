"""fused_moe: the whole layer against the reference (routing modes, degenerate cases, leading dims, the
pre-routed path of transformers' experts interface, quantized experts), opcheck, bad inputs."""
import pytest
import torch

from conftest import HAVE_C, NO_C_REASON, assert_raises
from kernswap.formats.experts import quantize_experts
from kernswap.ops import fused_moe
from kernswap.reference.moe import fused_experts_ref, fused_moe_ref

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)),
            pytest.param("auto", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON))]


def _weights(e, h, i, dtype=torch.float32):
    return (torch.randn(e, 2 * i, h) / h ** 0.5).to(dtype), (torch.randn(e, h, i) / i ** 0.5).to(dtype)


def _close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,e,k,h,i", [(1, 8, 2, 64, 48), (31, 7, 3, 45, 21), (6, 4, 4, 24, 16), (9, 128, 8, 32, 8)])
@pytest.mark.parametrize("mode", [dict(), dict(order="topk_softmax", renormalize=False),
                                  dict(scoring="sigmoid", renormalize=True)])
def test_fused_moe_matches_reference(backend, t, e, k, h, i, mode):
    x, lg = torch.randn(t, h), torch.randn(t, e)
    wgu, wd = _weights(e, h, i)
    out = fused_moe(x, lg, wgu, wd, k, backend=backend, **mode)
    kw = dict(renormalize=True, scoring="softmax", order="softmax_topk")
    kw.update(mode)
    _close(out, fused_moe_ref(x, lg, wgu, wd, k, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_one_expert_and_idle_experts(backend):
    t, e, h, i = 40, 6, 32, 24
    x, (wgu, wd) = torch.randn(t, h), _weights(e, h, i)
    lg = torch.full((t, e), -5.0)
    lg[:, 2] = 5.0  # top-1: everything on expert 2, the other five get nothing
    out = fused_moe(x, lg, wgu, wd, 1, backend=backend)
    g, u = (x @ wgu[2].t()).chunk(2, -1)
    _close(out, (torch.nn.functional.silu(g) * u) @ wd[2].t())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_leading_dims(backend, dtype):
    x, lg = torch.randn(2, 7, 48).to(dtype), torch.randn(2, 7, 5)
    wgu, wd = _weights(5, 48, 40, dtype)
    out = fused_moe(x, lg, wgu, wd, 2, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    ref = fused_moe_ref(x.reshape(-1, 48), lg.reshape(-1, 5), wgu, wd, 2).reshape(x.shape)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_routed_path(backend):
    t, e, k, h, i = 11, 6, 2, 40, 24
    x, (wgu, wd) = torch.randn(t, h), _weights(e, h, i)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])  # int64, like torch.topk
    w = torch.rand(t, k)
    out = fused_moe(x, None, wgu, wd, k, topk_weights=w, topk_ids=ids, backend=backend)
    _close(out, fused_experts_ref(x, w, ids, wgu, wd))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4", "w4a8"])
def test_fused_moe_quantized(backend, fmt):
    t, e, k, h, i = 17, 5, 2, 128, 128
    x, lg, (wgu, wd) = torch.randn(t, h), torch.randn(t, e), _weights(e, h, i)
    qgu, qd = quantize_experts(wgu, fmt), quantize_experts(wd, fmt)
    out = fused_moe(x, lg, qgu, qd, k, backend=backend)
    ref = fused_moe_ref(x, lg, qgu, qd, k)
    tol = 1e-3 if fmt.startswith("w") else 1e-5
    assert (out - ref).norm() <= tol * ref.norm()


def test_empty_tokens():
    wgu, wd = _weights(3, 16, 8)
    assert fused_moe(torch.randn(0, 16), torch.randn(0, 3), wgu, wd, 2).shape == (0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_moe_opcheck(backend):
    t, e, k, h, i = 5, 4, 2, 32, 16
    x, lg, (wgu, wd) = torch.randn(t, h), torch.randn(t, e), _weights(e, h, i)
    none = (None, None, None, None, 0, 0, 0, True, False)
    args = (x, lg, None, None, wgu, wd, *none, k, True, "softmax", "softmax_topk", None, backend)
    torch.library.opcheck(torch.ops.kernswap.fused_moe.default, args)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]], dtype=torch.int32)
    args = (x, None, torch.rand(t, k), ids, wgu, wd, *none, k, True, "softmax", "softmax_topk", None, backend)
    torch.library.opcheck(torch.ops.kernswap.fused_moe.default, args)


def test_fused_moe_bad_inputs():
    t, e, k, h, i = 4, 3, 2, 16, 8
    x, lg, (wgu, wd) = torch.randn(t, h), torch.randn(t, e), _weights(e, h, i)
    ids, w = torch.tensor([[0, 1]] * t), torch.rand(t, k)
    cases = [
        (lambda: fused_moe(x, lg[:, :2], wgu, wd, k), ValueError, "router_logits must be [..., num_experts=3]"),
        (lambda: fused_moe(x, lg, wgu, wd, 4), ValueError, "top_k must be in [1, 3], got 4"),
        (lambda: fused_moe(x, lg, wgu, wd, k, topk_weights=w, topk_ids=ids), ValueError, "not both"),
        (lambda: fused_moe(x, None, wgu, wd, k), ValueError, "topk_weights and topk_ids must both be given"),
        (lambda: fused_moe(x, None, wgu, wd, k, topk_weights=w, topk_ids=ids + 2), ValueError,
         "topk_ids must be in [0, num_experts=3), got values in [2, 3]"),
        (lambda: fused_moe(x, None, wgu, wd, k, topk_weights=w[:, :1], topk_ids=ids), ValueError,
         "must both be [num_tokens=4, top_k=2]"),
        (lambda: fused_moe(x, None, wgu, wd, k, topk_weights=w, topk_ids=ids.float()), TypeError, "topk_ids.dtype"),
        (lambda: fused_moe(x[:, :10], lg, wgu, wd, k), ValueError, "hidden_size=10"),
        (lambda: fused_moe(x, lg, wgu[:, :15], wd[:, :, :7], k), ValueError, "2 * intermediate_size > 0"),
        (lambda: fused_moe(x, lg, wgu.numpy(), wd, k), TypeError, "w_gate_up must be a torch.Tensor"),
        (lambda: fused_moe(x, lg, wgu[0], wd, k), ValueError, "w_gate_up must be 3-D"),
        (lambda: fused_moe(x, lg, wgu, wd, k, scoring="softplus"), ValueError, "scoring must be one of"),
        (lambda: fused_moe(x, lg, wgu, wd, k, backend="tpu"), ValueError, "backend must be one of"),
    ]
    for call, exc, msg in cases:
        assert_raises(call, exc, msg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [None, "int8", "w4a8"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_nan_policy(backend, fmt, scoring):
    """The NaN / Inf policy: a token whose hidden row or router logits hold a NaN or an Inf gives NaN in every
    element; the other tokens equal the clean run (they share experts and panels with the poisoned ones)."""
    t, e, k, h, i = 23, 6, 2, 128, 128
    x, lg = torch.randn(t, h), torch.randn(t, e)
    wgu, wd = _weights(e, h, i)
    if fmt is not None:
        wgu, wd = quantize_experts(wgu, fmt), quantize_experts(wd, fmt)
    clean = fused_moe(x, lg, wgu, wd, k, scoring=scoring, backend=backend)
    bad = [2, 9, 17]
    x[2, 5], x[9, 0], lg[17, 3] = float("nan"), float("inf"), float("nan")
    out = fused_moe(x, lg, wgu, wd, k, scoring=scoring, backend=backend)
    assert torch.isnan(out[bad]).all(), "poisoned tokens: NaN in every element"
    keep = [r for r in range(t) if r not in bad]
    if backend == "reference":
        # the reference runs torch's GEMM on each expert's rows: its blocking (and so its rounding) may change with
        # the row count, which the poisoned routing changes (seen with oneDNN/MKL on an AMD EPYC with AVX-512)
        torch.testing.assert_close(out[keep], clean[keep], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out[keep], clean[keep]), "the other tokens are untouched"
