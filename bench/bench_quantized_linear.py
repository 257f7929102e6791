"""Quantized linear (issue 2): kernswap int8/int4/W8A8/W4A8 vs torch's dense, int8/int4 and quantize_dynamic ops.

Run through ``bench/run.py`` (``--only quantized_linear``). Grids (N, K, M; 2 threads by default):
- default: (4096, 4096) at M in {1, 16, 256, 2048} hot, cold at M in {1, 16}; (14336, 4096) and (4096, 14336)
  at M in {1, 16}, hot and cold. About 5 minutes on the 2-core reference machine.
- --full:  all three shapes at every M, hot and cold.
- --quick: tiny shapes, seconds (a smoke test of the suite, numbers meaningless).
Every row is verified before it is timed: kernswap rows against ``kernswap.ops.quantized_linear(...,
backend="reference")`` on the same packed weights, torch rows against a float64 product with the weights
they actually hold.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

NAME = "quantized_linear"
OP = "linear"
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
MS = [1, 16, 256, 2048]
KS_FORMATS = ["int8", "int4", "w8a8", "w4a8"]
ENGINES = ["x86", "fbgemm", "onednn"]
G = 128
F32, BF16 = torch.float32, torch.bfloat16
FP32_BASE = "F.linear fp32"


def grid(ctx: H.Context) -> List[Tuple[int, int, List[Tuple[int, str]]]]:
    """[(N, K, [(M, mode), ...]), ...] for the chosen grid."""
    if ctx.quick:
        return [(256, 512, [(1, "hot"), (1, "cold"), (16, "hot"), (33, "hot")]),
                (72, 384, [(1, "hot"), (5, "cold")])]
    if ctx.full:
        return [(n, k, [(m, mode) for m in MS for mode in ("hot", "cold")]) for n, k in SHAPES]
    small = [(m, "hot") for m in MS] + [(1, "cold"), (16, "cold")]
    big = [(1, "hot"), (1, "cold"), (16, "hot"), (16, "cold")]
    return [(4096, 4096, small), (14336, 4096, big), (4096, 14336, big)]


# ---------------------------------------------------------------------------------------- oracles
def _f64_oracle(w_of_state):
    """Oracle x @ W^T in float64 with W the (dequantized) weight the impl actually holds, cast to x.dtype."""
    def oracle(state: Any, x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ w_of_state(state).double().t()).to(x.dtype)
    return oracle


def _tol(dtype: torch.dtype, fp32: float = 1e-4) -> float:
    return fp32 if dtype == F32 else 1e-2


# --------------------------------------------------------------------------------- torch baselines
def _quant_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8), s


def _quant_int4(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-128: q in 0..15 (int32, [N, K]) and scale [N, K//G]; w ~ (q - 8) * scale."""
    n, k = w.shape
    wg = w.view(n, k // G, G)
    s = wg.abs().amax(-1) / 7
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(wg / s[..., None]), -8, 7) + 8
    return q.view(n, k).to(torch.int32), s


