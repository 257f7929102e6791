import dataclasses

import pytest

import kernswap
from kernswap import Backend, QuantConfig


def test_defaults_and_backend_enum():
    c = QuantConfig()
    assert (c.weight_bits, c.group_size, c.symmetric, c.dynamic_activations) == (8, None, True, False)
    assert c.backend is Backend.AUTO and c.backend == "auto"
    assert [b.value for b in Backend] == ["auto", "cpu", "cuda", "triton", "reference"]
    assert str(Backend.CPU) == "cpu"
    assert QuantConfig(backend="CPU").backend is Backend.CPU
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weight_bits = 4


@pytest.mark.parametrize("name,expect", [
    ("int8", (8, None, True, False)), ("int4", (4, 128, True, False)),
    ("w8a8", (8, None, True, True)), ("w4a8", (4, 128, True, True)),
])
def test_shortcuts(name, expect):
    c = QuantConfig.from_any(name)
    assert (c.weight_bits, c.group_size, c.symmetric, c.dynamic_activations) == expect
    assert QuantConfig.from_any(c) is c
    assert kernswap.QuantConfig is QuantConfig


def test_unknown_shortcut_lists_choices():
    with pytest.raises(ValueError, match=r"int4.*int8.*w4a8.*w8a8.*got 'int3'"):
        QuantConfig.from_any("int3")
    with pytest.raises(ValueError, match="got 8"):
        QuantConfig.from_any(8)


@pytest.mark.parametrize("kwargs,substr", [
    (dict(weight_bits=3), "QuantConfig.weight_bits must be one of [8, 4], got 3"),
    (dict(weight_bits=8, group_size=128), "QuantConfig.group_size must be None for weight_bits=8"),
    (dict(weight_bits=8, symmetric=False), "QuantConfig.symmetric must be True for weight_bits=8, got False"),
    (dict(weight_bits=4, group_size=None), "QuantConfig.group_size must be one of [32, 64, 128] for weight_bits=4, got None"),
    (dict(weight_bits=4, group_size=256), "got 256"),
    (dict(symmetric="yes"), "QuantConfig.symmetric must be a bool"),
    (dict(dynamic_activations=1), "QuantConfig.dynamic_activations must be a bool"),
    (dict(backend="gpu"), "QuantConfig.backend must be one of ['auto', 'cpu', 'cuda', 'triton', 'reference']"),
])
def test_invalid(kwargs, substr):
    with pytest.raises(ValueError) as ei:
        QuantConfig(**kwargs)
    assert substr in str(ei.value)


def test_valid_int4_variants_and_names():
    for g in (32, 64, 128):
        for sym in (True, False):
            for dyn in (True, False):
                c = QuantConfig(4, g, symmetric=sym, dynamic_activations=dyn)
                assert c.group_size == g
    assert QuantConfig(4, 64, symmetric=False).name == "int4-g64-asym"
    assert QuantConfig(8, dynamic_activations=True).name == "w8a8"
    assert hash(QuantConfig(4, 64)) == hash(QuantConfig(4, 64))
