"""Ahead-of-time compile of every Triton kernel variant the triton backend launches, for sm_90 and sm_80,
down to cubin, without a GPU (triton.compiler.ASTSource + triton.compile(target=GPUTarget(...))).

Every kernels/*.py that defines ``aot_variants()`` takes part. Each is loaded as a private copy inside the
kernswap.kernels package (its relative imports resolve), decorated with TRITON_INTERPRET unset (the interpreter
tests may have set it), and compiled with a fresh Triton cache directory, so every variant is really compiled.
"""
import importlib.util
import os
import pathlib
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"
KERNEL_FILES = sorted(p.stem for p in KERNEL_DIR.glob("*.py") if "def aot_variants(" in p.read_text())
TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
_MODS = {}


def _module(stem="quantized_linear"):
    """The kernel module kernels/<stem>.py, JIT-decorated for real compilation (not the interpreter)."""
    if stem not in _MODS:
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:
            from kernswap import _kernels

            _kernels.load("_triton_common")  # the package the private copy imports its shared pieces from
            spec = importlib.util.spec_from_file_location(f"kernswap.kernels._aot_{stem}", KERNEL_DIR / f"{stem}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        _MODS[stem] = mod
    return _MODS[stem]


def _compile(job):
    """Worker: compile variant `index` of kernels/<stem>.py for `target`; returns (name, target, cubin bytes,
    ptx chars, shared bytes)."""
    stem, index, tname, cache_dir = job
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)
    v = list(_module(stem).aot_variants())[index]
    # pointers are 16-byte aligned, as the JIT specializes them at run time (tt.divisibility): without it the
    # compile falls back to scalar loads the real launches never use
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(v.signature.values()) if t.startswith("*")}
    src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    k = triton.compile(src, target=TARGETS[tname], options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    return v.name, tname, len(k.asm["cubin"]), len(k.asm["ptx"]), k.metadata.shared


def test_variants_cover_backend_launches():
    mod = _module()
    assert mod.HAS_TRITON
    names = [v.name for v in mod.aot_variants()]
    assert len(names) == len(set(names))
    for want in ("quantize_rows[fp16]", "qlinear[w8,bf16,", "qlinear[w8a8,fp16,", "qlinear[w4,fp32,",
                 "qlinear[w4a8,bf16,"):
        assert any(n.startswith(want) for n in names), want
    # every (bits, dynamic, dtype, config) the launcher picks is in the list
    consts = {(v.constexprs["BITS"], v.constexprs["DYNAMIC"], v.signature["y_ptr"], v.constexprs["BLOCK_M"],
               v.constexprs["BLOCK_N"], v.constexprs["BLOCK_K"]) for v in mod.aot_variants() if "BITS" in v.constexprs}
    for bits, groups in ((8, (4096,)), (4, (32, 64, 128))):
        for dyn in (False, True):
            for dt in ("fp16", "bf16", "fp32"):
                for m in (1, 16, 17, 4096):
                    for g in groups:
                        c = mod.pick_config(m, bits, g, dt == "fp32" and not dyn)
                        assert (bits, dyn, f"*{dt}", c.block_m, c.block_n, c.block_k) in consts


def test_every_kernel_file_takes_part():
    assert "quantized_linear" in KERNEL_FILES
    for stem in KERNEL_FILES:
        names = [v.name for v in _module(stem).aot_variants()]
        assert names and len(names) == len(set(names)), stem


def test_aot_compile_all_variants_to_cubin(tmp_path):
    counts = {stem: len(list(_module(stem).aot_variants())) for stem in KERNEL_FILES}
    n = sum(counts.values())
    jobs = [(stem, i, t, str(tmp_path / "cache")) for stem, c in counts.items() for i in range(c) for t in TARGETS]
    t0 = time.time()
    workers = max(1, min(4, os.cpu_count() or 1))
    saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
    try:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # not fork: the parent has torch / OpenMP threads
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            results = list(ex.map(_compile, jobs))
    except (ValueError, OSError, ImportError):  # no process pool available: compile serially
        results = [_compile(j) for j in jobs]
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    elapsed = time.time() - t0
    assert len(results) == 2 * n
    for name, tname, cubin, ptx, shared in results:
        assert cubin > 0 and ptx > 0, (name, tname)
        assert shared <= 227 * 1024, (name, tname, shared)  # fits an H100 / A100 SM
    sizes = {t: sum(r[2] for r in results if r[1] == t) for t in TARGETS}
    print(f"\nAOT: {n} variants x {len(TARGETS)} targets in {elapsed:.1f}s ({workers} workers); cubin bytes {sizes}")
