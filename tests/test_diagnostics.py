import json
import os
import subprocess
import sys

import pytest
import torch

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


def test_printout_says_where_auto_falls_back_to_the_reference():
    env = dict(_ENV, KERNSWAP_NO_EXT="1")
    r = subprocess.run([sys.executable, "-m", "kernswap"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    tail = r.stdout.split("auto falls back to the pure-PyTorch reference:", 1)[1]
    assert "cpu: auto runs the pure-PyTorch reference of every op" in tail and "KERNSWAP_NO_EXT" in tail
    from kernswap import diagnostics

    fb = diagnostics.info()["fallbacks"]
    have = diagnostics._ext.have_cpu_ext()
    assert any(f.startswith("cpu: auto runs") for f in fb) == (not have)


def test_quantized_experts_on_cuda_are_not_silent():
    """On a CUDA model, quantized MoE experts run the reference loop: the patch report says so (checked through
    the notes function with a CUDA device; no GPU needed), and not on the CPU."""
    from kernswap import MoEConfig, QuantConfig
    from kernswap.patching.api import QUANT_EXPERTS_CUDA_NOTE, _tier_notes

    req = {"quant": QuantConfig.from_any("int8"), "moe": MoEConfig()}
    assert QUANT_EXPERTS_CUDA_NOTE in _tier_notes(req, torch.device("cuda"))
    assert QUANT_EXPERTS_CUDA_NOTE not in _tier_notes(req, torch.device("cpu"))
    assert QUANT_EXPERTS_CUDA_NOTE not in _tier_notes({"quant": None, "moe": MoEConfig()}, torch.device("cuda"))


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


# ---- CPU tiers and the (op, tier) registry -----------------------------------------------------------------

_CPU_OPS = {"qlinear", "sgemm_nn", "sgemm_nt", "block_sparse_attention", "moe_swiglu", "moe_ws_gemm", "moe_transpose"}
needs_C = pytest.mark.skipif(not _ext.have_cpu_ext(), reason=f"no compiled CPU module: {_ext.cpu_ext_reason()}")


def _check_report(report, active):
    """Each op runs a supported tier <= active that has a kernel, and every tier above it has a reason."""
    C = _ext.get_C()
    tiers = list(C.all_isas())  # highest first
    supported = _ext.supported_isas()
    assert _CPU_OPS <= set(report), sorted(report)
    for op, r in report.items():
        chosen = r["tier"]
        assert chosen in supported and chosen in r["compiled"] and "scalar" in r["compiled"], (op, r)
        assert tiers.index(chosen) >= tiers.index(active), (op, r)  # never above the active tier
        assert r["compiled"] == [t for t in tiers if t in r["compiled"]], (op, r)  # highest first
        assert list(r["not_taken"]) == tiers[:tiers.index(chosen)], (op, r)
        for tier, why in r["not_taken"].items():
            assert why, (op, tier)
            if tier not in r["compiled"]:
                assert why == f"no kernel for this tier (uses {chosen})", (op, tier, why)
            elif tier not in supported:
                assert why.startswith("CPU lacks "), (op, tier, why)
            else:  # supported and compiled, yet not taken: only a forced lower tier explains it
                assert why == f"forced by set_isa('{active}')", (op, tier, why)


@needs_C
def test_dispatch_report_auto():
    assert _ext.cpu_isa() == _ext.best_isa() == _ext.supported_isas()[0]
    assert _ext.supported_isas()[-1] == "scalar"
    _check_report(_ext.dispatch_report(), _ext.best_isa())


@needs_C
@pytest.mark.parametrize("isa", _ext.supported_isas())
def test_dispatch_report_forced(isa):
    from conftest import use_isa

    with use_isa(isa):
        assert _ext.cpu_isa() == isa
        report = _ext.dispatch_report()
        _check_report(report, isa)
        if isa == "scalar":
            assert {r["tier"] for r in report.values()} == {"scalar"}
    assert _ext.cpu_isa() == _ext.best_isa()


@needs_C
def test_cpu_features_and_tiers():
    C = _ext.get_C()
    feats = _ext.cpu_features()
    assert {"AVX2", "FMA", "F16C", "AVX_VNNI", "AVX512F", "AVX512_VNNI", "AVX512_BF16"} <= set(feats)
    assert {"AMX_TILE", "AMX_INT8", "OS_TILE_STATE"} <= set(feats)  # reported on every CPU, True or False
    assert set(C.all_isas()) == {"scalar", "avx2", "avx_vnni", "avx512", "avx512_vnni", "amx"}
    sup = _ext.supported_isas()
    assert ("avx2" in sup) == all(feats[f] for f in ("AVX2", "FMA", "F16C", "OS_YMM_STATE"))
    assert ("avx512_vnni" in sup) == ("avx512" in sup and feats["AVX512_VNNI"])  # BF16 not required
    assert ("avx_vnni" in sup) == ("avx2" in sup and feats["AVX_VNNI"])
    assert ("amx" in sup) == ("avx512_vnni" in sup and all(feats[f] for f in ("AMX_TILE", "AMX_INT8", "OS_TILE_STATE")))


@needs_C
def test_set_isa_errors():
    C = _ext.get_C()
    with pytest.raises(ValueError, match=r"unknown tier 'avx9000'.*expected one of"):
        C.set_isa("avx9000")
    for tier in C.all_isas():
        if tier not in _ext.supported_isas():
            with pytest.raises(ValueError, match=rf"cannot run tier '{tier}' \(lacks "):
                C.set_isa(tier)
    assert _ext.cpu_isa() == _ext.best_isa()  # a refused call leaves the choice alone


@needs_C
def test_info_and_printout_show_dispatch():
    from kernswap.diagnostics import format_info, info

    d = info()
    c = d["compiled_cpu_module"]
    assert set(c["dispatch"]) >= _CPU_OPS and c["best_isa"] == _ext.best_isa() and c["cpu_features"]
    text = format_info(d)
    assert "CPU kernels per op" in text and "CPU features:" in text
    for op, r in c["dispatch"].items():
        assert f"{op}" in text
        for tier, why in r["not_taken"].items():
            assert f"not {tier}: {why}" in text
