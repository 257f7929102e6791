"""Fuzz (issue 9): random and adversarial inputs through every entry path of every op -- the wrappers
(kernswap.ops.*), the registered ops (torch.ops.kernswap.*), the modules (QuantLinear, FusedExperts) with tampered
buffers -- each batch of kernel calls in a child process (tests/isolated.py), so a crash is a failed case, not a
dead test run. Every case ends in a clear exception (ValueError / TypeError / RuntimeError / NotImplementedError
whose message names the function and the argument) or in a result matching the reference backend within the
tolerances of the op's own tests (conftest's quant_tolerance, test_block_sparse_attention's oracle rule, the MoE
tests' bounds).

Shapes, dtypes, formats, CPU tiers and entry paths are drawn by hypothesis (derandomised: the same cases every
run). KERNSWAP_FUZZ_EXAMPLES=N draws N examples per property (default 12, a few seconds; 2000 for a long run,
then seeded at random)."""
import dataclasses
import os

import pytest
import torch

from isolated import run_cases

EXAMPLES = int(os.environ.get("KERNSWAP_FUZZ_EXAMPLES", "12"))
CLEAR = ("ValueError", "TypeError", "RuntimeError", "NotImplementedError")
# a clear message starts with the function (or container) it comes from
NAMES = ("quantized_linear", "block_sparse_attention", "moe_", "fused_moe", "torch.ops.kernswap.", "QuantizedWeight",
         "QuantizedExperts", "FusedExperts", "QuantLinear", "qlinear")


def clear(e: BaseException) -> bool:
    return type(e).__name__ in CLEAR and str(e).startswith(NAMES)


# ------------------------------------------------------------------------------------------ oracles
def ql_check(out, x, qw, bias):
    """quantized linear output against the same-format reference, conftest's tolerance."""
    from conftest import assert_within, quant_tolerance
    from kernswap.reference import reference_linear

    x2d = x.reshape(-1, qw.in_features)
    ref = reference_linear(x2d, qw, bias)
    assert_within(out.reshape(ref.shape), ref, quant_tolerance(x2d, qw, ref, bias), "fuzz quantized_linear")