def torch_impls(ctx: H.Context, w: torch.Tensor) -> List[H.Impl]:
    n, k = w.shape
    impls: List[H.Impl] = []
    for dt in (F32, BF16):
        impls.append(H.Impl(
            name=f"F.linear {'fp32' if dt == F32 else 'bf16'}", backend="torch", dtype=dt, fmt=str(dt)[6:],
            build=lambda dt=dt: w.to(dt).clone(), call=lambda s, x: F.linear(x, s), clone=lambda s: s.clone(),
            oracle=_f64_oracle(lambda s: s), tol=_tol(dt, 1e-5), weight_bytes=lambda s: s.numel() * s.element_size()))

    q8, s8 = _quant_int8(w)
    qi4, s4 = _quant_int4(w)
    def slow(shape: Dict[str, int], mode: str) -> Optional[str]:
        """torch's weight-only ops with fp32 activations are 10-60x slower than with bf16 (seconds per call)."""
        if ctx.full or ctx.quick or shape["M"] == 1 or (shape["M"] == 16 and shape["N"] * shape["K"] <= 2**24):
            return None
        return "fp32 activations: seconds per call at this size (run --full)"

    for dt in (BF16, F32):
        dname = "bf16" if dt == BF16 else "fp32"
        impls.append(H.Impl(
            name=f"torch int8 w-only {dname}", backend="aten._weight_int8pack_mm", dtype=dt, fmt="int8",
            build=lambda dt=dt: (q8.clone(), s8.to(dt)),
            call=lambda s, x: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1]),
            clone=lambda s: (s[0].clone(), s[1].clone()),
            oracle=_f64_oracle(lambda s: s[0].double() * s[1].double()[:, None]), tol=_tol(dt, 1e-4),
            weight_bytes=lambda s: s[0].numel() + s[1].numel() * s[1].element_size(),
            skip=None if dt == BF16 else slow))

        def build4(dt=dt):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi4, 1)
            sz = torch.stack([s4.t(), torch.zeros_like(s4.t())], -1).to(dt).contiguous()  # [K/G, N, 2]
            return packed, sz

        def deq4(s, qi4=qi4):
            sc = s[1][..., 0].t().double()  # [N, K/G], the scales as the op holds them
            return ((qi4.double() - 8).view(n, k // G, G) * sc[..., None]).view(n, k)

        impls.append(H.Impl(
            name=f"torch int4 w-only {dname}", backend="aten._weight_int4pack_mm_for_cpu", dtype=dt, fmt="int4-g128",
            build=build4, call=lambda s, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, s[0], G, s[1]),
            clone=lambda s: (s[0].clone(), s[1].clone()), oracle=_f64_oracle(deq4), tol=_tol(dt, 1e-4),
            weight_bytes=lambda s: s[0].numel() + s[1].numel() * s[1].element_size(),
            skip=None if dt == BF16 else slow))

    supported = list(torch.backends.quantized.supported_engines)
    for eng in ENGINES:
        impls.append(H.Impl(
            name=f"quantize_dynamic {eng}", backend=f"torch.ao ({eng})", dtype=F32, fmt="w8a8 (per-tensor act)",
            enter=lambda eng=eng: _set_engine(eng, supported), build=lambda: _qdynamic(w),
            call=_qd_call, clone=_qd_clone, oracle=_f64_oracle(lambda s: s[0].dequantize()), tol=5e-2,
            weight_bytes=lambda s: n * k + 4 * n))
    return impls


def _set_engine(eng: str, supported: Sequence[str]) -> None:
    if eng not in supported:
        raise RuntimeError(f"quantized engine {eng!r} not in torch.backends.quantized.supported_engines={supported}")
    torch.backends.quantized.engine = eng


def _qdynamic(w: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Any]:
    """quantize_dynamic on an nn.Linear; the state is (qweight, bias, packed params) of the quantized module,
    called below exactly as its forward does. (Prepacking fresh copies from the unpacked weight is twice as
    fast as deepcopy of the module, which matters for the ~33 cold copies per shape.)"""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmod = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
    packed = qmod._packed_params._packed_params
    wq, b = torch.ops.quantized.linear_unpack(packed)
    return wq, b, packed


def _qd_call(s: Any, x: torch.Tensor) -> torch.Tensor:
    # = torch.ao.nn.quantized.dynamic.Linear.forward for qint8 (module version 4)
    return torch.ops.quantized.linear_dynamic(x, s[2], reduce_range=True)


def _qd_clone(s: Any) -> Any:
    return s[0], s[1], torch.ops.quantized.linear_prepack(s[0], s[1])


# ------------------------------------------------------------------------------------ kernswap impls
def kernswap_impls(ctx: H.Context, w: torch.Tensor) -> List[H.Impl]:
    try:
        import kernswap
        import kernswap.nn  # noqa: F401
        import kernswap.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported as 'unavailable' rows
        err = e

        def fail():
            raise RuntimeError(f"kernswap not importable: {H._short(err)}")
        return [H.Impl(name=f"kernswap {f} {'fp32' if dt == F32 else 'bf16'}", backend="-", dtype=dt, fmt=f,
                       build=fail, call=None, clone=None, oracle=None,  # type: ignore[arg-type]
                       tol=0, weight_bytes=lambda s: 0)
                for f in KS_FORMATS for dt in (F32, BF16)]
    n, k = w.shape
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    cache: Dict[str, nn.Module] = {}
    crashed = probe_kernswap()
    ctx.meta["kernswap_probe"] = crashed or "ok"
    if crashed:
        ctx.log(f"[{NAME}] kernswap's auto backend failed the crash probe; kernswap rows use backend='reference': "
                f"{crashed}")

    def config(fmt: str) -> Any:
        cfg = kernswap.QuantConfig.from_any(fmt)
        return dataclasses.replace(cfg, backend="reference") if crashed else cfg

    def module(fmt: str) -> nn.Module:  # quantize once per format, shared by the fp32 and bf16 rows
        if fmt not in cache:
            cache[fmt] = kernswap.nn.QuantLinear.from_linear(lin, config(fmt))
        return cache[fmt]

    def oracle(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        qw = getattr(mod, "qweight", None)
        if qw is not None:
            return kernswap.ops.quantized_linear(x, qw, None, backend="reference")
        ref = kernswap.nn.QuantLinear.from_linear(
            lin, dataclasses.replace(kernswap.QuantConfig.from_any(mod.config), backend="reference"))
        return ref(x)

    impls = []
    for fmt in KS_FORMATS:
        cfg = kernswap.QuantConfig.from_any(fmt)
        for dt in (F32, BF16):
            impls.append(H.Impl(
                name=f"kernswap {fmt} {'fp32' if dt == F32 else 'bf16'}",
                backend="kernswap:reference (auto crashed)" if crashed else _ks_backend(kernswap, cfg, k, dt),
                dtype=dt, fmt=getattr(cfg, "name", fmt),
                build=lambda fmt=fmt: module(fmt), call=lambda m, x: m(x), clone=copy.deepcopy, oracle=oracle,
                tol=2e-3 if dt == F32 else 1e-2, weight_bytes=_module_weight_bytes))
    return impls


_PROBE = """
import faulthandler, sys, torch, kernswap, kernswap.nn, kernswap.ops
faulthandler.enable()
torch.set_num_threads(2)
torch.manual_seed(0)
with torch.inference_mode():
    for n, k in ((72, 384), (256, 512)):
        lin = torch.nn.Linear(k, n, bias=False)
        for fmt in %r:
            mod = kernswap.nn.QuantLinear.from_linear(lin, kernswap.QuantConfig.from_any(fmt))
            for dt in (torch.float32, torch.bfloat16):
                for m in (1, 5, 16, 33):
                    print(fmt, n, k, m, dt, flush=True)
                    mod(torch.randn(m, k).to(dt))
""" % (KS_FORMATS,)
_probe_result: List[Optional[str]] = []


def probe_kernswap() -> Optional[str]:
    """Run kernswap's auto path on tiny inputs in a child process, once: a crashing compiled kernel must not
    take the benchmark down with it. None = fine, else why not (the last case tried and the exit status)."""
    if not _probe_result:
        import subprocess
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
            last = (r.stdout.strip().splitlines() or ["(before the first case)"])[-1]
            err = (r.stderr.strip().splitlines() or [""])[-1]
            _probe_result.append(None if r.returncode == 0 else
                                 f"exit status {r.returncode} at case '{last}' {err}"[:300])
        except subprocess.TimeoutExpired:
            _probe_result.append("probe timed out after 300 s")
    return _probe_result[0]


def _ks_backend(kernswap: Any, cfg: Any, k: int, dt: torch.dtype) -> str:
    """Which backend kernswap's `auto` picks for this format on the CPU (best effort, for the row label)."""
    try:
        g = cfg.group_size if cfg.weight_bits == 4 else k
        name, _ = kernswap.ops.auto_backend("cpu", cfg.weight_bits, g, cfg.dynamic_activations, 1, k, dt)
        return f"kernswap:{name}"
    except Exception:  # noqa: BLE001
        return f"kernswap:{H.kernswap_info()['cpu_backend']}"


def _module_weight_bytes(m: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for name, b in m.named_buffers()
               if name.split(".")[-1] in ("packed", "scale", "zero"))


# --------------------------------------------------------------------------------------------- run
def run(ctx: H.Context) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    rows: List[Dict[str, Any]] = []
    engine0 = torch.backends.quantized.engine
    with torch.inference_mode():
        for n, k, ms in grid(ctx):
            ctx.log(f"[{NAME}] N={n} K={k}: {', '.join(f'M={m} {mode}' for m, mode in ms)}")
            gen = torch.Generator().manual_seed(n * 100003 + k)
            w = torch.randn(n, k, generator=gen) / k ** 0.5
            cases = []
            for m, mode in ms:
                x = torch.randn(m, k, generator=gen)
                check = None if m <= 256 else torch.cat([torch.arange(128), torch.arange(m - 128, m)])
                cases.append(H.Case({"M": m, "N": n, "K": k}, mode, x, flops=2.0 * m * n * k, check_rows=check))
            impls = torch_impls(ctx, w) + kernswap_impls(ctx, w)
            rows.extend(H.bench_impls(ctx, OP, impls, cases))
            torch.backends.quantized.engine = engine0
    keys = ("M", "N", "K", "mode")
    H.add_ratios(rows, lambda r: r["impl"] == FP32_BASE, FP32_BASE, keys)
    H.add_roofline(ctx, rows, lambda r: r["M"] == 1)
    return rows, targets(rows)


# ----------------------------------------------------------------------------------------- targets
def _p50(rows, pred) -> Optional[float]:
    """Fastest median among ok rows matching pred (e.g. the faster engine / activation dtype)."""
    vals = [r["p50"] for r in rows if r["status"] == "ok" and r["p50"] and pred(r)]
    return min(vals) if vals else None


def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    cases = sorted({(r["N"], r["K"], r["M"], r["mode"]) for r in rows},
                   key=lambda c: (c[0], c[1], c[2], c[3] != "hot"))
    for n, k, m, mode in cases:
        same = [r for r in rows if (r["N"], r["K"], r["M"], r["mode"]) == (n, k, m, mode)]
        shape = f"N={n} K={k} M={m} {mode}"
        torch4 = _p50(same, lambda r: r["impl"].startswith("torch int4"))
        qd = _p50(same, lambda r: r["impl"].startswith("quantize_dynamic"))
        fp32 = _p50(same, lambda r: r["impl"] == FP32_BASE)
        for r in same:
            if not r["impl"].startswith("kernswap"):
                continue
            fmt = r["impl"].split()[1]
            det = f"{shape} {r['dtype']}"
            t = r["p50"] if r["status"] == "ok" else None

            def ratio(base):
                return base / t if (base and t) else None
            # the targets of the AVX-512 VNNI machine (issue 2) and of every other tier (issue 13)
            vnni = H.vnni_class(r.get("isa"))
            out.append(H.target(f"{fmt} never slower than F.linear fp32", ratio(fp32), 1.0, det))
            if m == 1 and fmt == "int4":
                out.append(H.target("int4 M=1 vs torch int4 op (best act dtype)", ratio(torch4), 2.5 if vnni else 2.0,
                                    det))
                out.append(H.target("int4 M=1 vs quantize_dynamic (best engine)", ratio(qd), 1.5, det))
            if m == 1 and mode == "cold" and fmt in ("int4", "int8"):
                out.append(H.target(f"{fmt} M=1 cold DRAM roofline", r["roofline_frac"], 0.85 if vnni else 0.70, det,
                                    unit="%"))
            if m >= 16 and fmt in ("w8a8", "w4a8"):
                out.append(H.target(f"{fmt} M>=16 vs faster quantize_dynamic", ratio(qd), 0.9, det))
                if m == 256 and vnni:
                    out.append(H.target(f"{fmt} M=256 vs F.linear fp32 (orientation)", ratio(fp32), 3.8, det))
    return out


def print_results(rows: List[Dict[str, Any]], tgts: List[Dict[str, Any]], file: Any = None) -> None:
    cols = ["impl", "dtype", "p50", "p20", "p80", "ratio", "roofline_frac", "gops", "rel_err", "note"]
    order = sorted(rows, key=lambda r: (r["N"], r["K"], r["M"], r["mode"] != "hot"))
    seen: List[Tuple] = []
    for r in order:
        key = (r["N"], r["K"], r["M"], r["mode"])
        if key not in seen:
            seen.append(key)
    for key in seen:
        sub = [r for r in order if (r["N"], r["K"], r["M"], r["mode"]) == key]
        sub = [dict(r, dtype=r["dtype"].replace("float32", "fp32").replace("bfloat16", "bf16"),
                    note=(r["note"] if r["status"] == "ok" else f"{r['status'].upper()}: {r['note']}")[:70])
               for r in sub]
        H.print_table(sub, cols, title=f"linear  N={key[0]} K={key[1]} M={key[2]} {key[3]}   (vs base = speed-up "
                      f"over {FP32_BASE}; roof = DRAM roofline fraction)", file=file)
    H.print_targets(tgts, file=file)


# ------------------------------------------------------------------------------------------ self-check
def self_check() -> None:
    """Quick grid end to end (seconds): every torch baseline row runs and verifies, kernswap rows verify."""
    ctx = H.make_context(threads=1, quick=True, verbose=False)
    H.measure_bandwidth(ctx, repeats=2)
    rows, tgts = run(ctx)
    assert probe_kernswap() is None, f"kernswap's auto backend crashes: {probe_kernswap()}"
    json.dumps({"rows": rows, "targets": tgts}, default=str)
    bad = [r for r in rows if r["status"] in ("wrong", "error")]
    assert not bad, [(r["impl"], r["M"], r["N"], r["K"], r["mode"], r["note"]) for r in bad]
    for name in (FP32_BASE, "F.linear bf16", "torch int8 w-only bf16", "torch int4 w-only bf16"):
        # torch's int4 packing needs N % 16 == 0; the quick grid's N=72 checks that 'unavailable' rows work
        assert all(r["status"] == "ok" for r in rows if r["impl"] == name and r["N"] % 16 == 0), name
    ks = [r for r in rows if r["impl"].startswith("kernswap")]
    assert ks and all(r["status"] == "ok" for r in ks), {r["impl"]: r["note"] for r in ks if r["status"] != "ok"}
    assert all(r["ratio"] is not None for r in rows if r["status"] == "ok")
    assert any(t["target"].startswith("int4 M=1") for t in tgts)
