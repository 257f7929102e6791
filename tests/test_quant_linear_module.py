import copy
import io

import pytest
import torch
import torch.nn as nn

from conftest import FORMATS, assert_raises, sqnr_db
from kernswap import QuantConfig
from kernswap.nn import QuantLinear
from kernswap.ops import quantized_linear


def _linear(k=256, n=40, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k ** -0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4-g64-asym", "w4a8-g128"])
def test_from_linear_forward(fmt, dtype):
    lin = _linear(dtype=dtype)
    q = QuantLinear.from_linear(lin, FORMATS[fmt])
    assert q.bias.dtype == dtype and q.scale.dtype == torch.float32
    assert q.packed.dtype == (torch.int8 if FORMATS[fmt].weight_bits == 8 else torch.uint8)
    x = torch.randn(2, 5, 256).to(dtype)
    y = q(x)
    assert y.shape == (2, 5, 40) and y.dtype == dtype
    torch.testing.assert_close(y, quantized_linear(x, q.qweight, q.bias), rtol=0, atol=0)
    bar = 30 if FORMATS[fmt].weight_bits == 8 and dtype == torch.float32 else 15
    assert sqnr_db(lin.float()(x.float()), y.float()) > bar


def test_no_bias_and_repr():
    q = QuantLinear.from_linear(_linear(bias=False), "int4")
    assert q.bias is None
    r = repr(q)
    assert "format=int4-g128" in r and "in_features=256" in r and "bias=False" in r
    assert q(torch.randn(3, 256)).shape == (3, 40)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g128-asym", "w4a8-g32-asym"])
def test_state_dict_roundtrip(fmt):
    cfg = FORMATS[fmt]
    q = QuantLinear.from_linear(_linear(dtype=torch.bfloat16), cfg)
    sd = q.state_dict()
    assert set(sd) == {"packed", "scale", "bias", "qformat"} | ({"zero"} if not cfg.symmetric else set())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = QuantLinear(256, 40, bias=True, config=cfg, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), q(x))


def test_state_dict_safetensors():
    st = pytest.importorskip("safetensors.torch")
    q = QuantLinear.from_linear(_linear(), QuantConfig(4, 64, symmetric=False))
    fresh = QuantLinear(256, 40, config=QuantConfig(4, 64, symmetric=False))
    fresh.load_state_dict(st.load(st.save({k: v.contiguous() for k, v in q.state_dict().items()})))
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("other", [QuantConfig(4, 128, dynamic_activations=True), QuantConfig(4, 64),
                                   QuantConfig(8), QuantConfig(4, 128, symmetric=False)])
def test_load_into_different_config_raises(other):
    q = QuantLinear.from_linear(_linear(), "int4")
    wrong = QuantLinear(256, 40, config=other)
    with pytest.raises(RuntimeError) as ei:
        wrong.load_state_dict(q.state_dict())
    msg = str(ei.value)
    assert "state_dict format mismatch" in msg and "weight_bits=4, group_size=128" in msg


def test_to_dtype_and_device_keep_packed_and_scale():
    q = QuantLinear.from_linear(_linear(), "int4")
    packed, scale = q.packed.clone(), q.scale.clone()
    x = torch.randn(3, 256)
    y = q(x)
    q.to(torch.bfloat16)
    assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scale)
    assert torch.equal(q.packed, packed) and q.bias.dtype == torch.bfloat16
    q.half().float().double().float()
    assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scale)
    q.to("cpu")
    assert torch.equal(q(x), y.to(torch.float32)) or torch.allclose(q(x), y, atol=1e-2)
    m = copy.deepcopy(q).to("meta")
    assert m.scale.device.type == "meta" and m.scale.dtype == torch.float32 and m.packed.dtype == torch.uint8
    seq = nn.Sequential(QuantLinear.from_linear(_linear(), "w8a8")).to(dtype=torch.float16)
    assert seq[0].scale.dtype == torch.float32 and seq[0].bias.dtype == torch.float16


@pytest.mark.parametrize("call,exc,substr", [
    (lambda: QuantLinear.from_linear(_linear(k=100), "int4"), ValueError,
     "in_features must be divisible by group_size=128 for int4, got in_features=100"),
    (lambda: QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "int8"), TypeError,
     "linear must be a torch.nn.Linear, got Conv1d"),
    (lambda: QuantLinear.from_linear(_linear(), "int2"), ValueError, "got 'int2'"),
    (lambda: QuantLinear.from_linear(nn.Linear(8, 8, device="meta"), "int8"), ValueError, "meta device"),
    (lambda: QuantLinear(100, 8, config="int4"), ValueError, "group_size=128"),
    (lambda: QuantLinear.from_linear(_linear(), "int8")(torch.randn(2, 255)), ValueError,
     "x.shape[-1] must equal in_features=256, got 255"),
])
def test_bad_inputs(call, exc, substr):
    assert_raises(call, exc, substr)


