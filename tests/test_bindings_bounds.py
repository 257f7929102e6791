"""The kernswap._C bindings defend themselves: every buffer arrives with its element count, and sizes, strides or
contents that would address memory outside a buffer raise ValueError naming the argument, the expected and the
received value, before any kernel runs. The raw calls run in a child process (tests/isolated.py): a missing
check is then a failed case, not a dead test run."""
import pytest
import torch

from conftest import HAVE_C, NO_C_REASON
from isolated import run_cases

pytestmark = pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)


def _b(t):
    """(address, element count) of a tensor, as the bindings take a buffer."""
    return t.data_ptr(), t.numel()


def _qlinear_kw(fmt="int4-g64-asym", m=3, n=24, k=64):
    from kernswap.formats import quantize
    from conftest import FORMATS

    qw = quantize(torch.randn(n, k), FORMATS[fmt])
    x, y, bias = torch.randn(m, k), torch.empty(m, n), torch.randn(n)
    keep = (qw, x, y, bias)
    kw = dict(x_ptr=x.data_ptr(), x_numel=x.numel(), x_dtype=0, M=m, K=k, x_row_stride=k,
              packed_ptr=qw.packed.data_ptr(), packed_numel=qw.packed.numel(), bits=qw.bits,
              group_size=qw.group_size, N=n, scale_ptr=qw.scale.data_ptr(), scale_numel=qw.scale.numel(),
              zero_ptr=0 if qw.zero is None else qw.zero.data_ptr(), zero_numel=0 if qw.zero is None else qw.zero.numel(),
              zero_is_float=qw.zero is not None and qw.zero.is_floating_point(),
              bias_ptr=bias.data_ptr(), bias_numel=n, y_ptr=y.data_ptr(), y_numel=y.numel(), y_dtype=0,
              y_row_stride=n, dynamic_act=False, num_threads=1)
    return kw, keep


