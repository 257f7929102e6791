"""The kernswap._C_cuda bindings check their buffers as the CPU ones do (bind_checks.h): every buffer arrives
with its element count, and sizes or strides that would address outside one raise ValueError naming the
argument before anything is launched. The checks run before any CUDA call, so they are tested here without a
GPU (the addresses are host tensors', never read), each call in a child process (tests/isolated.py)."""
import pytest
import torch

from isolated import run_cases

try:
    from kernswap import _ext

    _HAVE = _ext.get_C_cuda() is not None
except Exception:  # noqa: BLE001
    _HAVE = False
pytestmark = pytest.mark.skipif(not _HAVE, reason="kernswap._C_cuda not built")

_KEEP = []


def _qgemv_kw(fmt="int4-g64-asym", m=3, n=24, k=64):
    from conftest import FORMATS
    from kernswap.formats import quantize

    qw = quantize(torch.randn(n, k), FORMATS[fmt])
    x, y, bias = torch.randn(m, k).bfloat16(), torch.empty(m, n).bfloat16(), torch.randn(n)
    _KEEP.append((qw, x, y, bias))
    return dict(x_ptr=x.data_ptr(), x_numel=x.numel(), x_dtype=1, M=m, K=k, x_row_stride=k,
                packed_ptr=qw.packed.data_ptr(), packed_numel=qw.packed.numel(), bits=qw.bits,
                group_size=qw.group_size if qw.bits == 4 else k, N=n, scale_ptr=qw.scale.data_ptr(),
                scale_numel=qw.scale.numel(), zero_ptr=0 if qw.zero is None else qw.zero.data_ptr(),
                zero_numel=0 if qw.zero is None else qw.zero.numel(), zero_is_float=False, bias_ptr=bias.data_ptr(), bias_numel=n,
                y_ptr=y.data_ptr(), y_numel=y.numel(), y_dtype=1, y_row_stride=n, stream=0)


def _align_kw():
    ids, s, o, ws = (torch.zeros(10, dtype=torch.int32), torch.empty(70, dtype=torch.int32),
                     torch.empty(5, dtype=torch.int32), torch.empty(4, dtype=torch.int32))
    _KEEP.append((ids, s, o, ws))
    return dict(ids_ptr=ids.data_ptr(), ids_numel=10, num_pairs=10, num_experts=4, block_size=16,
                sorted_ptr=s.data_ptr(), sorted_len=70, offsets_ptr=o.data_ptr(), offsets_numel=5,
                ws_ptr=ws.data_ptr(), ws_elems=4, stream=0)


def _call(entry, make, **over):
    def run():
        kw = make()
        kw.update(over)
        getattr(_ext.get_C_cuda(), entry)(**kw)
        return "no error"
    return run


CASES = [
    ("qgemv packed short", _call("qgemv", _qgemv_kw, packed_numel=100), "packed_numel must be >="),
    ("qgemv N past packed", _call("qgemv", _qgemv_kw, N=40), "packed_numel must be >="),
    ("qgemv scale short", _call("qgemv", _qgemv_kw, scale_numel=3), "scale_numel must be >="),
    ("qgemv zero short", _call("qgemv", _qgemv_kw, zero_numel=3), "zero_numel must be >="),
    ("qgemv bias short", _call("qgemv", _qgemv_kw, bias_numel=5), "bias_numel must be >="),
    ("qgemv x short", _call("qgemv", _qgemv_kw, x_numel=64), "x_numel must be >="),
    ("qgemv x stride", _call("qgemv", _qgemv_kw, x_row_stride=1000), "x_numel must be >="),
    ("qgemv y short", _call("qgemv", _qgemv_kw, y_numel=10), "y_numel must be >="),
    ("qgemv y rows overlap", _call("qgemv", _qgemv_kw, y_row_stride=3), "y_row_stride must be >="),
    ("qgemv bad group", _call("qgemv", _qgemv_kw, group_size=48), "group_size"),
    ("qgemv bits", _call("qgemv", _qgemv_kw, bits=3), "bits must be 8 or 4"),
    ("qgemv int8 zero", _call("qgemv", lambda: _qgemv_kw("int8"), zero_ptr=1, zero_numel=100), "int4 only"),
    ("qgemv negative M", _call("qgemv", _qgemv_kw, M=-1), "M must be >= 0"),
    ("qgemv null packed", _call("qgemv", _qgemv_kw, packed_ptr=0), "null address"),
    ("align ids short", _call("moe_align", _align_kw, ids_numel=9), "ids_numel must be >="),
    ("align offsets short", _call("moe_align", _align_kw, offsets_numel=4), "offsets_numel must be >="),
    ("align sorted short", _call("moe_align", _align_kw, sorted_len=16), "sorted_len"),
    ("align workspace short", _call("moe_align", _align_kw, ws_elems=3), "workspace"),
]


def cases():
    for case_id, fn, _ in CASES:
        yield case_id, fn


def good_cases():
    yield "qgemv", _call("qgemv", _qgemv_kw)
    yield "qgemv int8", _call("qgemv", lambda: _qgemv_kw("int8"))
    yield "align", _call("moe_align", _align_kw)


@pytest.mark.parametrize("case_id,substr", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_inconsistent_sizes_raise(case_id, substr):
    rec = _results().get(case_id) or {"crashed": "not reached"}
    assert "crashed" not in rec, rec["crashed"]
    assert rec.get("exc") == "ValueError", rec
    assert substr in rec["msg"], rec["msg"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="host addresses: only without a GPU, where nothing launches")
def test_consistent_sizes_pass_the_checks():
    """Consistent arguments pass every check and reach the CUDA runtime, which reports no device
    (RuntimeError), instead of a ValueError."""
    recs = run_cases("test_bindings_bounds_cuda", "good_cases")
    assert len(recs) == 3, recs
    for case_id, rec in recs.items():
        assert "crashed" not in rec, (case_id, rec)
        assert rec.get("exc") == "RuntimeError" and "CUDA error" in rec["msg"], (case_id, rec)


_RESULTS = {}


def _results():
    if not _RESULTS:
        _RESULTS.update(run_cases("test_bindings_bounds_cuda", "cases"))
    return _RESULTS
