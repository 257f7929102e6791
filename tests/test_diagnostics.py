import json
import os
import subprocess
import sys

import pytest

import kernswap
from kernswap import _ext, _kernels

_ENV = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.dirname(__file__)), "python"))


def test_info_contents():
    d = kernswap.info()
    for key in ("kernswap", "torch", "python", "triton", "compiled_cpu_module", "threads", "cuda", "backends", "auto"):
        assert key in d
    assert d["kernswap"] == kernswap.__version__ == "0.1.0"
    c = d["compiled_cpu_module"]
    assert c["found"] == _ext.have_cpu_ext()
    if c["found"]:
        assert c["cpu_isa"] in c["supported_isas"] and c["reason"] == ""
    else:
        assert c["reason"] and c["cpu_isa"] is None
    assert d["backends"]["reference"]["available"]
    for device in ("cpu", "cuda"):
        picks = d["auto"][device]["quantized_linear"]
        assert picks and all(p["backend"] in ("cpu", "cuda", "triton", "reference") for p in picks.values())
    want_cpu = "cpu" if c["found"] else "reference"
    assert d["auto"]["cpu"]["quantized_linear"]["int8"]["backend"] == want_cpu
    json.dumps(d)


def test_python_m_kernswap():
    r = subprocess.run([sys.executable, "-m", "kernswap"], capture_output=True, text=True, env=_ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    for s in ("kernswap 0.1.0", "compiled CPU module kernswap._C", "CPU ISA", "threads", "CUDA", "auto choice"):
        assert s in r.stdout
    r = subprocess.run([sys.executable, "-m", "kernswap", "--json"], capture_output=True, text=True, env=_ENV,
                       timeout=120)
    assert json.loads(r.stdout)["kernswap"] == "0.1.0"


def test_no_ext_override_reports_reason():
    env = dict(_ENV, KERNSWAP_NO_EXT="1")
    code = "import kernswap, json; print(json.dumps(kernswap.info()['compiled_cpu_module']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    c = json.loads(r.stdout)
    assert not c["found"] and "KERNSWAP_NO_EXT" in c["reason"]


def test_exports_and_lazy_patching():
    for name in ("QuantConfig", "Backend", "info", "nn", "ops", "formats"):
        assert hasattr(kernswap, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kernswap.nope  # noqa: B018
    try:
        patch = kernswap.patch
    except ImportError as e:  # patching is another module's job; kernswap itself must still import
        pytest.skip(f"kernswap.patching not importable yet: {e}")
    assert callable(patch) and callable(kernswap.unpatch) and kernswap.PatchReport is not None


def test_kernels_loader_finds_source_tree(tmp_path):
    assert _kernels.source_dir().name == "kernels"
    with pytest.raises(ModuleNotFoundError):
        _kernels.load("definitely_not_a_kernel")


def test_ci_build_has_compiled_cpu_module():
    """In CI the package is installed from source: the CPU kernels must have been built and loaded."""
    import os

    from kernswap import _ext

    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("only enforced in CI (CI=true)")
    if os.environ.get("KERNSWAP_NO_EXT"):
        pytest.skip("KERNSWAP_NO_EXT set: the fallback path is under test")
    assert _ext.have_cpu_ext(), _ext.cpu_ext_reason()


def test_info_lists_attention_and_moe_backends():
    from kernswap.diagnostics import format_info, info

    d = info()
    ops = d["op_backends"]
    assert set(ops) == {"block_sparse_attention", "moe (route/align/experts/combine)"}
    for o in ops.values():
        assert o["backends"]["reference"]["available"] is True
        assert o["auto"]["cpu"][-1] == "reference"
    assert ops["block_sparse_attention"]["backends"]["cpu"]["available"] == kernswap._ext.have_cpu_ext()
    assert "block_sparse_attention (auto order" in format_info(d)