def test_backend_from_config_and_grad_free():
    lin = _linear()
    q = QuantLinear.from_linear(lin, QuantConfig(8, backend="reference"))
    assert "backend=reference" in repr(q)
    x = torch.randn(2, 256)
    torch.testing.assert_close(q(x), QuantLinear.from_linear(lin, "int8")(x), rtol=1e-5, atol=1e-5)
    w = q.dequantize_weight()
    assert w.shape == (40, 256) and (w - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "w4a8-g32-asym"])
@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_eager_inference_path_matches_op(fmt, ctx):
    """Under no_grad / inference_mode the module calls the cpu kernel with arguments prepared once; it must
    give exactly what the op gives, follow in-place bias updates, and fall back for odd inputs."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = QuantLinear.from_linear(lin, FORMATS[fmt])
    x = torch.randn(2, 3, 96)
    expected = quantized_linear(x, q.qweight, q.bias.detach())
    guard = torch.no_grad() if ctx == "no_grad" else torch.inference_mode()
    with guard:
        torch.testing.assert_close(q(x), expected, rtol=0, atol=0)
        q.bias.add_(1.0)  # in-place update: the prepared bias must follow
        torch.testing.assert_close(q(x), expected + 1.0, rtol=1e-6, atol=1e-5)
        q.bias.sub_(1.0)
        torch.testing.assert_close(q(x.double().float()[:, :, :].transpose(0, 1)).transpose(0, 1), expected)
        with pytest.raises(ValueError, match="in_features=96, got 95"):
            q(torch.randn(2, 95))


def test_pickle_and_deepcopy_after_a_cached_forward(tmp_path):
    """After an eager no_grad forward (which caches a prepared runner) the module still saves with torch.save,
    loads back and deep-copies; the copies compute the same result and never share the cached runner."""
    import copy

    lin = torch.nn.Linear(64, 40)
    q = QuantLinear.from_linear(lin, QuantConfig.from_any("int8"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = q(x)
        path = tmp_path / "q.pt"
        torch.save(q, path)
        q2 = torch.load(path, weights_only=False)
        q3 = copy.deepcopy(q)
        for other in (q2, q3):
            assert "_runner_cache" not in other.__dict__
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "w4a8-g128"])
def test_data_assignment_is_never_stale(fmt):
    """The eager runner and the QuantizedWeight view are rebuilt (and re-validated) when a buffer's `.data` or a
    bias is replaced: the kernel never reads freed storage or the old values."""
    lin = torch.nn.Linear(256, 40)
    q = QuantLinear.from_linear(lin, FORMATS[fmt])
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = q(x)
        q.scale.data = q.scale.data * 2  # new storage, same Parameter/buffer object
        q.bias.data = q.bias.data + 1.0
        want = quantized_linear(x, q.qweight, q.bias, backend="reference")
        torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(q(x), y)
        q.packed.data = q.packed.data[:1].clone()  # too small for the layer: refused, never read out of bounds
        with pytest.raises(ValueError, match="packed"):
            q(x)


def test_moving_the_module_drops_the_caches():
    """After .to(device) the cached runner and QuantizedWeight view no longer keep the old buffers alive (on a
    GPU machine the CPU copies would otherwise stay in host memory); the next call rebuilds them."""
    import gc
    import weakref

    from kernswap.nn import FusedExperts

    q = QuantLinear.from_linear(torch.nn.Linear(64, 40), QuantConfig.from_any("int8"))
    fx = FusedExperts(3, 32, 16, quant="int8")
    with torch.no_grad():
        q(torch.randn(2, 64))
        fx(torch.randn(2, 32), torch.randint(0, 3, (2, 2)), torch.rand(2, 2))
    old = [weakref.ref(q.packed), weakref.ref(q.scale)] + [weakref.ref(t) for t in fx.buffers()]
    assert "_runner_cache" in q.__dict__ and "_runner_cache" in fx.__dict__
    q.to("meta")
    fx.to("meta")
    gc.collect()
    assert all(r() is None for r in old), "a cache kept a buffer of the module's old device alive"
    assert not any(k in m.__dict__ for m in (q, fx) for k in ("_runner_cache", "_qweight_cache", "_weights_cache"))