def _attn_kw(b=1, hq=2, hkv=1, sq=20, sk=40, d=64, bs=16):
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    nq, nk = -(-sq // bs), -(-sk // bs)
    mask = torch.ones(b, hq, nq, nk, dtype=torch.bool)
    out, lse = torch.empty(b, hq, sq, d), torch.empty(b, hq, sq)
    st = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    kw = dict(q_ptr=q.data_ptr(), q_numel=q.numel(), k_ptr=k.data_ptr(), k_numel=k.numel(), v_ptr=v.data_ptr(),
              v_numel=v.numel(), dtype=0, B=b, Hq=hq, Hkv=hkv, Sq=sq, Sk=sk, D=d, q_stride=st(q), k_stride=st(k),
              v_stride=st(v), mask_ptr=mask.data_ptr(), mask_numel=mask.numel(), mask_stride=mask.stride(),
              block_size=bs, causal=True, scale=d ** -0.5, out_ptr=out.data_ptr(), out_numel=out.numel(),
              lse_ptr=lse.data_ptr(), lse_numel=lse.numel(), num_threads=1)
    return kw, (q, k, v, mask, out, lse)


def _experts_kw(quant=False, t=4, e=3, k=2, h=32, i=32):
    from kernswap.backends import moe_cpu
    from kernswap.formats.experts import quantize_experts

    x = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
    s, o = moe_cpu.align(ids, e)
    wgu, wd = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    if quant:
        from kernswap import QuantConfig

        wgu, wd = quantize_experts(wgu, QuantConfig(4, 32)), quantize_experts(wd, QuantConfig(4, 32))
    keep, wgu_b, wd_b, wdt, qg, qd, inter = moe_cpu._weight_args(wgu, wd)
    out = torch.empty(t * k, h)
    kw = dict(x_ptr=x.data_ptr(), x_numel=x.numel(), x_dtype=0, T=t, H=h, I=inter, E=e, top_k=k, x_row_stride=h,
              sorted_ptr=s.data_ptr(), sorted_numel=s.numel(), offsets_ptr=o.data_ptr(), offsets_numel=o.numel(),
              w_gate_up_ptr=wgu_b[0], w_gate_up_numel=wgu_b[1], w_down_ptr=wd_b[0], w_down_numel=wd_b[1],
              w_dtype=wdt, q_gate_up=qg, q_down=qd, sorted_out_ptr=out.data_ptr(), sorted_out_numel=out.numel(),
              num_threads=1)
    return kw, (x, s, o, keep, out)


def _call(entry, make, **over):
    def run():
        from kernswap import _ext

        kw, keep = make()
        for name, v in over.items():
            kw[name] = v(kw, keep) if callable(v) else v
        getattr(_ext.get_C(), entry)(**kw)
        return "no error"
    return run


def _q(tup, **kw):
    """A q_gate_up / q_down tuple with some fields replaced (names of bind_moe.cpp's QTuple)."""
    names = ("packed_ptr", "packed_numel", "packed_stride", "scale_ptr", "scale_numel", "scale_stride", "zero_ptr",
             "zero_numel", "zero_stride", "bits", "group_size", "dynamic_act")
    d = dict(zip(names, tup))
    d.update(kw)
    return tuple(d[n] for n in names)


def _route(logits_numel=None, bias_numel=8, weights_numel=None, ids_numel=None, t=5, e=8, k=2):
    def run():
        from kernswap import _ext

        lg, bias, w, ids = torch.randn(t, e), torch.randn(e), torch.empty(t, k), torch.empty(t, k, dtype=torch.int32)
        _ext.get_C().moe_route(lg.data_ptr(), lg.numel() if logits_numel is None else logits_numel, t, e, e, k, 2,
                               True, bias.data_ptr(), bias_numel, w.data_ptr(),
                               w.numel() if weights_numel is None else weights_numel, ids.data_ptr(),
                               ids.numel() if ids_numel is None else ids_numel, 1)
        return "no error"
    return run


def _align(ids_numel=6, sorted_numel=6, offsets_numel=5):
    def run():
        from kernswap import _ext

        ids, s, o = torch.zeros(6, dtype=torch.int32), torch.empty(6, dtype=torch.int32), torch.empty(5, dtype=torch.int32)
        _ext.get_C().moe_align(ids.data_ptr(), ids_numel, 6, 4, s.data_ptr(), sorted_numel, o.data_ptr(), offsets_numel)
        return "no error"
    return run


def _combine(rows=8, pos=None, weights_numel=8, out_rows=4):
    def run():
        from kernswap import _ext

        r, w, out = torch.randn(rows, 16), torch.rand(4, 2), torch.empty(out_rows, 16)
        p = None if pos is None else torch.tensor(pos, dtype=torch.int32)
        _ext.get_C().moe_combine(r.data_ptr(), r.numel(), 16, 0 if p is None else p.data_ptr(),
                                 0 if p is None else p.numel(), w.data_ptr(), weights_numel, 4, 2, 16, out.data_ptr(),
                                 out.numel(), 0, 16, 1)
        return "no error"
    return run


def _sgemm(entry, a_numel=None, b_numel=None, c_numel=None, lda=7):
    def run():
        from kernswap import _ext

        a, b, c = torch.randn(5, 7), torch.randn(7, 9), torch.empty(5, 9)
        if entry == "sgemm_nt":
            b = torch.randn(9, 7)
        _ext.get_C().__getattribute__(entry)(5, 9, 7, a.data_ptr(), a.numel() if a_numel is None else a_numel, lda,
                                             b.data_ptr(), b.numel() if b_numel is None else b_numel, b.stride(0),
                                             c.data_ptr(), c.numel() if c_numel is None else c_numel, 9, False)
        return "no error"
    return run


def _qdequant(out_rows=10, n1=10, scale_cut=0):
    def run():
        from kernswap import _ext
        from kernswap.formats import quantize

        qw = quantize(torch.randn(24, 64), "int8")
        out = torch.empty(out_rows, 64)
        _ext.get_C().qdequant(qw.packed.data_ptr(), qw.packed.numel(), 8, 64, 24, 64, qw.scale.data_ptr(),
                              qw.scale.numel() - scale_cut, 0, 0, False, 0, n1, out.data_ptr(), out.numel(), 64, 1)
        return "no error"
    return run


# (case id, call, substring of the ValueError's message)
CASES = [
    # quantized linear: out_features larger than the packed weight, short scale / zero / bias, x or y too small
    ("qlinear N past packed", _call("qlinear", _qlinear_kw, N=64, y_numel=3 * 64, y_row_stride=64),
     "qlinear: packed_numel must be >= "),
    ("qlinear int8 N past packed", _call("qlinear", lambda: _qlinear_kw("int8"), N=40, y_row_stride=40, y_numel=120,
                                         bias_ptr=0), "packed_numel must be >= "),
    ("qlinear short scale", _call("qlinear", _qlinear_kw, scale_numel=lambda kw, _: kw["scale_numel"] - 1),
     "scale_numel must be >= 32 elements (bits=4, group_size=64, N=24, K=64), got 31"),
    ("qlinear short zero", _call("qlinear", _qlinear_kw, zero_numel=10), "zero_numel must be >= 32"),
    ("qlinear short bias", _call("qlinear", _qlinear_kw, bias_numel=23), "bias_numel must be >= 24 elements (N=24), got 23"),
    ("qlinear K past x", _call("qlinear", _qlinear_kw, K=128, x_row_stride=128), "qlinear: "),
    ("qlinear short x", _call("qlinear", _qlinear_kw, x_numel=100), "x_numel must be >= 192 elements (M=3, K=64"),
    ("qlinear M past x", _call("qlinear", _qlinear_kw, M=4), "x_numel must be >= 256"),
    ("qlinear short y", _call("qlinear", _qlinear_kw, y_numel=71), "y_numel must be >= 72"),
    ("qlinear y rows overlap", _call("qlinear", _qlinear_kw, y_row_stride=10), "y_row_stride must be >= 24, got 10"),
    ("qlinear negative x stride", _call("qlinear", _qlinear_kw, x_row_stride=-64), "strides must be >= 0"),
    ("qlinear overflow", _call("qlinear", _qlinear_kw, M=2 ** 62, x_row_stride=2 ** 40, y_row_stride=2 ** 40),
     "overflows 64 bits"),
    ("qlinear null x", _call("qlinear", _qlinear_kw, x_ptr=0), "x_numel: null address"),
    ("qlinear bad group", _call("qlinear", _qlinear_kw, group_size=48), "int4 needs group_size"),
    ("qlinear int8 zero", _call("qlinear", lambda: _qlinear_kw("int8"), zero_ptr=lambda kw, keep: keep[1].data_ptr(),
                                zero_numel=4096), "zero points are for int4 only"),
    ("qlinear bits", _call("qlinear", _qlinear_kw, bits=2), "bits must be 8 or 4, got 2"),
    ("qdequant out", _qdequant(out_rows=9), "out_numel must be >= 640"),
    ("qdequant rows", _qdequant(n1=25), "0 <= n0 <= n1 <= N=24"),
    ("qdequant scale", _qdequant(scale_cut=1), "scale_numel must be >= 32"),
    # attention: k/v with fewer tokens or a smaller head dim, a mask smaller than the block grid, short outputs
    ("attention k tokens", _call("block_sparse_attention", _attn_kw, Sk=50, causal=False), "k_numel must be >= "),
    ("attention v head dim", _call("block_sparse_attention", _attn_kw,
                                   v_numel=lambda kw, _: kw["v_numel"] // 2), "v_numel must be >= 2560"),
    ("attention q short", _call("block_sparse_attention", _attn_kw, q_numel=100), "q_numel must be >= 2560"),
    ("attention mask grid", _call("block_sparse_attention", _attn_kw, mask_numel=4), "mask_numel must be >= 12 elements (B=1, Hq=2, query blocks=2, key blocks=3"),
    ("attention mask batch", _call("block_sparse_attention", _attn_kw, B=2, q_stride=(0, 1280, 64), k_stride=(0, 2560, 64),
                                   v_stride=(0, 2560, 64), out_numel=10 ** 6, lse_numel=10 ** 6), "mask_numel must be >= "),
    ("attention out short", _call("block_sparse_attention", _attn_kw, out_numel=10), "out_numel must be >= 2560"),
    ("attention lse short", _call("block_sparse_attention", _attn_kw, lse_numel=39), "lse_numel must be >= 40"),
    ("attention negative stride", _call("block_sparse_attention", _attn_kw, k_stride=(2560, 2560, -64)),
     "strides must be >= 0"),
    ("attention gqa", _call("block_sparse_attention", _attn_kw, Hkv=3), "must be a multiple of Hkv=3"),
    # routing, alignment
    ("route short bias", _route(bias_numel=7), "moe_route: bias_numel must be >= 8 elements (E=8), got 7"),
    ("route short logits", _route(logits_numel=39), "logits_numel must be >= 40"),
    ("route short weights", _route(weights_numel=9), "weights_numel must be >= 10"),
    ("route short ids", _route(ids_numel=0), "ids_numel must be >= 10"),
    ("align short ids", _align(ids_numel=5), "moe_align: ids_numel must be >= 6"),
    ("align short sorted", _align(sorted_numel=5), "sorted_numel must be >= 6"),
    ("align short offsets", _align(offsets_numel=4), "offsets_numel must be >= 5"),
    # experts: negative / too large pair ids, offsets past the end or for more experts than there are weights
    ("experts negative id", _call("moe_experts", _experts_kw,
                                  sorted_ptr=lambda kw, keep: _set(keep[1], 0, -5)), "must be in [0, T * top_k = 8), got -5"),
    ("experts id past pairs", _call("moe_experts", _experts_kw,
                                    sorted_ptr=lambda kw, keep: _set(keep[1], 3, 8)), "sorted_pair_ids[3] must be in"),
    ("experts offsets past end", _call("moe_experts", _experts_kw,
                                       offsets_ptr=lambda kw, keep: _set(keep[2], 3, 50)), "sorted_numel must be >= 50"),
    # offsets [0, total, 0, total]: decreasing whatever the random routing gave each expert, and all in range
    ("experts offsets decrease", _call("moe_experts", _experts_kw,
                                       offsets_ptr=lambda kw, keep: (_set(keep[2], 1, int(keep[2][3])),
                                                                     _set(keep[2], 2, 0))[-1]), "must not decrease"),
    ("experts offsets start", _call("moe_experts", _experts_kw,
                                    offsets_ptr=lambda kw, keep: _set(keep[2], 0, 1)), "expert_offsets[0] must be 0"),
    ("experts short offsets", _call("moe_experts", _experts_kw, offsets_numel=3), "offsets_numel must be >= 4"),
    ("experts more experts than weights", _call("moe_experts", _experts_kw, E=5, offsets_numel=6),
     "w_gate_up_numel must be >= "),
    ("experts wider than weights", _call("moe_experts", _experts_kw, I=40), "w_gate_up_numel must be >= "),
    ("experts short x", _call("moe_experts", _experts_kw, x_numel=100), "x_numel must be >= 128"),
    ("experts short out", _call("moe_experts", _experts_kw, sorted_out_numel=100), "sorted_out_numel must be >= 256"),
    ("experts q packed", _call("moe_experts", lambda: _experts_kw(True),
                               q_gate_up=lambda kw, _: _q(kw["q_gate_up"], packed_numel=100)),
     "q_gate_up.packed_numel must be >= "),
    ("experts q scale", _call("moe_experts", lambda: _experts_kw(True),
                              q_down=lambda kw, _: _q(kw["q_down"], scale_numel=kw["q_down"][4] - 1)),
     "q_down.scale_numel must be >= "),
    ("experts q more experts", _call("moe_experts", lambda: _experts_kw(True), E=4, offsets_numel=5,
                                     offsets_ptr=lambda kw, keep: _grow(keep)), "q_gate_up.packed_numel must be >= "),
    ("experts q group", _call("moe_experts", lambda: _experts_kw(True),
                              q_down=lambda kw, _: _q(kw["q_down"], group_size=24)), "int4 needs group_size"),
    ("experts float vs quant", _call("moe_experts", lambda: _experts_kw(True),
                                     q_down=lambda kw, _: _q(kw["q_down"], bits=0)), "must both be quantized or both float"),
    # combine: fewer rows than tokens * top_k, positions past the rows, short weights / output
    ("combine fewer rows", _combine(rows=7), "moe_combine: rows_numel must be >= 128"),
    ("combine pos past rows", _combine(pos=[0, 1, 2, 3, 4, 5, 6, 8]), "pos[7]=8 addresses a row past rows_numel=128"),
    ("combine short pos", _combine(pos=[0, 1, 2]), "pos_numel must be >= 8"),
    ("combine short weights", _combine(weights_numel=7), "weights_numel must be >= 8"),
    ("combine short out", _combine(out_rows=3), "out_numel must be >= 64"),
    # the test-only GEMM
    ("sgemm_nn short a", _sgemm("sgemm_nn", a_numel=34), "sgemm_nn: a_numel must be >= 35"),
    ("sgemm_nn short b", _sgemm("sgemm_nn", b_numel=62), "b_numel must be >= 63"),
    ("sgemm_nt short b", _sgemm("sgemm_nt", b_numel=62), "sgemm_nt: b_numel must be >= 63"),
    ("sgemm short c", _sgemm("sgemm_nn", c_numel=44), "c_numel must be >= 45"),
    ("sgemm lda", _sgemm("sgemm_nn", lda=8), "a_numel must be >= 39"),
]


def _set(t, i, v):
    t[i] = v
    return t.data_ptr()


def _grow(keep):
    """The address of the offsets with one more (empty) expert appended (kept alive in _KEEP)."""
    o = keep[2]
    _KEEP.append(torch.cat([o, o[-1:]]))
    return _KEEP[-1].data_ptr()


_KEEP = []


def cases():
    for case_id, fn, _ in CASES:
        yield case_id, fn


def good_cases():
    """The unmodified argument sets run (the bad cases above differ from them in the named argument only)."""
    yield "qlinear", _call("qlinear", _qlinear_kw)
    yield "qlinear int8", _call("qlinear", lambda: _qlinear_kw("int8"))
    yield "attention", _call("block_sparse_attention", _attn_kw)
    yield "route", _route()
    yield "align", _align()
    yield "experts", _call("moe_experts", _experts_kw)
    yield "experts q", _call("moe_experts", lambda: _experts_kw(True))
    yield "combine", _combine()
    yield "combine pos", _combine(pos=[0, 1, 2, 3, 4, 5, 6, 7])
    yield "sgemm_nn", _sgemm("sgemm_nn")
    yield "sgemm_nt", _sgemm("sgemm_nt")
    yield "qdequant", _qdequant()


@pytest.fixture(scope="module")
def results():
    return run_cases("test_bindings_bounds", "cases")


@pytest.mark.parametrize("case_id,substr", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_inconsistent_sizes_raise(results, case_id, substr):
    rec = results.get(case_id) or {"crashed": f"not reached: {results}"}
    assert "crashed" not in rec, rec["crashed"]
    assert rec.get("exc") == "ValueError", rec
    assert substr in rec["msg"], rec["msg"]


def test_consistent_sizes_run():
    recs = run_cases("test_bindings_bounds", "good_cases")
    assert len(recs) == 12, recs
    for case_id, rec in recs.items():
        assert rec.get("returned") == "no error", (case_id, rec)