def moe_check(out, ref, quantized=None):
    """The MoE tests' bounds: fp32 1e-5 (relative to max |ref|), half precision 2 eps, quantized experts a
    relative norm of 1e-5 (weight-only) or 1e-3 (dynamic activations)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    if quantized is not None:
        tol = 1e-3 if quantized.dynamic_activations else 1e-5
        bound = tol * ref.float().norm() + (torch.finfo(ref.dtype).eps * ref.float().norm() if ref.dtype != torch.float32 else 0)
        assert (out.float() - ref.float()).norm() <= bound, "fuzz moe (quantized)"
        return
    eps = 1e-5 if ref.dtype == torch.float32 else 2 * torch.finfo(ref.dtype).eps
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps * scale)


def attn_check(out, lse, q, k, v, mask, bs, causal, scale):
    from test_block_sparse_attention import check_against_oracle

    check_against_oracle(out, lse, q, k, v, mask, bs, causal, scale, "fuzz attention")


def outcome(call, check):
    """'ok' when call() returns a result that check() accepts; a clear exception is re-raised for the parent to
    judge; anything else fails."""
    try:
        out = call()
    except Exception as e:  # noqa: BLE001
        if clear(e):
            raise
        raise AssertionError(f"unclear {type(e).__name__}: {e}") from e
    check(out)
    return "ok"


# ------------------------------------------------------------------------------------------ hypothesis draws
def _settings():
    """Derandomised by default (the same examples every run); a long run draws at random, or from
    KERNSWAP_FUZZ_SEED when it is set (to replay one)."""
    from hypothesis import HealthCheck, seed, settings

    fixed = os.environ.get("KERNSWAP_FUZZ_SEED")
    s = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 50 and not fixed,
                 suppress_health_check=list(HealthCheck), print_blob=True)
    return (lambda f: s(seed(int(fixed))(f))) if fixed else s


def seed(data) -> None:
    """torch's generator seeded from the draw: an example's tensors replay with it (hypothesis shrinks and
    reports reproducible failures)."""
    from hypothesis import strategies as st

    torch.manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))


def _isa(draw):
    from hypothesis import strategies as st
    from conftest import ISAS

    return draw(st.sampled_from([None] + list(ISAS)))


def _fmt(draw, k_choices):
    """(QuantConfig name, QuantConfig, K) with K valid for the format."""
    from hypothesis import strategies as st
    from conftest import FORMATS

    name = draw(st.sampled_from(sorted(FORMATS)))
    cfg = FORMATS[name]
    if cfg.weight_bits == 4:
        return name, cfg, cfg.group_size * draw(st.integers(1, 3))
    return name, cfg, draw(st.sampled_from(k_choices))


def prop_quantized_linear():
    """Valid random calls through the wrapper, the registered op and QuantLinear (no_grad / inference_mode),
    every tier, every format, 1-3-D and transposed x: the reference's result."""
    from hypothesis import given, strategies as st
    from conftest import DTYPES, use_isa
    from kernswap import ops
    from kernswap.nn import QuantLinear

    @_settings()
    @given(st.data())
    def run(data):
        seed(data)
        name, cfg, k = _fmt(data.draw, [1, 3, 17, 64, 130, 257])
        n = data.draw(st.integers(1, 70), label="N")
        m = data.draw(st.sampled_from([0, 1, 2, 5, 16, 33]), label="M")
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        entry = data.draw(st.sampled_from(["wrapper", "op", "module", "module_inference"]), label="entry")
        backend = data.draw(st.sampled_from(["auto", "cpu", "reference"]), label="backend")
        lin = torch.nn.Linear(k, n, bias=data.draw(st.booleans(), label="bias"))
        q = QuantLinear.from_linear(lin, dataclasses.replace(cfg, backend=backend))
        qw, bias = q.qweight, None if q.bias is None else q.bias.detach()
        x = torch.randn(m, k).to(dtype)
        if data.draw(st.booleans(), label="transposed"):
            x = torch.randn(k, m).to(dtype).t()
        if data.draw(st.booleans(), label="3-D"):
            x = x.unsqueeze(0)
        with use_isa(_isa(data.draw)):
            if entry == "wrapper":
                call = lambda: ops.quantized_linear(x, qw, bias, backend=backend)  # noqa: E731
            elif entry == "op":
                x2d = x.reshape(-1, k)
                call = lambda: torch.ops.kernswap.quantized_linear(  # noqa: E731
                    x2d, qw.packed, qw.scale, qw.zero, bias, qw.bits, qw.group_size, k, n, qw.dynamic_activations,
                    backend)
            else:
                guard = torch.no_grad() if entry == "module" else torch.inference_mode()

                def call():
                    with guard:
                        return q(x)
            outcome(call, lambda out: ql_check(out, x, qw, bias))

    run()
    return "ok"


def prop_quantized_linear_inconsistent():
    """torch.ops.kernswap.quantized_linear with random, mostly inconsistent, sizes (in/out features, group size,
    bits, bias length, x width) over a real packed weight: a clear error, or the reference's result when the
    draw happens to be consistent."""
    from hypothesis import given, strategies as st
    from conftest import use_isa
    from kernswap.formats import QuantizedWeight, quantize

    @_settings()
    @given(st.data())
    def run(data):
        seed(data)
        name, cfg, k = _fmt(data.draw, [64, 100])
        n = data.draw(st.integers(1, 40), label="N")
        qw = quantize(torch.randn(n, k), cfg)
        kk = data.draw(st.sampled_from([k, k, k - 1, k + 32, 2 * k, 1]), label="in_features")
        nn_ = data.draw(st.sampled_from([n, n, n + 1, n + 16, 3 * n + 17, 1]), label="out_features")
        g = data.draw(st.sampled_from([qw.group_size, qw.group_size, 32, 64, 128, kk]), label="group_size")
        bits = data.draw(st.sampled_from([qw.bits, qw.bits, 12 - qw.bits]), label="bits")
        bias = data.draw(st.sampled_from([None, n, nn_, nn_ - 1]), label="bias")
        b = None if bias is None or bias <= 0 else torch.randn(bias)
        xk = data.draw(st.sampled_from([kk, k, kk + 1]), label="x width")
        x = torch.randn(3, max(xk, 1))
        with use_isa(_isa(data.draw)):
            def call():
                return torch.ops.kernswap.quantized_linear(x, qw.packed, qw.scale, qw.zero, b, bits, g, kk, nn_,
                                                           qw.dynamic_activations, "auto")

            def check(out):  # it ran: the arguments were consistent, so they describe a valid weight
                w = QuantizedWeight(qw.packed, qw.scale, qw.zero, bits, g, qw.zero is None or bits == 8, kk, nn_,
                                    qw.dynamic_activations)
                ql_check(out, x, w, b)
            try:
                outcome(call, check)
            except Exception as e:  # noqa: BLE001
                assert clear(e), f"unclear {type(e).__name__}: {e}"

    run()
    return "ok"


