"""moe_route: routing invariants, both softmax orders, sigmoid + selection bias, ties, degenerate sizes, opcheck,
bad inputs. Every available backend against the reference (kernswap.reference.moe)."""
import pytest
import torch

from conftest import HAVE_C, NO_C_REASON, assert_raises
from kernswap.ops import moe_route
from kernswap.reference.moe import moe_route_ref

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON))]
MODES = [("softmax", "softmax_topk"), ("softmax", "topk_softmax"), ("sigmoid", "softmax_topk")]


def _check_invariants(w, ids, e, k, renormalize):
    t = ids.shape[0]
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and tuple(ids.shape) == (t, k)
    assert bool(((ids >= 0) & (ids < e)).all())
    srt = ids.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "expert ids must be distinct per token"
    assert bool((w >= 0).all())
    if renormalize:
        torch.testing.assert_close(w.sum(1), torch.ones(t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring,order", MODES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (37, 7, 3), (19, 128, 8), (5, 6, 6), (3, 1, 1)])
def test_route_matches_reference(backend, scoring, order, renormalize, t, e, k):
    logits = torch.randn(t, e) * 2
    bias = torch.randn(e) if scoring == "sigmoid" else None
    w, ids = moe_route(logits, k, renormalize=renormalize, scoring=scoring, order=order, correction_bias=bias,
                       backend=backend)
    wr, idr = moe_route_ref(logits, k, renormalize, scoring, order, bias)
    _check_invariants(w, ids, e, k, renormalize)
    assert torch.equal(ids, idr)
    torch.testing.assert_close(w, wr, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_ties_lowest_id_first(backend):
    logits = torch.zeros(4, 6)
    logits[1, 4] = 1.0  # one clear winner, then ties
    _, ids = moe_route(logits, 3, backend=backend)
    assert ids[0].tolist() == [0, 1, 2] and ids[1].tolist() == [4, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_sigmoid_bias_only_chooses(backend):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    w, ids = moe_route(logits, 2, renormalize=False, scoring="sigmoid", correction_bias=bias, backend=backend)
    assert ids[0].tolist() == [3, 0]
    torch.testing.assert_close(w[0], torch.sigmoid(logits[0, [3, 0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_half_logits_and_leading_dims(dtype):
    logits = torch.randn(2, 5, 9).to(dtype)
    w, ids = moe_route(logits, 2)
    wr, idr = moe_route_ref(logits.reshape(-1, 9), 2)
    assert tuple(w.shape) == (2, 5, 2) and torch.equal(ids.reshape(-1, 2), idr)
    torch.testing.assert_close(w.reshape(-1, 2), wr)


def test_route_empty():
    w, ids = moe_route(torch.randn(0, 4), 2)
    assert tuple(w.shape) == (0, 2) and tuple(ids.shape) == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_opcheck(backend):
    args = (torch.randn(6, 5), 2, True, "softmax", "topk_softmax", None, backend)
    torch.library.opcheck(torch.ops.kernswap.moe_route.default, args)
    args = (torch.randn(3, 5), 3, False, "sigmoid", "softmax_topk", torch.randn(5), backend)
    torch.library.opcheck(torch.ops.kernswap.moe_route.default, args)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: moe_route([[1.0]], 1), TypeError, "router_logits must be a torch.Tensor"),
    (lambda: moe_route(torch.zeros(3, 4, dtype=torch.int64), 1), TypeError, "router_logits.dtype"),
    (lambda: moe_route(torch.zeros(3, 0), 1), ValueError, "num_experts > 0"),
    (lambda: moe_route(torch.zeros(3, 4), 5), ValueError, "top_k must be in [1, 4], got 5"),
    (lambda: moe_route(torch.zeros(3, 4), 0), ValueError, "top_k must be in [1, 4], got 0"),
    (lambda: moe_route(torch.zeros(3, 4), 2.0), TypeError, "top_k must be an int"),
    (lambda: moe_route(torch.zeros(3, 4), 2, scoring="relu"), ValueError, "scoring must be one of"),
    (lambda: moe_route(torch.zeros(3, 4), 2, order="x"), ValueError, "order must be one of"),
    (lambda: moe_route(torch.zeros(3, 4), 2, renormalize=1), TypeError, "renormalize must be a bool"),
    (lambda: moe_route(torch.zeros(3, 4), 2, correction_bias=torch.zeros(4)), ValueError, "only used with"),
    (lambda: moe_route(torch.zeros(3, 4), 2, scoring="sigmoid", correction_bias=torch.zeros(5)), ValueError,
     "correction_bias must have shape [num_experts=4], got [5]"),
    (lambda: moe_route(torch.zeros(3, 4), 2, backend="gpu"), ValueError, "backend must be one of"),
])
def test_route_bad_inputs(call, exc, msg):
    assert_raises(call, exc, msg)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(scoring="relu"), ValueError, "scoring must be one of"),
    (dict(order="sorted"), ValueError, "order must be one of"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(scoring="sigmoid", correction_bias=torch.zeros(3)), ValueError, "correction_bias must have shape"),
])
def test_registered_op_checks_its_arguments(kw, exc, msg):
    """torch.ops.kernswap.moe_route (what torch.compile and users call) refuses bad arguments with the same clear
    messages as the wrapper, on real and on meta tensors (its fake kernel), instead of a bare KeyError or garbage."""
    args = dict(top_k=2, renormalize=True, scoring="softmax", order="softmax_topk", correction_bias=None)
    args.update(kw)
    for device in ("cpu", "meta"):
        logits = torch.randn(5, 8, device=device)
        if args["correction_bias"] is not None:
            args["correction_bias"] = args["correction_bias"].to(device)
        with pytest.raises(exc) as ei:
            torch.ops.kernswap.moe_route(logits, args["top_k"], args["renormalize"], args["scoring"], args["order"],
                                         args["correction_bias"], "auto")
        assert "torch.ops.kernswap.moe_route" in str(ei.value) and msg in str(ei.value), str(ei.value)