def prop_attention():
    """Valid random calls (batch, GQA groups, Sq <= Sk for causal, head dims with and without a kernel, block
    sizes, broadcast masks, transposed layouts, dtypes, tiers) through the wrapper and the registered op."""
    from hypothesis import given, strategies as st
    from conftest import DTYPES, use_isa
    from kernswap import ops

    @_settings()
    @given(st.data())
    def run(data):
        seed(data)
        b, hkv = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="Hkv")
        hq = hkv * data.draw(st.integers(1, 3), label="group")
        causal = data.draw(st.booleans(), label="causal")
        sk = data.draw(st.integers(1, 90), label="Sk")
        sq = data.draw(st.integers(1, sk), label="Sq") if causal else data.draw(st.integers(1, 90), label="Sq")
        d = data.draw(st.sampled_from([64, 64, 128, 32]), label="D")
        bs = data.draw(st.sampled_from([16, 32, 64]), label="block_size")
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        nqb, nkb = -(-sq // bs), -(-sk // bs)
        mb, mh = data.draw(st.sampled_from([1, b]), label="mask B"), data.draw(st.sampled_from([1, hq]), label="mask H")
        mask = torch.rand(mb, mh, nqb, nkb) < data.draw(st.floats(0.0, 1.0), label="density")
        if data.draw(st.booleans(), label="transposed"):
            q, k, v = (torch.randn(b, s, h, d).to(dtype).transpose(1, 2) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
        else:
            q, k, v = (torch.randn(b, h, s, d).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
        scale = d ** -0.5
        backend = data.draw(st.sampled_from(["auto", "cpu", "reference"]) if d != 32 else st.just("auto"))
        entry = data.draw(st.sampled_from(["wrapper", "op"]), label="entry")
        with use_isa(_isa(data.draw)):
            if entry == "wrapper":
                call = lambda: ops.block_sparse_attention(q, k, v, mask, block_size=bs, causal=causal,  # noqa: E731
                                                          scale=scale, backend=backend, return_lse=True)
            else:
                call = lambda: torch.ops.kernswap.block_sparse_attention(  # noqa: E731
                    q, k, v, mask, bs, causal, scale, backend)
            outcome(call, lambda r: attn_check(r[0], r[1], q, k, v, mask, bs, causal, scale))

    run()
    return "ok"


def _routing_logits(t, e, dtype):
    """Router logits whose top-k is far from a tie (a tie's order is the only freedom a kernel has)."""
    ranks = torch.stack([torch.randperm(e) for _ in range(t)]) if t else torch.zeros(0, e)
    return (ranks.float() * 0.25 + torch.rand(t, e) * 0.01).to(dtype)


def prop_moe():
    """Valid random MoE layers (float or quantized experts, routing modes, pre-routed or logits) through
    ops.fused_moe, torch.ops.kernswap.fused_moe, FusedExperts (no_grad) and the piecewise ops."""
    from hypothesis import given, strategies as st
    from conftest import FORMATS
    from kernswap import ops
    from kernswap.formats.experts import experts_to_args, quantize_experts
    from kernswap.nn import FusedExperts
    from kernswap.reference.moe import fused_experts_ref, moe_route_ref

    @_settings()
    @given(st.data())
    def run(data):
        seed(data)
        t, e = data.draw(st.integers(0, 20), label="T"), data.draw(st.integers(1, 9), label="E")
        k = data.draw(st.integers(1, e), label="top_k")
        fmt = data.draw(st.sampled_from([None, None, "int8", "w8a8", "int4-g32", "w4a8-g32-asym"]), label="fmt")
        if fmt is None:
            h, i = data.draw(st.integers(1, 80), label="H"), data.draw(st.integers(1, 48), label="I")
            dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="dtype")
        else:
            h, i = 32 * data.draw(st.integers(1, 3), label="H/32"), 32 * data.draw(st.integers(1, 2), label="I/32")
            dtype = torch.float32
        x = torch.randn(t, h).to(dtype)
        wgu, wd = (torch.randn(e, 2 * i, h) / h ** 0.5).to(dtype), (torch.randn(e, h, i) / i ** 0.5).to(dtype)
        if fmt is not None:
            wgu, wd = quantize_experts(wgu, FORMATS[fmt]), quantize_experts(wd, FORMATS[fmt])
        scoring = data.draw(st.sampled_from(["softmax", "sigmoid"]), label="scoring")
        order = data.draw(st.sampled_from(["softmax_topk", "topk_softmax"]), label="order")
        renorm = data.draw(st.booleans(), label="renormalize")
        bias = torch.randperm(e).float() * 2.0 if scoring == "sigmoid" and data.draw(st.booleans()) else None
        lg = _routing_logits(t, e, dtype)
        tw, ti = moe_route_ref(lg, k, renorm, scoring, order, bias)
        ti = ti.to(data.draw(st.sampled_from([torch.int32, torch.int64]), label="id dtype"))
        ref = fused_experts_ref(x, tw, ti, wgu, wd)
        entry = data.draw(st.sampled_from(["wrapper", "wrapper routed", "op", "module", "pieces"]), label="entry")
        backend = data.draw(st.sampled_from(["auto", "cpu", "reference"]), label="backend")
        if entry == "wrapper":
            call = lambda: ops.fused_moe(x, lg, wgu, wd, k, renormalize=renorm, scoring=scoring,  # noqa: E731
                                         order=order, correction_bias=bias, backend=backend)
        elif entry == "wrapper routed":
            call = lambda: ops.fused_moe(x, None, wgu, wd, k, topk_weights=tw, topk_ids=ti, backend=backend)  # noqa
        elif entry == "op":
            call = lambda: torch.ops.kernswap.fused_moe(  # noqa: E731
                x, lg, None, None, *experts_to_args(wgu, wd), k, renorm, scoring, order, bias, backend)
        elif entry == "module":
            fe = FusedExperts(e, h, i, quant=None if fmt is None else FORMATS[fmt], backend=backend, dtype=dtype)
            if fmt is None:
                fe.gate_up_proj.data, fe.down_proj.data = wgu, wd
            else:
                fe.load_quantized(wgu, wd)

            def call():
                with torch.no_grad():
                    return fe(x, ti, tw)
        else:
            def call():
                s, o = ops.moe_align(ti, e, backend=backend)
                pair = ops.moe_experts(x, s, o, wgu, wd, k, backend=backend)
                return ops.moe_combine(pair, tw, backend=backend).to(dtype)
        outcome(call, lambda out: moe_check(out, ref, None if fmt is None else wgu))

    run()
    return "ok"


def properties():
    yield "quantized_linear", prop_quantized_linear
    yield "quantized_linear inconsistent", prop_quantized_linear_inconsistent
    yield "block_sparse_attention", prop_attention
    yield "moe", prop_moe


@pytest.fixture(scope="module")
def property_results():
    return run_cases("test_fuzz", "properties", timeout=3600)


@pytest.mark.parametrize("name", [n for n, _ in properties()])
def test_property(property_results, name):
    rec = property_results.get(name) or {"crashed": f"not reached: {sorted(property_results)}"}
    assert "crashed" not in rec, rec["crashed"]
    assert rec.get("returned") == "ok", rec


# ------------------------------------------------------------------------------------------ adversarial cases
from fuzz_cases import ADVERSARIAL  # noqa: E402  (the issue's cases, one callable each)


def adversarial():
    for case_id, fn, _ in ADVERSARIAL:
        yield case_id, fn


@pytest.fixture(scope="module")
def adversarial_results():
    return run_cases("test_fuzz", "adversarial", timeout=1200)


@pytest.mark.parametrize("case_id,expect", [(c[0], c[2]) for c in ADVERSARIAL], ids=[c[0] for c in ADVERSARIAL])
def test_adversarial(adversarial_results, case_id, expect):
    """expect: "ok" (the reference's result: a tampered buffer is followed, never read stale) or a substring of a
    clear exception's message."""
    rec = adversarial_results.get(case_id) or {"crashed": f"not reached: {sorted(adversarial_results)}"}
    assert "crashed" not in rec, rec["crashed"]
    if expect == "ok":
        assert rec.get("returned") == "ok", rec
        return
    assert rec.get("exc") in CLEAR and rec["msg"].startswith(NAMES), rec
    assert expect in rec["msg"], rec["msg"]
